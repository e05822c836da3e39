"""Prompt sets in every format of FORMATS.md, built in tmp_path (spec E: Data)."""

from __future__ import annotations

import json

import pytest

from diffalign.engine.errors import DiffalignError
from diffalign.engine.prompts import (
    PromptRecord,
    load_dpg_prompts,
    load_geneval_metadata,
    load_prompts,
)

GENEVAL_LINES = [
    {
        "tag": "single_object",
        "include": [{"class": "bench", "count": 1}],
        "prompt": "a photo of a bench",
    },
    {
        "tag": "two_object",
        "include": [{"class": "toilet", "count": 1}, {"class": "cow", "count": 1}],
        "prompt": "a photo of a toilet and a cow",
    },
    {
        "tag": "position",
        "include": [
            {"class": "dog", "count": 1},
            {"class": "cat", "count": 1, "position": ["left of", 0]},
        ],
        "exclude": [{"class": "bird", "count": 1}],
        "prompt": "a photo of a cat left of a dog",
    },
]


def make_geneval(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in GENEVAL_LINES))
    return path


def make_coco(root, split="val2017", with_images=True):
    """`root/annotations/captions_<split>.json` (+ `root/<split>/` images folder)."""
    ann = root / "annotations" / f"captions_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 139, "file_name": "000000000139.jpg", "height": 426, "width": 640},
            {"id": 285, "file_name": "000000000285.jpg", "height": 640, "width": 586},
        ],
        "annotations": [
            {"id": 10, "image_id": 139, "caption": "A room with a table. "},
            {"id": 11, "image_id": 285, "caption": "A big brown bear."},
            {"id": 12, "image_id": 139, "caption": "A living room with chairs."},
        ],
    }
    ann.write_text(json.dumps(data))
    if with_images:
        (root / split).mkdir(exist_ok=True)
    return ann


def make_dpg(root):
    prompts = root / "prompts"
    prompts.mkdir(parents=True)
    (prompts / "partiprompts12.txt").write_text("A red cube on a blue sphere.\n")
    (prompts / "12.txt").write_text("  two cats  \n")
    (prompts / "COCOval2014000000010363.txt").write_text("a kitchen")
    return prompts


def test_txt_file_one_prompt_per_line(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat\n\n  a dog  \na bird\n")
    recs = load_prompts(str(p))
    assert [r.prompt for r in recs] == ["a cat", "a dog", "a bird"]
    assert [r.id for r in recs] == ["00000", "00001", "00002"]
    assert all(r.image is None for r in recs)
    assert load_prompts(f"txt:{p}", limit=2) == recs[:2]


def test_jsonl_pairs_with_images_relative_to_file(tmp_path):
    d = tmp_path / "pairs"
    d.mkdir()
    (d / "pairs.jsonl").write_text(
        json.dumps({"image": "imgs/a.png", "prompt": "a cat"})
        + "\n"
        + json.dumps({"image": "imgs/b.png", "prompt": "a dog", "id": "x7"})
        + "\n"
    )
    recs = load_prompts(d / "pairs.jsonl")
    assert recs[0].image == str(d / "imgs" / "a.png")
    assert recs[1].id == "x7" and recs[1].prompt == "a dog"
    # configurable field names
    (d / "c.jsonl").write_text(json.dumps({"file": "q.png", "text": "hello"}) + "\n")
    recs = load_prompts(str(d / "c.jsonl"), prompt_field="text", image_field="file")
    assert recs == [
        PromptRecord(
            "hello",
            "00000",
            str(d / "q.png"),
            {"file": "q.png", "text": "hello", "source": str(d / "c.jsonl")},
        )
    ]


def test_pairs_jsonl_with_a_tag_field_is_not_taken_for_geneval(tmp_path):
    """A pairs.jsonl whose records carry a "tag" (but no GenEval "include") is read as pairs;
    it was refused as a malformed GenEval file."""
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "a cat", "image": "a.png", "tag": "animals"}) + "\n"
    )
    [rec] = load_prompts(tmp_path / "p.jsonl")
    assert rec.prompt == "a cat" and rec.image == str(tmp_path / "a.png")
    assert rec.meta["tag"] == "animals"


