"""Triptych data (spec F "Data"): split, dataset with skip/count of bad triptychs, make-triptychs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.fill.data import (
    TriptychDataset,
    collate_triptychs,
    find_panel_sets,
    make_triptychs,
    split_triptych,
)


def _img(w, h, value=None, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else None
    if arr is None:
        arr = np.full((h, w, 3), value, dtype=np.uint8)
    return Image.fromarray(arr)


def _triptych(p, colors=(10, 128, 250)):
    out = Image.new("RGB", (3 * p, p))
    for i, c in enumerate(colors):
        out.paste(_img(p, p, c), (i * p, 0))
    return out


def test_split_triptych_is_exact():
    x = torch.arange(2 * 3 * 4 * 12, dtype=torch.float32).view(2, 3, 4, 12)
    v, t, s = split_triptych(x)
    assert v.shape == t.shape == s.shape == (2, 3, 4, 4)
    assert torch.equal(torch.cat([v, t, s], dim=-1), x)
    assert torch.equal(split_triptych(x[0])[1], x[0, :, :, 4:8])
    with pytest.raises(DiffalignError, match="width = 3 x height"):
        split_triptych(torch.zeros(3, 4, 8))


def _dataset_folder(root):
    root.mkdir()
    _triptych(32).save(root / "good1.png")
    _triptych(32, (0, 60, 255)).save(root / "good2.jpg", quality=100)
    _img(64, 32).save(root / "aspect.png")  # 2:1, not a triptych
    _triptych(24).save(root / "undiv.png")  # panel 24 not divisible by 16
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _triptych(32).save(root / "nocap.png")
    _triptych(48).save(root / "bigger.png")  # another panel size
    return root


def test_dataset_from_captions_jsonl_skips_and_counts_bad(tmp_path):
    root = _dataset_folder(tmp_path / "d")
    rows = [
        {"file": "good1.png", "text": "first"},
        {"file": "good2.jpg", "text": "second"},
        {"file": "aspect.png", "text": "x"},
        {"file": "undiv.png", "text": "x"},
        {"file": "broken.png", "text": "x"},
        {"file": "nocap.png", "text": "  "},
        {"file": "bigger.png", "text": "x"},
        {"file": "missing.png", "text": "x"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps({"text": "no image"})]
    (root / "meta.jsonl").write_text("\n".join(lines) + "\n")
    ds = TriptychDataset(root, captions="meta.jsonl", image_field="file", prompt_field="text")
    assert len(ds) == 2 and ds.panel == 32
    reasons = {s["name"]: s["reason"] for s in ds.skipped}
    assert reasons == {
        "aspect.png": "wrong aspect",
        "undiv.png": "panel not divisible by 16",
        "broken.png": "unreadable",
        "nocap.png": "no caption",
        "bigger.png": "other panel size",
        "missing.png": "unreadable",
        "meta.jsonl:9": "corrupt record",
        "meta.jsonl:10": "corrupt record",
    }
    summary = ds.summary()
    assert summary["used"] == 2 and summary["skipped"] == 8
    assert summary["skipped_by_reason"]["unreadable"] == 2
    assert "skipped aspect.png: wrong aspect" in ds.report()
    item = ds[0]
    assert item["prompt"] == "first" and item["name"] == "good1.png"
    for key, value in zip(("visible", "target", "semantic"), (10, 128, 250)):
        assert item[key].shape == (3, 32, 32) and item[key].dtype == torch.float32
        assert torch.allclose(item[key], torch.full_like(item[key], value / 255))
    batch = collate_triptychs([ds[0], ds[1]])
    assert batch["visible"].shape == (2, 3, 32, 32) and batch["prompt"] == ["first", "second"]


def test_dataset_txt_side_files_and_resize(tmp_path):
    root = _dataset_folder(tmp_path / "d")
    for name in ("good1", "good2", "undiv", "bigger"):
        (root / f"{name}.txt").write_text(f"caption {name}\n")
    ds = TriptychDataset(root)  # no captions.jsonl: .txt side files
    assert ds.caption_source == "txt side files"
    assert sorted(r.name for r in ds.records) == ["good1.png", "good2.jpg"]
    assert {s["reason"] for s in ds.skipped} >= {"no caption", "wrong aspect", "unreadable"}
    # With a panel size everything of the right aspect is resized to it.
    ds16 = TriptychDataset(root, captions=None, panel=16)
    assert sorted(r.name for r in ds16.records) == [
        "bigger.png",
        "good1.png",
        "good2.jpg",
        "undiv.png",
    ]
    assert ds16[0]["semantic"].shape == (3, 16, 16)


def test_dataset_bad_arguments(tmp_path):
    with pytest.raises(DiffalignError, match="not found"):
        TriptychDataset(tmp_path / "nope")
    root = tmp_path / "empty"
    root.mkdir()
    _img(64, 32).save(root / "a.png")
    with pytest.raises(DiffalignError, match="no usable triptychs .*1 wrong aspect"):
        TriptychDataset(root)
    with pytest.raises(DiffalignError, match="captions file not found"):
        TriptychDataset(root, captions="other.jsonl")
    with pytest.raises(DiffalignError, match="multiple of 16"):
        TriptychDataset(root, panel=20)


def test_dataset_panel_bound(tmp_path):
    """A panel (given or native) above max_panel_size (default FLUX.1's 1024) is one error line;
    `panel` within the bound resizes larger native panels down."""
    from diffalign.fill.data import MAX_PANEL_SIZE

    root = tmp_path / "d"
    root.mkdir()
    _triptych(48).save(root / "a.png")
    (root / "a.txt").write_text("a cat\n")
    with pytest.raises(DiffalignError, match="panel 1040 is above max_panel_size 1024"):
        TriptychDataset(root, panel=MAX_PANEL_SIZE + 16)
    with pytest.raises(DiffalignError, match="48px panels, above max_panel_size 32"):
        TriptychDataset(root, max_panel_size=32)
    with pytest.raises(DiffalignError, match="max_panel_size must be a positive multiple of 16"):
        TriptychDataset(root, max_panel_size=40)
    assert TriptychDataset(root, panel=32, max_panel_size=32)[0]["target"].shape == (3, 32, 32)
    assert TriptychDataset(root, panel=64, max_panel_size=64).panel == 64


def _triples(folder, n=2, size=40):
    folder.mkdir()
    for i in range(n):
        for j, role in enumerate(("visible", "target", "semantic")):
            _img(size, size, 40 * j + i).save(folder / f"ex{i}_{role}.png")
        (folder / f"ex{i}.txt").write_text(f"prompt {i}")
    return folder


def test_make_triptychs_folder_then_dataset(tmp_path):
    src = _triples(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["fill", "make-triptychs", "--input", str(src), "--out", str(out),
                 "--panel-size", "32"]) == 0  # fmt: skip
    records = [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == ["images/ex0.png", "images/ex1.png"]
    assert Image.open(out / "images" / "ex1.png").size == (96, 32)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == 2 and summary["skipped"] == 0 and summary["panel_size"] == 32
    ds = TriptychDataset(out)
    assert len(ds) == 2 and ds[1]["prompt"] == "prompt 1"
    assert torch.allclose(ds[1]["target"], torch.full((3, 32, 32), 41 / 255), atol=1 / 255)
    # A second run refuses to overwrite, and keeps what is there.
    assert main(["fill", "make-triptychs", "--input", str(src), "--out", str(out)]) == 2
    assert len((out / "captions.jsonl").read_text().splitlines()) == 2
    assert main(["fill", "make-triptychs", "--input", str(src), "--out", str(out),
                 "--overwrite", "--keep-size", "--center-crop"]) == 2  # fmt: skip
    # (40 px panels are not divisible by 16): checked before writing, nothing lost.
    assert len((out / "captions.jsonl").read_text().splitlines()) == 2
    assert Image.open(out / "images" / "ex1.png").size == (96, 32)


def test_make_triptychs_jsonl_and_bad_inputs(tmp_path, capsys):
    src = _triples(tmp_path / "in", n=3, size=32)
    _img(48, 48).save(src / "ex2_semantic.png")  # unequal panel sizes for ex2
    (src / "ex1.txt").unlink()  # no caption for ex1
    out = tmp_path / "out"
    with pytest.raises(DiffalignError, match="'ex1' has no caption"):
        make_triptychs(src, out, panel_size=32)
    assert not (out / "captions.jsonl").exists() and not (out / "images").exists()
    assert main(["fill", "make-triptychs", "--input", str(src), "--out", str(out),
                 "--default-prompt", "x"]) == 2  # fmt: skip
    assert "panels of unequal size (visible 32x32, target 32x32, semantic 48x48)" in (
        capsys.readouterr().err
    )
    summary = make_triptychs(src, out, panel_size=32, skip_bad=True)
    assert summary["written"] == 1 and summary["skipped"] == 2
    assert main(["fill", "make-triptychs", "--input", str(src), "--out", str(tmp_path / "o2"),
                 "--panel-size", "40"]) == 2  # fmt: skip
    assert "multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()

    # jsonl input with relative paths and an explicit name.
    listing = tmp_path / "list.jsonl"
    listing.write_text(
        json.dumps(
            {
                "visible": "in/ex0_visible.png",
                "target": "in/ex0_target.png",
                "semantic": "in/ex0_semantic.png",
                "prompt": "p",
                "name": "a",
            }
        )
        + "\n"  # fmt: skip
    )
    sets = find_panel_sets(listing)
    assert sets[0].name == "a" and sets[0].paths["target"] == src / "ex0_target.png"
    out3 = tmp_path / "o3"
    assert make_triptychs(listing, out3, panel_size=16)["written"] == 1
    assert (out3 / "images" / "a.png").is_file()
    listing.write_text(json.dumps({"visible": "in/ex0_visible.png", "prompt": "p"}) + "\n")
    with pytest.raises(DiffalignError, match="missing target, semantic"):
        find_panel_sets(listing)
    (src / "ex0_target.png").unlink()
    with pytest.raises(DiffalignError, match="'ex0' has no target image"):
        find_panel_sets(src)


def test_make_triptychs_max_panel_size(tmp_path, capsys):
    """Native panels above --max-panel-size are resized down to it (old code kept any size);
    a --panel-size above it is one error line, nothing written."""
    src = tmp_path / "in"
    src.mkdir()
    for name, size in (("big", 64), ("ok", 48)):
        for k, role in enumerate(("visible", "target", "semantic")):
            _img(size, size, seed=k).save(src / f"{name}_{role}.png")
        (src / f"{name}.txt").write_text(name)
    out = tmp_path / "out"
    argv = ["fill", "make-triptychs", "--input", str(src), "--output-dir", str(out)]
    assert main([*argv, "--keep-size", "--max-panel-size", "48"]) == 0
    assert "resized 1 triples with panels above --max-panel-size down to 48px" in (
        capsys.readouterr().out
    )
    for name in ("big", "ok"):
        assert Image.open(out / "images" / f"{name}.png").size == (144, 48)
    # the big target panel is PIL's bicubic resize of the input, the 48 px one is untouched
    big = np.asarray(Image.open(out / "images" / "big.png"))
    ref = _img(64, 64, seed=1).resize((48, 48), Image.Resampling.BICUBIC)
    assert np.array_equal(big[:, 48:96], np.asarray(ref))
    ok = np.asarray(Image.open(out / "images" / "ok.png"))
    assert np.array_equal(ok[:, 48:96], np.asarray(_img(48, 48, seed=1)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_panel_size"] == 48 and summary["resized_down"] == 1

    for extra, message in (
        (["--panel-size", "64", "--max-panel-size", "48"], "--panel-size 64 is above "
         "--max-panel-size 48 (default 1024, FLUX.1's resolution); raise --max-panel-size"),
        (["--max-panel-size", "40"], "--max-panel-size must be a positive multiple of 16"),
    ):  # fmt: skip
        o2 = tmp_path / "o2"
        assert main(["fill", "make-triptychs", "--input", str(src), "--out", str(o2), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not o2.exists()


def test_make_triptychs_default_max_panel_size_is_flux_resolution(tmp_path, capsys):
    from diffalign.fill.data import MAX_PANEL_SIZE

    assert MAX_PANEL_SIZE == 1024
    with pytest.raises(SystemExit):
        main(["fill", "make-triptychs", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max_panel_size MAX_PANEL_SIZE largest panel side" in help_text
    assert f"(default: {MAX_PANEL_SIZE}, FLUX.1's resolution" in help_text
    src = _triples(tmp_path / "in", n=1, size=1040)  # divisible by 16, above 1024
    summary = make_triptychs(src, tmp_path / "out", panel_size=None)
    assert Image.open(tmp_path / "out" / "images" / "ex0.png").size == (3072, 1024)
    assert summary["resized_down"] == 1


def test_captions_saved_with_a_byte_order_mark(tmp_path):
    """A captions.jsonl or a NAME.txt side file saved with a UTF-8 byte-order mark: the jsonl's
    first record was skipped as 'corrupt record', a side file's caption kept U+FEFF (str.strip
    keeps it)."""
    root = _dataset_folder(tmp_path / "d")
    rows = [{"image": "good1.png", "prompt": "first"}, {"image": "good2.jpg", "prompt": "second"}]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    (root / "captions.jsonl").write_bytes(("\ufeff" + text).encode())
    ds = TriptychDataset(root)
    assert [r.prompt for r in ds.records] == ["first", "second"]
    (root / "captions.jsonl").unlink()
    (root / "good1.txt").write_bytes("\ufeffa red bus\n".encode())
    (root / "good2.txt").write_bytes(b"a blue car\n")
    ds = TriptychDataset(root)
    assert sorted(r.prompt for r in ds.records) == ["a blue car", "a red bus"]
