import json

import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import (
    atomic_path,
    load_pt,
    load_tensors,
    read_jsonl,
    read_text,
    save_tensors,
    write_json,
)


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_safetensors_roundtrip_and_pt_weights_only(tmp_path):
    t = {"x": torch.randn(3, 4)}
    save_tensors(tmp_path / "t.safetensors", t, {"k": "v"})
    got, meta = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(got["x"], t["x"]) and meta == {"k": "v"}
    torch.save({"x": t["x"], "n": 3}, tmp_path / "t.pt")
    got, meta = load_tensors(tmp_path / "t.pt")
    assert torch.equal(got["x"], t["x"]) and json.loads(meta["n"]) == 3


class Evil:
    pass


def test_pickle_payload_refused(tmp_path):
    torch.save({"obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DiffalignError, match="weights_only"):
        load_pt(tmp_path / "evil.pt")


def test_corrupt_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(DiffalignError, match="cannot read"):
        load_tensors(tmp_path / "bad.safetensors")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(DiffalignError, match="bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")
    assert read_jsonl(tmp_path / "bad.jsonl", skip_bad=True) == [{"a": 1}]


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """A .jsonl (or text file) saved by a Windows editor starts with U+FEFF: it was 'line 1:
    not valid JSON' (read_text kept it in the first line); a BOM inside a line is still JSON's."""
    (tmp_path / "a.jsonl").write_bytes('\ufeff{"prompt": "a cat"}\n{"prompt": "a dog"}\n'.encode())
    assert read_jsonl(tmp_path / "a.jsonl") == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    (tmp_path / "b.jsonl").write_bytes('{"a": 1}\n\ufeff{"a": 2}\n'.encode())
    with pytest.raises(DiffalignError, match="b.jsonl:2: not valid JSON"):
        read_jsonl(tmp_path / "b.jsonl")
    (tmp_path / "c.txt").write_bytes("\ufeffcat\ndog\n".encode())
    assert read_text(tmp_path / "c.txt").splitlines() == ["cat", "dog"]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from diffalign.engine.io import atomic_dir

    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"v": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
