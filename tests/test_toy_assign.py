"""Assigned-noise inversion and the resumable matched-noise dataset (spec N, toy branch)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_tensors, read_jsonl
from diffalign.noise.toy.assignment import assign, assign_noise, base_noise
from diffalign.noise.toy.data import load_dataset
from diffalign.noise.toy.models import ToyModelConfig, build_model, load_model, save_model


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    torch.manual_seed(0)
    g = build_model(ToyModelConfig.for_dataset("generator", "digits"))
    out = tmp_path_factory.mktemp("gen")
    save_model(g, out)
    return out


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


def _patchwise_reference(q: torch.Tensor, eps: torch.Tensor, p: int) -> torch.Tensor:
    """Slow reference: loop over patches, flatten each (c, dy, dx), multiply by Q, put back."""
    c, h, w = eps.shape
    out = torch.empty_like(eps)
    for i in range(0, h, p):
        for j in range(0, w, p):
            v = eps[:, i : i + p, j : j + p].reshape(-1)
            out[:, i : i + p, j : j + p] = (q.double() @ v.double()).float().reshape(c, p, p)
    return out


def test_assign_noise_reduces_error_and_stays_orthogonal(gen_dir, digits):
    g, _ = load_model(gen_dir)
    ids = list(range(12))
    eps = base_noise(ids, (4, 4, 4), seed=0)
    res = assign_noise(g, eps, digits.labels[:12], digits.images[:12], steps=40, lr=0.05)
    assert (res.loss_after <= res.loss_before).all()
    assert res.mse_after.mean() < 0.97 * res.mse_before.mean()
    eye = torch.eye(16, dtype=torch.float64)
    qd = res.q.double()
    assert (qd.transpose(1, 2) @ qd - eye).abs().max() < 1e-5
    assert (res.q - torch.eye(16)).abs().max() > 1e-3  # it moved
    for i in range(3):
        assert torch.allclose(res.noise[i], _patchwise_reference(res.q[i], eps[i], 2), atol=1e-5)
        # patch norms are kept exactly
        a = eps[i].unfold(1, 2, 2).unfold(2, 2, 2).pow(2).sum((0, 3, 4))
        b = res.noise[i].unfold(1, 2, 2).unfold(2, 2, 2).pow(2).sum((0, 3, 4))
        assert torch.allclose(a, b, rtol=1e-5)
    # the reported MSE is the MSE of the returned noise
    with torch.no_grad():
        mse = (g(res.noise, digits.labels[:12]) - digits.images[:12]).pow(2).flatten(1).mean(1)
    assert torch.allclose(mse, res.mse_after, atol=1e-6)
    # generator untouched
    assert all(p.grad is None for p in g.parameters())


def test_base_noise_is_per_item_and_seeded():
    a = base_noise([3, 5], (4, 4, 4), seed=1)
    b = base_noise([5], (4, 4, 4), seed=1)
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], base_noise([3], (4, 4, 4), seed=2)[0])


def test_assign_job_resume_and_corrupt_file(gen_dir, digits, tmp_path):
    out = tmp_path / "asg"
    s1 = assign(gen_dir, out, data=digits, max_items=6, assign_steps=5, batch_size=4)
    assert s1["finished"] == 6 and s1["failed"] == 0
    recs = read_jsonl(out / "manifest.jsonl")
    assert [r["id"] for r in recs] == list(range(6))
    assert (out / "orthogonal_gaussian_final.png").is_file()
    assert (out / "orthogonal_gaussian_init.json").is_file()
    meta = json.loads((out / "samples" / "000002" / "meta.json").read_text())
    assert meta["id"] == 2 and meta["label"] == int(digits.labels[2])
    t, _ = load_tensors(out / recs[0]["noise_file"])
    assert set(t) == {"noise", "base_noise", "q", "target"}
    first = t["noise"].clone()

    # resume with more items: the 6 finished are skipped, 4 new ones done
    kw = dict(data=digits, max_items=10, assign_steps=5, batch_size=4, write_plots=False)
    s2 = assign(gen_dir, out, **kw)
    assert s2["skipped_finished"] == 6 and s2["finished"] == 10
    t, _ = load_tensors(out / recs[0]["noise_file"])
    assert torch.equal(t["noise"], first)  # not redone

    # a corrupt noise file is found on resume and redone
    (out / "samples" / "000003" / "noise.safetensors").write_bytes(b"garbage")
    s3 = assign(gen_dir, out, **kw)
    assert s3["redone_corrupt"] == 1 and s3["skipped_finished"] == 9
    ids = [r["id"] for r in read_jsonl(out / "manifest.jsonl")]
    assert ids == list(range(10))  # de-duplicated
    load_tensors(out / "samples" / "000003" / "noise.safetensors")

    # other settings in the same folder are refused
    with pytest.raises(DiffalignError, match="other settings"):
        assign(gen_dir, out, **{**kw, "assign_steps": 7})


def test_a_resume_with_other_processes_keeps_the_redone_record(gen_dir, digits, tmp_path):
    """A killed 2-process run leaves its records in manifest.rank-RR.jsonl; a 1-process resume
    that redoes a damaged item appends its record to manifest.jsonl, and the merge keeps that
    one, not the line of the earlier run (the parts were read last, so their line won)."""
    from diffalign.engine.io import append_jsonl

    out = tmp_path / "asg"
    kw = dict(data=digits, max_items=4, assign_steps=3, batch_size=4, write_plots=False)
    assign(gen_dir, out, **kw)
    recs = read_jsonl(out / "manifest.jsonl")
    (out / "manifest.jsonl").unlink()
    for r in recs:  # the parts a killed 2-process run leaves; item 1's line is another run's
        stale = {**r, "loss_after": 123.0} if r["id"] == 1 else r
        append_jsonl(out / f"manifest.rank-{r['id'] % 2:02d}.jsonl", stale)
    (out / recs[1]["noise_file"]).write_bytes(b"garbage")
    s = assign(gen_dir, out, **kw)
    assert s["redone_corrupt"] == 1 and s["skipped_finished"] == 3
    assert read_jsonl(out / "manifest.jsonl") == recs
    assert not list(out.glob("*.rank-*.jsonl"))


def test_noise_diagnostics_are_base_vs_base_and_base_vs_assigned(gen_dir, digits, tmp_path):
    """The summary's and orthogonal_gaussian_*.json's reports, against `gaussianity_report` on
    the noise files read by hand (init: base vs itself; final: base vs assigned); the shared
    reader (`noise.jobs.finished_noises`, build-dataset's too) leaves unreadable files out."""
    from diffalign.noise.assign import small_report
    from diffalign.noise.diagnostics import gaussianity_report
    from diffalign.noise.jobs import finished_noises

    out = tmp_path / "asg"
    s = assign(gen_dir, out, data=digits, max_items=5, assign_steps=3, write_plots=False)
    files = [load_tensors(out / r["noise_file"])[0] for r in read_jsonl(out / "manifest.jsonl")]
    base = torch.stack([t["base_noise"] for t in files])
    noise = torch.stack([t["noise"] for t in files])
    for key, other in (("init", base), ("final", noise)):
        ref = gaussianity_report(base, other, patch_size=2)
        assert json.loads((out / f"orthogonal_gaussian_{key}.json").read_text()) == ref
        assert s[f"gaussianity_{key}"] == small_report(ref)
    recs = read_jsonl(out / "manifest.jsonl")
    recs[1]["noise_file"] = "samples/nowhere/noise.safetensors"
    del recs[3]["noise_file"]
    eps, assigned = finished_noises(out, recs)
    assert torch.equal(eps, base[[0, 2, 4]]) and torch.equal(assigned, noise[[0, 2, 4]])
    assert finished_noises(out, recs[1:2]) is None


def test_failures_jsonl_gets_bad_item(gen_dir, digits, tmp_path):
    bad = digits.subset(range(5))
    bad.images = bad.images.clone()
    bad.images[2, 0, 3, 3] = float("nan")
    s = assign(gen_dir, tmp_path / "a", data=bad, assign_steps=3, write_plots=False)
    assert s["finished"] == 4 and s["failed"] == 1
    fails = read_jsonl(tmp_path / "a" / "failures.jsonl")
    assert [f["id"] for f in fails] == [2] and "NaN" in fails[0]["error"]
    assert [r["id"] for r in read_jsonl(tmp_path / "a" / "manifest.jsonl")] == [0, 1, 3, 4]


def test_generator_from_another_dataset_is_refused(gen_dir, tmp_path, capsys):
    with pytest.raises(DiffalignError, match="trained on 'digits'"):
        load_model(gen_dir, "generator", "mnist")
    rc = main(
        [
            "noise", "toy", "assign", "--generator-ckpt", str(gen_dir), "--dataset", "mnist",
            "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"),
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "trained on 'digits'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_cli_assign_and_corrupt_manifest_noise(gen_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "noise", "toy", "assign", "--generator_ckpt", str(gen_dir), "--output-dir", str(out),
            "--max_items", "3", "--assign_steps", "2", "--test_split",
        ]
    )  # fmt: skip
    assert rc == 0
    cfg = json.loads((out / "assign_config.json").read_text())
    assert cfg["split"] == "test"
    weights = (gen_dir / "generator.safetensors").read_bytes()  # recorded by its bytes' sha256
    assert cfg["generator_sha256"] == hashlib.sha256(weights).hexdigest()
    # sft on a manifest whose noise file is corrupt: one-line error, nothing lost
    (out / "samples" / "000001" / "noise.safetensors").write_bytes(b"xx")
    rc = main(
        [
            "noise", "toy", "sft", "--generator-ckpt", str(gen_dir), "--manifest-path",
            str(out / "manifest.jsonl"), "--output-dir", str(tmp_path / "sft"), "--max-steps", "1",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "item 1" in err and len(err.splitlines()) == 1
    assert len(read_jsonl(out / "manifest.jsonl")) == 3