def test_coco_captions_file_records_per_caption(tmp_path):
    ann = make_coco(tmp_path / "coco")
    recs = load_prompts(ann)
    assert [r.prompt for r in recs] == [
        "A room with a table.",
        "A big brown bear.",
        "A living room with chairs.",
    ]
    assert [r.id for r in recs] == ["10", "11", "12"]
    assert recs[0].image == str(tmp_path / "coco" / "val2017" / "000000000139.jpg")
    assert [r.meta["image_id"] for r in recs] == [139, 285, 139]
    # no image folder -> no image paths
    ann2 = make_coco(tmp_path / "bare", with_images=False)
    assert all(r.image is None for r in load_prompts(ann2))


def test_utf8_byte_order_mark_is_not_part_of_the_prompt(tmp_path):
    """FORMATS.md: prompt files are UTF-8 (DPG-Bench: strip whitespace); a UTF-8 file saved
    with a byte-order mark kept U+FEFF at the start of its first prompt."""
    (tmp_path / "p.txt").write_bytes("\ufeffa cat\na dog\n".encode())
    assert [r.prompt for r in load_prompts(tmp_path / "p.txt")] == ["a cat", "a dog"]
    (tmp_path / "dpg").mkdir()
    (tmp_path / "dpg" / "12.txt").write_bytes("\ufeff a red bus \n".encode())
    assert load_dpg_prompts(tmp_path / "dpg") == [("12", "a red bus")]


def test_jsonl_with_a_byte_order_mark_loads(tmp_path):
    """A pairs.jsonl or GenEval metadata file saved with a byte-order mark: 'line 1: not valid
    JSON' (engine.io.iter_jsonl)."""
    (tmp_path / "p.jsonl").write_bytes('\ufeff{"prompt": "a cat"}\n'.encode())
    assert [r.prompt for r in load_prompts(tmp_path / "p.jsonl")] == ["a cat"]
    text = make_geneval(tmp_path / "g" / "evaluation_metadata.jsonl").read_text()
    (tmp_path / "g" / "evaluation_metadata.jsonl").write_bytes(("\ufeff" + text).encode())
    assert load_geneval_metadata(tmp_path / "g") == GENEVAL_LINES
    assert [r.meta for r in load_prompts(tmp_path / "g")] == GENEVAL_LINES  # still GenEval


def test_coco_root_folder_2017_or_2014(tmp_path):
    """A COCO root given as a path: captions_val2017.json, else the 2014 file (FORMATS.md names
    both years; a 2014-only root fell through to the DPG reader: 'no DPG-Bench prompt files')."""
    make_coco(tmp_path / "c14", split="val2014")
    recs = load_prompts(tmp_path / "c14")
    assert [r.id for r in recs] == ["10", "11", "12"]
    assert recs[0].image == str(tmp_path / "c14" / "val2014" / "000000000139.jpg")
    make_coco(tmp_path / "c14", split="val2017")  # both years: the asked split wins
    assert load_prompts(tmp_path / "c14")[0].image.endswith("val2017/000000000139.jpg")


def test_geneval_detected_and_meta_is_the_full_line(tmp_path):
    path = make_geneval(tmp_path / "evaluation_metadata.jsonl")
    recs = load_prompts(path)
    assert [r.meta for r in recs] == GENEVAL_LINES
    assert [r.id for r in recs] == ["00000", "00001", "00002"]
    assert load_geneval_metadata(path) == GENEVAL_LINES
    assert load_geneval_metadata(tmp_path) == GENEVAL_LINES


def test_dpg_folder_or_parent_sorted_by_id(tmp_path):
    prompts = make_dpg(tmp_path / "dpg")
    expected = [
        ("12", "two cats"),
        ("COCOval2014000000010363", "a kitchen"),
        ("partiprompts12", "A red cube on a blue sphere."),
    ]
    assert load_dpg_prompts(prompts) == expected
    assert load_dpg_prompts(prompts.parent) == expected
    recs = load_prompts(str(prompts.parent))
    assert [(r.id, r.prompt) for r in recs] == expected


