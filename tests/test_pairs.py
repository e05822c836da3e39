"""Image-caption pairs (engine.pairs): folders with .txt captions, pairs.jsonl, COCO captions."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from diffalign.engine.errors import DiffalignError
from diffalign.engine.pairs import center_crop_resize, load_image_captions


def _png(path, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)


def test_folder_pairs_sorted_nested_and_uncaptioned_skipped(tmp_path):
    _png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text(" a bee \n")
    _png(tmp_path / "sub" / "a.jpg")
    (tmp_path / "sub" / "a.txt").write_bytes("\ufeffan ant".encode())  # a BOM is not text
    _png(tmp_path / "c.png")  # no caption
    got = load_image_captions(str(tmp_path))
    assert [(p.id, p.caption) for p in got.pairs] == [("b", "a bee"), ("sub/a", "an ant")]
    assert got.skipped_no_caption == 1
    assert [p.id for p in load_image_captions(str(tmp_path), limit=1).pairs] == ["b"]


def test_pairs_jsonl_and_coco(tmp_path):
    _png(tmp_path / "img" / "x.png")
    lines = [
        {"image": "img/x.png", "text": "first", "id": "p1"},
        {"image": "img/x.png", "text": "2"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = load_image_captions(str(tmp_path / "pairs.jsonl"), caption_field="text").pairs
    assert [(p.id, p.caption, p.image.name) for p in got] == [
        ("p1", "first", "x.png"),
        ("00001", "2", "x.png"),
    ]
    coco = tmp_path / "coco"
    _png(coco / "val2017" / "000001.jpg")
    ann = {
        "images": [{"id": 1, "file_name": "000001.jpg"}],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "a dog"},
            {"id": 12, "image_id": 1, "caption": "a brown dog"},
        ],
    }
    (coco / "annotations").mkdir()
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps(ann))
    got = load_image_captions("coco", datadir=str(tmp_path)).pairs
    assert [(p.id, p.caption) for p in got] == [("11", "a dog"), ("12", "a brown dog")]
    assert all(p.image == coco / "val2017" / "000001.jpg" for p in got)
    # the COCO root given as a path (FORMATS.md layout): its captions json, not an image folder
    # with .txt captions (it said "has no pair")
    assert load_image_captions(str(coco)).pairs == got


def test_a_dataset_name_is_looked_up_under_datadir_beside_a_folder_of_that_name(
    tmp_path, monkeypatch
):
    """`textstream cache --dataset coco --datadir D` run where the working directory holds a
    folder `coco/` with images read that folder as image + .txt pairs ("has no pair"), while
    `calibrate` (load_prompts) looked the name up under D."""
    data = tmp_path / "data"
    _png(data / "coco" / "val2017" / "000001.jpg")
    ann = {
        "images": [{"id": 1, "file_name": "000001.jpg"}],
        "annotations": [{"id": 11, "image_id": 1, "caption": "a dog"}],
    }
    (data / "coco" / "annotations").mkdir()
    (data / "coco" / "annotations" / "captions_val2017.json").write_text(json.dumps(ann))
    work = tmp_path / "work"
    _png(work / "coco" / "photos" / "x.png")  # a local folder named coco, no captions
    monkeypatch.chdir(work)
    got = load_image_captions("coco", datadir=str(data)).pairs
    assert [(p.id, p.caption, p.image) for p in got] == [
        ("11", "a dog", data / "coco" / "val2017" / "000001.jpg")
    ]
    # the local folder is still read as a path when given as one
    with pytest.raises(DiffalignError, match="has no pair"):
        load_image_captions("./coco")


def test_bad_pair_sources(tmp_path):
    (tmp_path / "no_image.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n")
    with pytest.raises(DiffalignError, match="has no image"):
        load_image_captions(str(tmp_path / "no_image.jsonl"))
    (tmp_path / "missing.jsonl").write_text(json.dumps({"prompt": "a", "image": "n.png"}) + "\n")
    with pytest.raises(DiffalignError, match="not found"):
        load_image_captions(str(tmp_path / "missing.jsonl"))
    _png(tmp_path / "d" / "x.png")
    (tmp_path / "d" / "x.txt").write_text("x")
    with pytest.raises(DiffalignError, match="share the id"):
        load_image_captions([str(tmp_path / "d"), str(tmp_path / "d")])
    with pytest.raises(DiffalignError, match="no image-caption dataset"):
        load_image_captions([])


def test_center_crop_resize_shorter_side_then_centre():
    img = Image.new("RGB", (40, 20))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # a red left quarter is cropped away
    out = center_crop_resize(img, 10)
    assert out.size == (10, 10)
    assert out.getpixel((0, 5))[0] < 128 and out.getpixel((9, 5)) == (0, 0, 0)
