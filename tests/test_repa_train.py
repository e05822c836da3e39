"""U-REPA training end to end on tiny models: train -> stop -> resume == straight run -> validate
-> extract -> probe, and the bad inputs of spec R (seed 003 sections 4-7, 11)."""

import csv
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import load_tensors, save_tensors
from diffalign.engine.lmdb_store import TensorLMDBWriter

CLASSES = 4
PER_CLASS = 6  # per split
GRID = 4
TEACHER_DIM = 32  # the tiny dinov2's width


def build_data_dir(
    root: Path, seed: int = 0, token_dim: int = TEACHER_DIM, cross_dim: int = 32, channels: int = 4
):
    """A preprocessed store in the real layout: class-dependent latents, tokens and images."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    lat_means = torch.randn(CLASSES, channels, 8, 8, generator=g)
    tok_means = torch.randn(CLASSES, GRID * GRID, token_dim, generator=g)
    zbuf = io.BytesIO()
    with (
        TensorLMDBWriter(root / "vae_latents.lmdb", (channels, 8, 8)) as lat,
        TensorLMDBWriter(root / "dino_tokens.lmdb", (GRID * GRID, token_dim)) as tok,
        zipfile.ZipFile(zbuf, "w") as zf,
    ):
        for split in ("train", "val"):
            for c in range(CLASSES):
                for k in range(PER_CLASS):
                    sid = f"n0000000{c}_{split}{k}"
                    rows.append({"id": sid, "wnid": f"n0000000{c}", "label": c, "split": split})
                    lat.put(sid, lat_means[c] + 0.5 * torch.randn(channels, 8, 8, generator=g))
                    t = tok_means[c] + 0.5 * torch.randn(GRID * GRID, token_dim, generator=g)
                    tok.put(f"{sid}_mid", torch.nn.functional.normalize(t, dim=-1))
                    color = (60 * c, 255 - 60 * c, (37 * k) % 255)
                    img = Image.new("RGB", (64, 64), color)
                    b = io.BytesIO()
                    img.save(b, format="JPEG", quality=95)
                    zf.writestr(f"{sid}.jpg", b.getvalue())
    (root / "images.zip").write_bytes(zbuf.getvalue())
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "wnid", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    emb = torch.randn(CLASSES + 1, 77, cross_dim, generator=g).half()
    write_class_embeddings(root / "clip_embeddings.safetensors", emb)
    return root


def write_class_embeddings(path: Path, emb: torch.Tensor) -> None:
    """The layout `repa preprocess clip` writes: `embeddings` + the prompts in the metadata."""
    prompts = [f"a photo of a class{c}" for c in range(emb.shape[0] - 1)] + [""]
    save_tensors(path, {"embeddings": emb}, {"prompts": json.dumps(prompts)})


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from diffalign.cli import main

    out = tmp_path_factory.mktemp("tiny-sd15")
    assert main(["make-tiny", "sd15", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_data_dir(tmp_path_factory.mktemp("repa-data") / "data")


def tiny_cfg(data_dir, sd15, out, **kw):
    from diffalign.repa.config import load_config

    values = {
        "data_dir": str(data_dir),
        "model": sd15,
        "output_dir": str(out),
        "grid": GRID,
        "head_hidden_dim": 16,
        "batch_size": 4,
        "num_workers": 0,
        "max_steps": 4,
        "align_warmup_steps": 2,
        "mixed_precision": "no",
        "ema_decay": 0.9,
        "validate_every": 2,
        "checkpoint_every": 2,
        "keep_checkpoints": 0,
        "log_every": 1,
        "tracker": "none",
        "max_val_samples": 8,
        "lr": 1e-3,
    }
    values.update(kw)
    return load_config(None, values)


def _losses(history):
    return [(e["step"], e["loss"], e["token"], e["manifold"]) for e in history if "val" not in e]


def test_train_stop_resume_matches_straight_run(data_dir, sd15, tmp_path, monkeypatch):
    from diffalign.repa.train import RepaTask, train_repa

    straight = train_repa(tiny_cfg(data_dir, sd15, tmp_path / "a"), progress=False)
    assert straight.step == 4

    original = RepaTask.training_step

    def crash_at_3(self, batch, step, ctx):
        if step == 2:  # the 3rd step, after checkpoint-2 was written
            raise KeyboardInterrupt
        return original(self, batch, step, ctx)

    monkeypatch.setattr(RepaTask, "training_step", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_repa(tiny_cfg(data_dir, sd15, tmp_path / "b"), progress=False)
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2" / "state.json").is_file()
    monkeypatch.setattr(RepaTask, "training_step", original)
    resumed = train_repa(tiny_cfg(data_dir, sd15, tmp_path / "b"), resume="latest", progress=False)
    assert resumed.step == 4
    a, b = _losses(straight.history), _losses(resumed.history)
    assert a == b  # bit-identical on CPU
    for name in ("unet", "heads"):
        ta, _ = load_tensors(tmp_path / "a" / "checkpoint-final" / f"{name}.safetensors")
        tb, _ = load_tensors(tmp_path / "b" / "checkpoint-final" / f"{name}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    # validation on the EMA weights logged the four seed metrics
    val = [e for e in straight.history if "val" in e]
    assert [e["step"] for e in val] == [2, 4]
    for key in ("val/total", "val/diffusion", "val/token", "val/manifold"):
        assert all(torch.isfinite(torch.tensor(e[key])) for e in val)
    # lambda warmed up 0 -> 0.5 over 2 steps, the total follows the seed's formula
    train_e = [e for e in straight.history if "val" not in e]
    assert [e["align_coeff"] for e in train_e] == [0.0, 0.25, 0.5, 0.5]
    e = train_e[-1]
    assert e["loss"] == pytest.approx(
        e["diffusion"] + 0.5 * (e["token"] + 3.0 * e["manifold"]), rel=1e-5
    )
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["skipped_nonfinite"] == 0
    assert summary["task"]["anomalies"]["manifold_capped_steps"] == 0
    assert (tmp_path / "a" / "train_history.png").is_file()
    export = tmp_path / "a" / "checkpoint-final"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((export / "repa_model.json").read_text())["spec"]["teacher_dim"] == 32


def test_dataset_yields_class_embedding_or_the_null_one_under_cfg_dropout(data_dir):
    """Spec R: the dataset yields latent, teacher tokens and class embedding (the empty
    prompt's under classifier-free dropout), the draws fixed by (seed, epoch, index)."""
    from diffalign.repa.data import RepaDataset, load_class_table

    table = load_class_table(data_dir)
    null = table[-1]
    plain = RepaDataset(data_dir, "train")
    item = plain[5]
    assert torch.equal(item["class_embedding"], table[item["label"]]) and not item["cfg_dropped"]
    assert item["latent"].shape == (4, 8, 8) and item["tokens"].shape == (GRID * GRID, 32)
    everything = RepaDataset(data_dir, "train", cfg_dropout=1.0)
    b = everything.__getitems__([0, 7, 13])
    assert b["cfg_dropped"].all() and all(torch.equal(e, null) for e in b["class_embedding"])

    ds = RepaDataset(data_dir, "train", cfg_dropout=0.5, seed=3)
    idx = list(range(len(ds)))

    def draws(epoch):
        ds.set_epoch(epoch)
        batch = ds.__getitems__(idx)
        for i, (emb, dropped) in enumerate(zip(batch["class_embedding"], batch["cfg_dropped"])):
            assert torch.equal(emb, null if dropped else table[ds.labels[i]])
            one = ds[i]  # one sample at a time draws the same
            assert bool(one["cfg_dropped"]) == bool(dropped)
            assert torch.equal(one["class_embedding"], emb)
        return batch["cfg_dropped"].tolist()

    d0, d1 = draws(0), draws(1)
    assert 0 < sum(d0) < len(idx) and d0 != d1  # both kinds; a new epoch draws anew
    assert draws(0) == d0  # the same epoch redraws exactly (resume)
    other = RepaDataset(data_dir, "train", cfg_dropout=0.5, seed=4)
    assert other.__getitems__(idx)["cfg_dropped"].tolist() != d0


def test_a_split_without_samples_names_the_manifest_splits(data_dir):
    """`repa extract --split test` (or a train_split the manifest lacks) was only "no 'test'
    samples in the manifest": the error now says which splits it has."""
    from diffalign.repa.data import RepaDataset

    ds = RepaDataset(data_dir, "test")
    assert len(ds) == 0 and ds.manifest_splits == ["train", "val"]
    err = str(ds.empty_split_error())
    assert err == f"{data_dir}: no 'test' samples in the manifest (its splits: 'train', 'val')"


def test_extract_refuses_a_missing_split_before_the_model_loads(data_dir, tmp_path, monkeypatch):
    """`repa extract --split test` loaded the trained U-Net (minutes on SD 1.5) before it read
    the manifest."""
    import diffalign.repa.probe as probe

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(probe, "load_trained", no_loading)
    monkeypatch.setattr(probe, "read_trained", lambda *a, **k: None)  # the run's files: fine
    with pytest.raises(DiffalignError, match="no 'test' samples in the manifest"):
        probe.extract_features(tmp_path, data_dir, tmp_path / "out", split="test")
    assert not (tmp_path / "out").exists()


def test_stop_resume_across_epochs_with_cfg_dropout_and_workers(data_dir, sd15, tmp_path):
    """Resume stays exact when classifier-free dropout draws in DataLoader workers and the run
    crosses epochs (3 batches per epoch)."""
    from diffalign.repa.train import RepaTask, train_repa

    kw = dict(batch_size=8, max_steps=5, cfg_dropout=0.5, num_workers=1, validate_every=0)
    straight = train_repa(tiny_cfg(data_dir, sd15, tmp_path / "a", **kw), progress=False)
    original = RepaTask.training_step

    def crash_at_4(self, batch, step, ctx):
        if step == 3:  # epoch 1, after checkpoint-2 (epoch 0, batch 2)
            raise KeyboardInterrupt
        return original(self, batch, step, ctx)

    try:
        RepaTask.training_step = crash_at_4
        with pytest.raises(KeyboardInterrupt):
            train_repa(tiny_cfg(data_dir, sd15, tmp_path / "b", **kw), progress=False)
    finally:
        RepaTask.training_step = original
    resumed = train_repa(
        tiny_cfg(data_dir, sd15, tmp_path / "b", **kw), resume="latest", progress=False
    )
    assert _losses(straight.history) == _losses(resumed.history)


def test_lora_export_loads_into_the_pipeline(data_dir, sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffalign.repa.train import train_repa

    train_repa(
        tiny_cfg(data_dir, sd15, tmp_path / "r", max_steps=2, validate_every=0), progress=False
    )
    pipe = StableDiffusionPipeline.from_pretrained(sd15, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "r" / "checkpoint-final"))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_resume_from_another_configuration_is_one_line(data_dir, sd15, tmp_path):
    from diffalign.repa.train import train_repa

    train_repa(tiny_cfg(data_dir, sd15, tmp_path / "r", max_steps=2), progress=False)
    ckpt = tmp_path / "r" / "checkpoints" / "checkpoint-2"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    with pytest.raises(DiffalignError, match=r"cannot resume .*lora_rank=8.*lora_rank=4") as e:
        train_repa(
            tiny_cfg(data_dir, sd15, tmp_path / "r", max_steps=2, lora_rank=4),
            resume="latest",
            progress=False,
        )
    assert "\n" not in str(e.value)
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before


def test_resume_with_another_unet_or_data_is_refused(data_dir, sd15, tmp_path):
    """engine.identity (issue 13): the U-Net by resolved path and hashes, the stores by what
    they record; the same model under another spelling of its path resumes."""
    import os
    import shutil

    from diffalign.repa.train import train_repa

    train_repa(tiny_cfg(data_dir, sd15, tmp_path / "r", max_steps=2), progress=False)
    other = shutil.copytree(sd15, tmp_path / "sd15-copy")
    with pytest.raises(DiffalignError, match=r"other settings \(task.models.unet.path\)"):
        cfg = tiny_cfg(data_dir, str(other), tmp_path / "r", max_steps=2)
        train_repa(cfg, resume="latest", progress=False)
    rel = os.path.relpath(sd15)
    cfg = tiny_cfg(data_dir, rel, tmp_path / "r", max_steps=2)
    assert train_repa(cfg, resume="latest", progress=False).step == 2


def test_latents_of_another_vae_are_refused_at_train_start(sd15, tmp_path):
    """Issue 13 item 3: a store whose VAE (recorded scaling factor) is not the trained U-Net's."""
    from diffalign.repa.train import train_repa

    data = build_data_dir(tmp_path / "data")
    with TensorLMDBWriter(data / "vae_latents.lmdb", (4, 8, 8)) as w:
        w.update_meta(scaling_factor=0.13025, latent_channels=4, model="sdxl-vae")
    with pytest.raises(DiffalignError, match=r"sdxl-vae.*0\.13025.*0\.18215") as e:
        train_repa(tiny_cfg(data, sd15, tmp_path / "out"), progress=False)
    assert "\n" not in str(e.value)
    with TensorLMDBWriter(data / "vae_latents.lmdb", (4, 8, 8)) as w:
        w.update_meta(scaling_factor=0.18215)
    assert train_repa(tiny_cfg(data, sd15, tmp_path / "ok", max_steps=1), progress=False).step == 1


def test_manifold_cap_and_anomalies_are_counted(data_dir, sd15, tmp_path):
    from diffalign.repa.train import train_repa

    res = train_repa(
        tiny_cfg(data_dir, sd15, tmp_path / "c", max_steps=2, manifold_cap=1e-9, validate_every=0),
        progress=False,
    )
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["task"]["anomalies"]["manifold_capped_steps"] == 2
    assert all(e["manifold_capped"] == 1.0 for e in res.history if "val" not in e)


def test_nonfinite_step_is_skipped_and_counted(data_dir, sd15, tmp_path):
    import shutil

    from diffalign.engine.lmdb_store import TensorLMDB
    from diffalign.repa.train import train_repa

    bad = tmp_path / "nan"
    shutil.copytree(data_dir, bad)
    key = "n00000001_train2"
    shape = TensorLMDB(bad / "vae_latents.lmdb").shape
    with TensorLMDBWriter(bad / "vae_latents.lmdb", shape) as w:
        w.put(key, torch.full(shape, float("nan")))
    steps = CLASSES * PER_CLASS // 4  # one epoch: exactly one batch holds the NaN latent
    res = train_repa(
        tiny_cfg(bad, sd15, tmp_path / "r", max_steps=steps, validate_every=0, checkpoint_every=0),
        progress=False,
    )
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["skipped_nonfinite"] == 1
    flags = [e["nonfinite_loss"] for e in res.history if "val" not in e]
    assert sum(flags) == 1.0
    for name in ("unet", "heads"):
        t, _ = load_tensors(tmp_path / "r" / "checkpoint-final" / f"{name}.safetensors")
        assert all(torch.isfinite(v).all() for v in t.values())


def test_online_teacher_trains_from_images(data_dir, sd15, tmp_path, tiny_model_dir):
    from diffalign.repa.train import train_repa

    dino = tiny_model_dir("dinov2")
    res = train_repa(
        tiny_cfg(
            data_dir,
            sd15,
            tmp_path / "o",
            teacher="online",
            teacher_model=dino,
            max_steps=1,
            batch_size=2,
            validate_every=0,
            max_val_samples=2,
        ),
        progress=False,
    )
    e = [e for e in res.history if "val" not in e][-1]
    assert 0.0 < e["token"] < 2.0


def test_extract_and_probe(data_dir, sd15, tmp_path):
    from PIL import Image

    from diffalign.cli import main
    from diffalign.repa.train import train_repa

    train_repa(tiny_cfg(data_dir, sd15, tmp_path / "r", max_steps=2), progress=False)
    feats = tmp_path / "feats"
    assert (
        main(
            [
                "repa",
                "extract",
                "--weights",
                str(tmp_path / "r"),
                "--data-dir",
                str(data_dir),
                "--out",
                str(feats),
                "--timestep",
                "500",
                "--pool",
                "mean",
                "--no-progress",
            ]
        )
        == 0
    )
    t, _ = load_tensors(feats / "features.safetensors")
    n = CLASSES * PER_CLASS
    assert t["aligned/mid"].shape == (n, TEACHER_DIM)
    assert t["unaligned/mid"].shape == (n, 16)  # the tiny U-Net's widest level
    assert t["teacher"].shape == (n, TEACHER_DIM) and t["labels"].shape == (n,)
    # from a resumable checkpoint (EMA weights) with first-token pooling
    assert (
        main(
            [
                "repa",
                "extract",
                "--weights",
                str(tmp_path / "r" / "checkpoints" / "checkpoint-2"),
                "--data-dir",
                str(data_dir),
                "--out",
                str(tmp_path / "f2"),
                "--pool",
                "first",
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "probe"
    assert main(["repa", "probe", "--features", str(feats), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    names = {r["features"] for r in s["table"]}
    assert names == {"aligned/mid", "unaligned/mid", "teacher"}
    teacher = next(r for r in s["table"] if r["features"] == "teacher")
    assert teacher["linear_probe_acc"] > 0.5  # class-dependent tokens are separable
    assert Image.open(out / "probe.png").size[0] > 100


def test_bad_inputs_are_one_line(data_dir, sd15, tmp_path, capsys):
    import shutil

    from diffalign.cli import main
    from diffalign.repa.train import train_repa

    # missing key in the token store
    bad = tmp_path / "missing"
    shutil.copytree(data_dir, bad)
    with open(bad / "manifest.csv", "a", newline="") as f:
        f.write("n00000000_extra,n00000000,0,train\n")
    with pytest.raises(DiffalignError, match="have no record .*n00000000_extra"):
        train_repa(tiny_cfg(bad, sd15, tmp_path / "o1"), progress=False)
    # online teacher: an image missing from images.zip
    import zipfile as zf_mod

    noimg = tmp_path / "noimg"
    shutil.copytree(data_dir, noimg)
    with (
        zf_mod.ZipFile(data_dir / "images.zip") as src,
        zf_mod.ZipFile(noimg / "images.zip", "w") as dst,
    ):
        for name in src.namelist():
            if name != "n00000002_train1.jpg":
                dst.writestr(name, src.read(name))
    with pytest.raises(DiffalignError, match=r"images.zip: 1 of 24 .*'n00000002_train1'"):
        train_repa(tiny_cfg(noimg, sd15, tmp_path / "o7", teacher="online"), progress=False)
    # token shape that does not fit the head grid
    with pytest.raises(DiffalignError, match=r"grid 5 needs \[25, D\]"):
        train_repa(tiny_cfg(data_dir, sd15, tmp_path / "o2", grid=5), progress=False)
    # class embeddings of another width than the U-Net's cross-attention
    other = build_data_dir(tmp_path / "other", cross_dim=24)
    with pytest.raises(DiffalignError, match="24 wide"):
        train_repa(tiny_cfg(other, sd15, tmp_path / "o3"), progress=False)
    # latents with another channel count than the U-Net's input
    lat3 = build_data_dir(tmp_path / "lat3", channels=3)
    with pytest.raises(DiffalignError, match=r"shape \[3, 8, 8\]; the U-Net takes 4 channels"):
        train_repa(tiny_cfg(lat3, sd15, tmp_path / "o6"), progress=False)
    # a corrupt record (wrong length) met during training
    import lmdb

    corrupt = tmp_path / "corrupt"
    shutil.copytree(data_dir, corrupt)
    env = lmdb.open(str(corrupt / "vae_latents.lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        cur = txn.cursor()
        for k, _ in cur:
            if k != b"__meta__" and b"train" in k:
                txn.put(k, b"\x00" * 10)
    env.close()
    with pytest.raises(DiffalignError, match="corrupt record") as e:
        train_repa(tiny_cfg(corrupt, sd15, tmp_path / "o4"), progress=False)
    assert "\n" not in str(e.value)
    # config typo through the CLI: one line, exit 2
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(f"data_dir: {data_dir}\nlora_rnak: 4\n")
    assert main(["repa", "train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'lora_rnak'" in err[0]
    # too few samples for one full batch
    with pytest.raises(DiffalignError, match="larger than"):
        train_repa(tiny_cfg(data_dir, sd15, tmp_path / "o5", batch_size=1000), progress=False)


@pytest.mark.slow
def test_two_process_training_under_accelerate_launch(data_dir, sd15, tmp_path):
    import yaml

    from launch_helper import launch_two_cpu_processes

    cfg = {
        "data_dir": str(data_dir),
        "model": sd15,
        "output_dir": str(tmp_path / "run"),
        "grid": GRID,
        "head_hidden_dim": 16,
        "batch_size": 2,
        "num_workers": 0,
        "max_steps": 3,
        "max_train_samples": 8,  # 2 batches per process and epoch: the run enters epoch 1
        "mixed_precision": "no",
        "validate_every": 0,
        "checkpoint_every": 1,
        "tracker": "none",
        "max_val_samples": 4,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # each process records the epochs its training dataset is told (classifier-free dropout
    # draws depend on them; accelerate's own set_epoch skips the dataset with 2 processes)
    script = tmp_path / "train_logging_epochs.py"
    script.write_text(
        "import os, sys\n"
        "from diffalign.repa import data\n"
        "orig = data.RepaDataset.set_epoch\n"
        "def logged(self, epoch):\n"
        f"    with open(os.path.join({str(tmp_path)!r}, 'epochs' + os.environ['RANK']), 'a') as f:\n"
        "        f.write(f'{self.split} {epoch}\\n')\n"
        "    return orig(self, epoch)\n"
        "data.RepaDataset.set_epoch = logged\n"
        "from diffalign.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = launch_two_cpu_processes(
        [str(script), "repa", "train", "--config", str(path), "--no-progress"]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 3
    assert "val/total" in summary["final_val"]
    for rank in "01":
        seen = (tmp_path / f"epochs{rank}").read_text().split("\n")
        assert [x for x in seen if x.startswith("train")] == ["train 0", "train 1"]


@pytest.mark.slow
def test_kill_9_then_resume_matches_straight_run(data_dir, sd15, tmp_path):
    """`diffalign repa train` killed with SIGKILL mid-run resumes to the straight run's losses."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from diffalign.repa.train import train_repa

    over = {"max_steps": 8, "checkpoint_every": 1, "keep_checkpoints": 2, "validate_every": 0}
    straight = train_repa(tiny_cfg(data_dir, sd15, tmp_path / "a", **over), progress=False)
    cfg = tiny_cfg(data_dir, sd15, tmp_path / "b", **over)
    path = tmp_path / "cfg.yaml"
    import dataclasses

    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    cmd = [sys.executable, "-m", "diffalign.cli", "repa", "train", "--config", str(path)]
    proc = subprocess.Popen(cmd + ["--no-progress"], stderr=subprocess.PIPE)
    ckpts = tmp_path / "b" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "checkpoint-2" / "state.json").is_file():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "b" / "checkpoint-final").exists()
    res = subprocess.run(
        cmd + ["--resume", "latest", "--no-progress"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    state = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert state["steps"] == 8
    hist = json.loads((sorted(ckpts.iterdir())[-1] / "state.json").read_text())["history"]
    # another process may sum in another thread order: equal to float32 rounding (the
    # in-process test above checks bit-identity)
    got, want = _losses(hist), _losses(straight.history)
    assert [g[0] for g in got] == [w[0] for w in want] == list(range(1, 9))
    for g, w in zip(got, want):
        assert g[1:] == pytest.approx(w[1:], rel=1e-5)


def test_preprocess_train_resume_extract_probe_pipeline(sd15, tiny_model_dir, tmp_path):
    """The documented pipeline on tiny models and real photos, every step through the CLI."""
    from diffalign.cli import main
    from repa_data import make_imagenet

    src = make_imagenet(tmp_path / "imagenet")
    data = tmp_path / "data"
    dino = tiny_model_dir("dinov2")
    for split in ("train", "val"):
        args = ["--source", str(src), "--data-dir", str(data), "--split", split]
        assert main(["repa", "preprocess", "images", *args, "--resolution", "64"]) == 0
    assert main(["repa", "preprocess", "vae", "--data-dir", str(data), "--model", sd15]) == 0
    assert main(["repa", "preprocess", "dino", "--data-dir", str(data), "--dino-model", dino]) == 0
    assert main(["repa", "preprocess", "clip", "--data-dir", str(data), "--model", sd15]) == 0
    run = tmp_path / "run"
    common = [
        "repa", "train", "--config", str(Path(__file__).parents[1] / "configs" / "repa_track_a.yaml"),
        "--data-dir", str(data), "--model", sd15, "--output-dir", str(run), "--batch-size", "3",
        "--num-workers", "0", "--head-hidden-dim", "16", "--mixed-precision", "no",
        "--validate-every", "2", "--checkpoint-every", "2", "--tracker", "none", "--no-progress",
        "--log-every", "1",
    ]  # fmt: skip
    assert main([*common, "--max-steps", "4"]) == 0
    straight = json.loads((run / "summary.json").read_text())
    # stop after the first checkpoint: run 2 of 4 steps, then resume the rest
    run2 = tmp_path / "run2"
    common2 = [a if a != str(run) else str(run2) for a in common]
    from diffalign.repa.train import RepaTask

    original = RepaTask.training_step
    try:
        RepaTask.training_step = lambda self, b, step, ctx: (
            (_ for _ in ()).throw(KeyboardInterrupt) if step == 2 else original(self, b, step, ctx)
        )
        assert main([*common2, "--max-steps", "4"]) == 130
    finally:
        RepaTask.training_step = original
    assert main([*common2, "--max-steps", "4", "--resume", "latest"]) == 0
    resumed = json.loads((run2 / "summary.json").read_text())
    assert resumed["final_train"] == straight["final_train"]
    assert resumed["final_val"] == straight["final_val"]
    assert set(straight["final_val"]) >= {"val/total", "val/diffusion", "val/token", "val/manifold"}
    feats = tmp_path / "feats"
    ex = ["repa", "extract", "--weights", str(run2), "--data-dir", str(data), "--split", "train"]
    assert main([*ex, "--out", str(feats), "--no-progress"]) == 0
    assert main(["repa", "probe", "--features", str(feats), "--out", str(tmp_path / "probe")]) == 0
    table = json.loads((tmp_path / "probe" / "summary.json").read_text())["table"]
    assert {r["features"] for r in table} == {"aligned/mid", "unaligned/mid", "teacher"}
    assert (tmp_path / "probe" / "probe.png").is_file()


def test_extract_and_probe_bad_inputs(data_dir, tmp_path, capsys):
    from diffalign.cli import main

    out = tmp_path / "out"
    args = ["repa", "extract", "--weights", str(tmp_path), "--data-dir", str(data_dir)]
    assert main([*args, "--out", str(out)]) == 2
    assert not out.exists()  # nothing created for a refused run
    with pytest.raises(SystemExit) as e:  # argparse refuses it: one line, exit 2
        main(["repa", "extract", *args[2:], "--out", str(out), "--pool", "max"])
    assert e.value.code == 2
    assert main(["repa", "probe", "--features", str(tmp_path), "--out", str(out)]) == 2
    bad = tmp_path / "f"
    bad.mkdir()
    save_tensors(bad / "features.safetensors", {"teacher": torch.randn(6, 3)})
    assert main(["repa", "probe", "--features", str(bad), "--out", str(out)]) == 2
    save_tensors(
        bad / "features.safetensors",
        {"teacher": torch.randn(6, 3), "labels": torch.zeros(6, dtype=torch.long)},
    )
    assert main(["repa", "probe", "--features", str(bad), "--out", str(out)]) == 2
    errs = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(errs) == 5 and all("error:" in ln for ln in errs)
    assert "no labels" in errs[3] and "2 classes" in errs[4]
    # non-finite features, float or negative labels: one line, not a traceback
    two = torch.tensor([0, 0, 0, 1, 1, 1])
    for tensors, msg in (
        ({"teacher": torch.full((6, 3), float("nan")), "labels": two}, "non-finite"),
        ({"teacher": torch.randn(6, 3), "labels": two.float() + 0.5}, "integer"),
        ({"teacher": torch.randn(6, 3), "labels": two - 1}, ">= 0"),
    ):
        save_tensors(bad / "features.safetensors", tensors)
        assert main(["repa", "probe", "--features", str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffalign: error:") and msg in err and "\n" not in err


def test_hostile_recorded_spec_is_one_line(tmp_path, capsys):
    """A repa_model.json we wrote, edited by hand: bad values are one error line, not a
    traceback deep in the model code."""
    from diffalign.cli import main
    from diffalign.repa.model import RepaSpec

    good = RepaSpec().to_dict()
    assert RepaSpec.from_dict(good) == RepaSpec.from_dict(dict(good))
    for key, value in (
        ("grid", -3),
        ("teacher_dim", "abc"),
        ("head_hidden_dim", 1.5),
        ("lora_alpha", float("nan")),
        ("lora_dropout", 2.0),
        ("align_layers", "mid"),
        ("lora_conv", "yes"),
    ):
        with pytest.raises(DiffalignError, match=key):
            RepaSpec.from_dict({**good, key: value})
    with pytest.raises(DiffalignError, match="mapping"):
        RepaSpec.from_dict([1, 2])
    w = tmp_path / "w"
    w.mkdir()
    (w / "repa_model.json").write_text(json.dumps({"model": "sd15"}))
    args = ["repa", "extract", "--weights", str(w), "--data-dir", str(tmp_path)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffalign: error:") and "no U-REPA spec" in err


@pytest.mark.slow
def test_extract_two_processes_equals_one(data_dir, sd15, tmp_path):
    from diffalign.cli import main
    from diffalign.repa.train import train_repa
    from launch_helper import launch_two_cpu_processes

    train_repa(tiny_cfg(data_dir, sd15, tmp_path / "r", max_steps=2), progress=False)
    args = ["repa", "extract", "--weights", str(tmp_path / "r"), "--data-dir", str(data_dir)]
    args += ["--batch-size", "5", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    proc = launch_two_cpu_processes(["-m", "diffalign.cli", *args, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, _ = load_tensors(tmp_path / "one" / "features.safetensors")
    two, _ = load_tensors(tmp_path / "two" / "features.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k], two[k]), k  # the 1-process batches: the same bytes
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["num_processes"] == 2


@pytest.mark.slow
@pytest.mark.inductor
def test_compiled_training_equals_eager_and_resumes_exactly(data_dir, sd15, tmp_path, monkeypatch):
    """compile: true (inductor on the CPU; regional: the U-Net's transformer blocks) gives the
    eager losses and weights to fp32 rounding, and a compiled checkpoint resumes bit-exactly."""
    from diffalign.repa.train import RepaTask, train_repa

    kw = dict(validate_every=0, channels_last=True)
    eager = train_repa(tiny_cfg(data_dir, sd15, tmp_path / "a", **kw), progress=False)
    compiled = train_repa(
        tiny_cfg(data_dir, sd15, tmp_path / "c", compile=True, **kw), progress=False
    )
    torch.testing.assert_close(
        [e[1:] for e in _losses(compiled.history)], [e[1:] for e in _losses(eager.history)]
    )
    for name in ("unet", "heads"):
        ta, _ = load_tensors(tmp_path / "a" / "checkpoint-final" / f"{name}.safetensors")
        tc, _ = load_tensors(tmp_path / "c" / "checkpoint-final" / f"{name}.safetensors")
        assert ta.keys() == tc.keys()
        for k in ta:
            torch.testing.assert_close(tc[k], ta[k], rtol=1e-5, atol=1e-6)

    original = RepaTask.training_step

    def crash_at_3(self, batch, step, ctx):
        if step == 2:
            raise KeyboardInterrupt
        return original(self, batch, step, ctx)

    monkeypatch.setattr(RepaTask, "training_step", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_repa(tiny_cfg(data_dir, sd15, tmp_path / "r", compile=True, **kw), progress=False)
    monkeypatch.setattr(RepaTask, "training_step", original)
    resumed = train_repa(
        tiny_cfg(data_dir, sd15, tmp_path / "r", compile=True, **kw),
        resume="latest",
        progress=False,
    )
    assert _losses(resumed.history) == _losses(compiled.history)
    for name in ("unet", "heads"):
        tc, _ = load_tensors(tmp_path / "c" / "checkpoint-final" / f"{name}.safetensors")
        tr, _ = load_tensors(tmp_path / "r" / "checkpoint-final" / f"{name}.safetensors")
        assert all(torch.equal(tc[k], tr[k]) for k in tc)


def test_used_folder_and_mismatched_resume_refused_before_loading(
    data_dir, sd15, tmp_path, capsys, monkeypatch
):
    """`repa train` refuses a used output folder, or a --resume into a run made with other
    settings, before the U-Net (or a teacher) loads: one line, exit 2, nothing lost."""
    import diffalign.repa.train as repa_train
    from diffalign.cli import main

    out = tmp_path / "run"
    values = {
        "data-dir": data_dir, "model": sd15, "output-dir": out, "grid": GRID,
        "head-hidden-dim": 16, "batch-size": 4, "num-workers": 0, "max-steps": 2,
        "mixed-precision": "no", "validate-every": 2, "checkpoint-every": 2, "tracker": "none",
        "max-val-samples": 8, "lr": 1e-3, "align-warmup-steps": 2, "lr-scheduler": "constant",
        "warmup-ratio": 0,
    }  # fmt: skip

    def args(*extra, **changed):
        flags = [a for k, v in {**values, **changed}.items() for a in (f"--{k}", str(v))]
        return ["repa", "train", "--no-progress", *flags, *extra]

    assert main(args()) == 0
    before = {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")}
    loads = []
    real_load = repa_train.load_sd15_unet

    def load(*a, **kw):
        loads.append(a)
        return real_load(*a, **kw)

    monkeypatch.setattr(repa_train, "load_sd15_unet", load)
    for extra, changed, words in (
        (("--resume", "latest"), {"lora-rank": 4}, ("cannot resume", "lora_rank")),
        (("--resume", "latest"), {"seed": 7}, ("cannot resume", "seed")),
        ((), {}, ("already holds a training run", "--resume latest")),
        ((), {"lora-rank": 4}, ("already holds a training run", "--overwrite")),
    ):
        capsys.readouterr()
        assert main(args(*extra, **changed)) == 2, changed
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), (changed, err)
        assert loads == [], changed  # refused before the U-Net loaded
    assert {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")} == before

    # the same settings still resume (the run is complete: it exports again)
    assert main(args("--resume", "latest")) == 0
    assert len(loads) == 1


def test_online_run_from_before_the_teacher_fix_is_not_resumed(
    data_dir, sd15, tmp_path, tiny_model_dir
):
    """Online-teacher runs made before the DINOv2 pixels were normalised once (they were
    normalised twice) record no `teacher_input`: resuming one would mix two teachers."""
    import json

    from diffalign.repa.train import train_repa

    dino = tiny_model_dir("dinov2")
    kw = dict(teacher="online", teacher_model=dino, max_steps=2, max_val_samples=2)
    train_repa(tiny_cfg(data_dir, sd15, tmp_path / "r", **kw), progress=False)
    state_file = tmp_path / "r" / "checkpoints" / "checkpoint-2" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["identity"]["task"]["teacher_input"]  # recorded by this version
    del state["identity"]["task"]["teacher_input"]  # as an older diffalign wrote it
    state_file.write_text(json.dumps(state))
    with pytest.raises(DiffalignError, match=r"other settings \(task.teacher_input\)"):
        train_repa(tiny_cfg(data_dir, sd15, tmp_path / "r", **kw), resume="latest", progress=False)