def test_names_under_datadir_combined_in_order_with_limit(tmp_path):
    make_coco(tmp_path / "coco")
    make_geneval(tmp_path / "geneval" / "evaluation_metadata.jsonl")
    make_dpg(tmp_path / "dpg_bench")
    make_coco(tmp_path / "coco2014", split="val2014")
    both = load_prompts("coco,geneval", datadir=tmp_path)
    assert len(both) == 3 + 3
    assert both[0].prompt == "A room with a table." and both[3].meta == GENEVAL_LINES[0]
    assert load_prompts(["geneval", "coco"], datadir=tmp_path)[0].meta == GENEVAL_LINES[0]
    assert len(load_prompts("coco, geneval, dpg", datadir=tmp_path, limit=4)) == 4
    assert len(load_prompts("dpg", datadir=tmp_path)) == 3
    assert len(load_prompts("coco2014", datadir=tmp_path)) == 3
    # flat layouts: datadir/annotations, datadir/evaluation_metadata.jsonl, datadir/prompts
    flat = tmp_path / "flat"
    make_coco(flat)
    make_geneval(flat / "evaluation_metadata.jsonl")
    make_dpg(flat)
    for name in ("coco", "geneval", "dpg"):
        assert len(load_prompts(name, datadir=flat)) == 3


@pytest.mark.parametrize(
    "setup, spec, match",
    [
        (None, "imagenet", "unknown dataset 'imagenet'"),
        (None, "nope/prompts.txt", "not found"),
        (None, "coco", "--datadir"),
        ("empty_txt", "{d}/e.txt", "is empty"),
        ("bad_jsonl", "{d}/bad.jsonl", "bad.jsonl:2: not valid JSON"),
        ("bad_geneval", "{d}/g.jsonl", "g.jsonl:1: GenEval line has no 'prompt'"),
        ("no_prompt", "{d}/n.jsonl", "n.jsonl:1: no 'prompt' string"),
        ("not_coco", "{d}/x.json", "not a COCO captions file"),
        ("empty_dir", "{d}/empty", "no DPG-Bench prompt files"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, setup, spec, match):
    d = tmp_path
    if setup == "empty_txt":
        (d / "e.txt").write_text("\n \n")
    elif setup == "bad_jsonl":
        (d / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    elif setup == "bad_geneval":
        (d / "g.jsonl").write_text(json.dumps({"tag": "colors", "include": []}) + "\n")
    elif setup == "no_prompt":
        (d / "n.jsonl").write_text(json.dumps({"caption": "x"}) + "\n")
    elif setup == "not_coco":
        (d / "x.json").write_text(json.dumps({"images": []}))
    elif setup == "empty_dir":
        (d / "empty").mkdir()
    datadir = None if spec == "coco" else tmp_path
    with pytest.raises(DiffalignError, match=match) as e:
        load_prompts(spec.format(d=d), datadir=datadir)
    assert "\n" not in str(e.value)


def test_missing_named_dataset_lists_where_it_looked(tmp_path):
    with pytest.raises(DiffalignError, match="dataset 'geneval' not found under"):
        load_prompts("geneval", datadir=tmp_path)
    with pytest.raises(DiffalignError, match="GenEval metadata file not found"):
        load_geneval_metadata(tmp_path / "missing.jsonl")
    with pytest.raises(DiffalignError, match="folder not found"):
        load_dpg_prompts(tmp_path / "missing")


def test_geneval_metadata_given_a_prompt_list_says_what_it_needs(tmp_path):
    """`textstream geneval --metadata prompts.txt` (GenEval's generation_prompts.txt, or any
    prompt list) was only 'prompts.txt:1: not valid JSON (Expecting value)'."""
    path = tmp_path / "generation_prompts.txt"
    path.write_text("a photo of a cat\na photo of a dog\n", encoding="utf-8")
    with pytest.raises(DiffalignError) as e:
        load_geneval_metadata(path)
    msg = str(e.value)
    assert f"{path}:1: not valid JSON" in msg
    assert "evaluation_metadata.jsonl" in msg and "textstream generate --prompts" in msg
    assert "\n" not in msg
    # a bad line after a good first line is named as before, without the hint
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps(GENEVAL_LINES[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DiffalignError, match=r"m\.jsonl:2: not valid JSON") as e:
        load_geneval_metadata(bad)
    assert "textstream generate" not in str(e.value)


def test_coco_captions_json_with_a_byte_order_mark(tmp_path):
    """COCO captions json (and any JSON read by engine.io.read_json) saved with a byte-order
    mark: 'not valid JSON'."""
    from diffalign.engine.io import read_json

    ann = make_coco(tmp_path / "c", with_images=False)
    want = [r.prompt for r in load_prompts(ann)]
    ann.write_bytes(b"\xef\xbb\xbf" + ann.read_bytes())
    assert [r.prompt for r in load_prompts(ann)] == want
    (tmp_path / "x.json").write_bytes('\ufeff{"a": 1}'.encode())
    assert read_json(tmp_path / "x.json") == {"a": 1}
