"""One job identity, checked on every re-run and resume (diffalign.engine.identity; issue 13
items 1-5): the mechanism, then one job of each kind refusing a re-run with other settings."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.identity import (
    check_identity,
    identity_differences,
    model_identity,
    path_key,
    weight_file_sha256,
)


def _model(root, weights=b"w" * 64, config='{"a": 1}'):
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text(config)
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    (root / "README.md").write_text("not part of the identity")
    return root


# ---------------------------------------------------------------------------------------------
# the mechanism


def test_paths_compare_equal_relative_absolute_and_symlinked(tmp_path, monkeypatch):
    m = _model(tmp_path / "m")
    (tmp_path / "link").symlink_to(m)
    monkeypatch.chdir(tmp_path)
    a, b, c = model_identity("m"), model_identity(str(m)), model_identity("link")
    assert a == b == c and a["path"] == path_key(m)
    assert path_key("link/vae") == str(m.resolve() / "vae")


def test_weight_and_config_changes_are_detected(tmp_path):
    m = _model(tmp_path / "m")
    before = model_identity(m)
    (m / "README.md").write_text("edited")  # not config, not weights
    assert model_identity(m) == before
    (m / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 64)  # same size
    after = model_identity(m)
    assert identity_differences(before, after) == ["weights"]
    (m / "vae" / "config.json").write_text('{"a": 2}')
    assert identity_differences(after, model_identity(m)) == ["config"]
    copy = shutil.copytree(m, tmp_path / "copy")  # new mtimes, same bytes: only the path differs
    assert identity_differences(model_identity(m), model_identity(copy)) == ["path"]


def test_weight_digest_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import diffalign.engine.identity as ident

    monkeypatch.setenv("DIFFALIGN_HASH_CACHE", str(tmp_path / "cache.json"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    first = weight_file_sha256(f)
    reads = []
    monkeypatch.setattr(ident, "file_sha256", lambda p: reads.append(p) or "other")
    assert weight_file_sha256(f) == first and not reads  # a stat, no read
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(1, 1))
    assert weight_file_sha256(f) == "other" and reads  # a new version is read again


def test_sharded_model_writes_the_digest_cache_once(tmp_path, monkeypatch):
    """A model of N weight shards on a cold cache: the digest cache is written once (it was
    read and rewritten whole per shard), with the same identity as per-file digests."""
    import diffalign.engine.io as io

    monkeypatch.setenv("DIFFALIGN_HASH_CACHE", str(tmp_path / "cache.json"))
    m = _model(tmp_path / "m")
    for i in range(3):
        (m / "vae" / f"shard-{i}.safetensors").write_bytes(bytes([i]) * 100)
    writes = []
    write_json = io.write_json
    monkeypatch.setattr(
        io, "write_json", lambda *a, **k: writes.append(a[0]) or write_json(*a, **k)
    )
    got = model_identity(m)
    assert len(writes) == 1
    files = sorted((m / "vae").glob("*.safetensors"))
    assert json.loads((tmp_path / "cache.json").read_text()) and len(files) == 4
    assert all(weight_file_sha256(f) for f in files) and model_identity(m) == got
    assert len(writes) == 1  # warm: no write


def test_subfolders_limit_what_is_hashed(tmp_path):
    m = _model(tmp_path / "m")
    (m / "unet").mkdir()
    (m / "unet" / "w.safetensors").write_bytes(b"u")
    vae_only = model_identity(m, ("vae",))
    (m / "unet" / "w.safetensors").write_bytes(b"v")
    assert model_identity(m, ("vae",)) == vae_only
    assert model_identity(m) != model_identity(m, ("vae",))


def test_hub_id_is_identified_by_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "models--org--name"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert model_identity("org/name") == {"hub_id": "org/name", "revision": "0123abcd"}
    ident = model_identity("someorg/not-cached-model")
    assert ident == {"hub_id": "someorg/not-cached-model", "revision": None}
    cached = {"hub_id": "someorg/not-cached-model", "revision": "abc"}
    assert identity_differences({"m": ident}, {"m": cached}) == []  # downloaded meanwhile
    assert identity_differences({"m": cached}, {"m": {**cached, "revision": "def"}}) == [
        "m.revision"
    ]


def test_message_names_every_differing_key_and_overwrite():
    old = {"lr": 1e-3, "models": {"vae": {"path": "/a", "weights": "1"}}, "progress": True}
    new = {"lr": 2e-3, "models": {"vae": {"path": "/a", "weights": "2"}}, "progress": False}
    assert identity_differences(old, new, free=("progress",)) == ["lr", "models.vae.weights"]
    with pytest.raises(DiffalignError) as e:
        check_identity(old, new, "out holds a store", free=("progress",))
    msg = str(e.value)
    assert "\n" not in msg and "(lr, models.vae.weights)" in msg and "--overwrite" in msg
    check_identity(old, {**old, "progress": 3}, "x", free=("progress",))  # free keys pass
    check_identity(None, new, "x")  # nothing recorded
    assert identity_differences({"a": (1, 2)}, {"a": [1, 2]}) == []  # JSON-normalised
    assert identity_differences({"a": 1}, {"a": 1, "b": None}) == ["b"]  # missing differs


# ---------------------------------------------------------------------------------------------
# noise sft (items 1 and 5)


@pytest.fixture(scope="module")
def sdxl(tiny_model_dir):
    return tiny_model_dir("sdxl")


@pytest.fixture(scope="module")
def sft_dataset(sdxl, tmp_path_factory):
    from noise_data_helpers import SIZE, model_args, write_pairs

    root = tmp_path_factory.mktemp("idsft")
    data = write_pairs(root / "data", n=2)
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(root / "ds")]
    argv += ["--steps", "1", "--batch-size", "2", "--no-plots", *model_args(sdxl)]
    assert main(argv) == 0
    assert SIZE
    return root / "ds"


def _sft_argv(sdxl, dataset, out, *extra):
    from noise_data_helpers import model_args

    argv = ["noise", "sft", "--manifest-path", str(dataset), "--output-dir", str(out)]
    argv += ["--tracker", "none", "--batch-size", "2", "--lora-rank", "2", *model_args(sdxl)]
    return [*argv, *extra]


def _last_error(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("diffalign")]
    assert len(err) == 1, err
    return err[0]


def test_noise_sft_resume_with_other_settings_is_refused(sdxl, sft_dataset, tmp_path, capsys):
    """Item 1: --resume latest with another --lr, --direct or loss weight is refused; the same
    settings resume (the constant schedule lets --max-steps grow)."""
    out = tmp_path / "run"
    assert main(_sft_argv(sdxl, sft_dataset, out, "--max-steps", "1", "--lr", "1e-3")) == 0
    final = (out / "checkpoint-final" / "pytorch_lora_weights.safetensors").read_bytes()
    for extra, key in (
        (["--lr", "2e-3"], "task.lr"),
        (["--lr", "1e-3", "--direct"], "task.method"),
        (["--lr", "1e-3", "--pixel-l1-weight", "0.5"], "task.pixel_l1_weight"),
    ):
        capsys.readouterr()
        argv = _sft_argv(sdxl, sft_dataset, out, "--max-steps", "2", "--resume", "latest", *extra)
        assert main(argv) == 2
        line = _last_error(capsys)
        assert key in line and "other settings" in line and "--overwrite" in line, line
    assert (out / "checkpoint-final" / "pytorch_lora_weights.safetensors").read_bytes() == final
    argv = _sft_argv(sdxl, sft_dataset, out, "--max-steps", "2", "--resume", "latest")
    assert main([*argv, "--lr", "1e-3"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2


def test_noise_sft_on_a_dataset_of_another_generator(sdxl, sft_dataset, tmp_path, capsys):
    """Item 5: a dataset whose noises another generator assigned is refused in one line naming
    both; --allow-other-generator trains with a warning."""
    ds = shutil.copytree(sft_dataset, tmp_path / "ds")
    cfg = json.loads((ds / "dataset_config.json").read_text())
    assert cfg["model"]["model"]["path"] == path_key(sdxl)  # recorded by identity
    cfg["generator"] = "hyper-sdxl"
    (ds / "dataset_config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    argv = _sft_argv(sdxl, ds, tmp_path / "o", "--max-steps", "1")
    assert main(argv) == 2
    line = _last_error(capsys)
    assert "hyper-sdxl" in line and "sdxl-turbo" in line and "--allow-other-generator" in line
    assert main([*argv, "--allow-other-generator"]) == 0
    assert "warning" in capsys.readouterr().err
    # the same generator on another model folder (a copy is another path) is refused as well
    ok = shutil.copytree(sft_dataset, tmp_path / "ds2")
    other = str(shutil.copytree(sdxl, tmp_path / "model-copy"))
    assert main(_sft_argv(other, ok, tmp_path / "o2", "--max-steps", "1")) == 2
    assert "differs: model.path" in _last_error(capsys)


# ---------------------------------------------------------------------------------------------
# repa preprocess stores (items 2, 3, 13, 16b)


@pytest.fixture
def repa_data(tmp_path):
    from repa_data import make_class_tree

    args = ["repa", "preprocess", "images", "--source", str(make_class_tree(tmp_path / "tree"))]
    assert main([*args, "--data-dir", str(tmp_path / "data"), "--resolution", "64"]) == 0
    return tmp_path / "data"


def _vae(data, model, *extra):
    argv = ["repa", "preprocess", "vae", "--data-dir", str(data), "--model", str(model)]
    return main([*argv, "--batch-size", "4", *extra])


def _store(path):
    from diffalign.engine.lmdb_store import TensorLMDB

    db = TensorLMDB(path)
    try:
        return db.meta, {k: bytes(db.get(k).numpy().tobytes()) for k in db.keys()}
    finally:
        db.close()


def _drop_records(store, keep):
    """The state a kill leaves: only the records of `keep` were committed."""
    import lmdb

    env = lmdb.open(str(store), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for k in [k for k, _ in txn.cursor() if k != b"__meta__" and k.decode() not in keep]:
            txn.delete(k)
    env.close()


def test_vae_store_of_another_model_is_refused_partial_or_complete(
    repa_data, tiny_model_dir, tmp_path, capsys
):
    """Item 2: a store made by another VAE is never completed or relabelled; --overwrite
    rebuilds it and its meta names the new model."""
    sd15 = tiny_model_dir("sd15")
    other = str(shutil.copytree(sd15, tmp_path / "sd15-copy"))
    with open(f"{other}/vae/diffusion_pytorch_model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")  # other weights: another model, same shapes and config
    store = repa_data / "vae_latents.lmdb"
    assert _vae(repa_data, sd15) == 0
    meta, records = _store(store)
    for partial in (False, True):
        if partial:
            _drop_records(store, keep=sorted(records)[:5])
            meta, records = _store(store)
        capsys.readouterr()
        assert _vae(repa_data, other) == 2
        line = _last_error(capsys)
        assert "other settings (model.path, model.weights)" in line and "--overwrite" in line
        assert _store(store) == (meta, records)  # no record written, meta untouched
    capsys.readouterr()
    assert _vae(repa_data, sd15, "--batch-size", "2") == 2  # batches change the bytes
    assert "(batch_size)" in _last_error(capsys)
    assert _vae(repa_data, other, "--overwrite") == 0
    meta, records = _store(store)
    assert meta["model"] == other and len(records) == 12
    assert meta["identity"]["model"]["path"] == path_key(other)


def test_dino_and_clip_of_another_model_are_refused(repa_data, tiny_model_dir, capsys):
    """Item 2: dino and clip likewise keep what another model made."""
    base = ["repa", "preprocess"]
    dino = ["dino", "--data-dir", str(repa_data), "--batch-size", "4", "--dino-model"]
    assert main([*base, *dino, tiny_model_dir("dinov2")]) == 0
    before = _store(repa_data / "dino_tokens.lmdb")
    capsys.readouterr()
    assert main([*base, *dino, tiny_model_dir("dinov2-reg")]) == 2
    assert "model.path" in _last_error(capsys)
    assert _store(repa_data / "dino_tokens.lmdb") == before
    clip = ["clip", "--data-dir", str(repa_data), "--model"]
    assert main([*base, *clip, tiny_model_dir("sd15")]) == 0
    emb = (repa_data / "clip_embeddings.safetensors").read_bytes()
    assert main([*base, *clip, tiny_model_dir("sd15")]) == 0  # the same: skipped
    capsys.readouterr()
    assert main([*base, *clip, tiny_model_dir("sd21")]) == 2
    assert "model.path" in _last_error(capsys)
    assert (repa_data / "clip_embeddings.safetensors").read_bytes() == emb


def test_vae_that_does_not_fit_the_unet_is_refused(repa_data, tiny_model_dir, capsys):
    """Item 3: an SDXL VAE (scaling 0.13025) for a store an SD 1.5 U-Net will train on."""
    sdxl = tiny_model_dir("sdxl")
    assert _vae(repa_data, sdxl) == 2
    line = _last_error(capsys)
    assert "0.13025" in line and "0.18215" in line and "SD 1.5" in line
    assert not (repa_data / "vae_latents.lmdb" / "data.mdb").exists()  # nothing written
    # naming the U-Net that will train (here SDXL's own) accepts its VAE
    assert _vae(repa_data, sdxl, "--unet-model", sdxl) == 0


@pytest.mark.parametrize("text", ["", "label,wnid,name\n", "garbage\x00\nmore\n", "a,b\n1,2\n"])
def test_clip_with_a_corrupt_class_list_keeps_the_embeddings(
    repa_data, tiny_model_dir, capsys, text
):
    """Item 13: an empty or corrupt classes.csv is refused before the embeddings are
    replaced (even with --overwrite)."""
    argv = ["repa", "preprocess", "clip", "--data-dir", str(repa_data)]
    argv += ["--model", tiny_model_dir("sd15")]
    assert main(argv) == 0
    emb = (repa_data / "clip_embeddings.safetensors").read_bytes()
    (repa_data / "classes.csv").write_text(text)
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert main([*argv, *extra]) == 2
        assert "classes.csv" in _last_error(capsys)
        assert (repa_data / "clip_embeddings.safetensors").read_bytes() == emb


def test_clip_class_list_must_cover_the_manifest_labels(repa_data, tiny_model_dir, capsys):
    classes = (repa_data / "classes.csv").read_text().splitlines()
    (repa_data / "classes.csv").write_text("\n".join(classes[:-1]) + "\n")  # one class short
    argv = ["repa", "preprocess", "clip", "--data-dir", str(repa_data)]
    assert main([*argv, "--model", tiny_model_dir("sd15")]) == 2
    assert "has label 2" in _last_error(capsys)


def test_vae_resume_after_a_kill_gives_the_straight_run_bytes(
    repa_data, tiny_model_dir, tmp_path, monkeypatch
):
    """Item 16b: records committed for some items (as a kill -9 leaves them) and a re-run: the
    remaining items run in the batches of an uninterrupted run, so every record is the same."""
    import diffalign.repa.preprocess as pre

    sd15 = tiny_model_dir("sd15")
    straight = shutil.copytree(repa_data, tmp_path / "straight")
    assert _vae(straight, sd15) == 0
    _, want = _store(straight / "vae_latents.lmdb")
    from diffalign.repa.images import read_manifest

    order = [r["id"] for r in read_manifest(repa_data / "manifest.csv")]
    assert _vae(repa_data, sd15) == 0
    _drop_records(repa_data / "vae_latents.lmdb", keep=order[:3])  # killed after 3 puts
    batches = []
    real = pre._load_batch
    monkeypatch.setattr(pre, "_load_batch", lambda z, ids, pool=None: (
        batches.append(list(ids)) or real(z, ids, pool)))  # fmt: skip
    assert _vae(repa_data, sd15) == 0
    assert batches == [order[0:4], order[4:8], order[8:12]]  # the straight run's batches
    assert _store(repa_data / "vae_latents.lmdb")[1] == want


# ---------------------------------------------------------------------------------------------
# fill infer (item 4)


def test_fill_infer_rerun_with_other_settings_is_refused(tiny_model_dir, tmp_path, capsys):
    """Item 4: a re-run with another --guidance or --steps never keeps the old image under a
    summary claiming the new settings; --overwrite regenerates it."""
    from fill_helpers import write_image

    flux = tiny_model_dir("flux-fill")
    vis = write_image(tmp_path / "v.png", (16, 16), seed=1)
    out = tmp_path / "out"
    argv = ["fill", "infer", "--model", flux, "--visible", str(vis), "--prompt", "a photo"]
    argv += ["--output", str(out), "--max-sequence-length", "8", "--steps", "1"]
    assert main(argv) == 0
    image = (out / "v.png").read_bytes()
    for extra, key in ((["--guidance", "3"], "guidance"), (["--steps", "2"], "steps")):
        capsys.readouterr()
        assert main([*argv, *extra]) == 2
        line = _last_error(capsys)
        assert f"other settings ({key})" in line and "--overwrite" in line, line
    assert (out / "v.png").read_bytes() == image
    assert json.loads((out / "summary.json").read_text())["guidance"] == 30.0
    assert main([*argv, "--batch-size", "2"]) == 0  # batching does not decide the pixels
    other = [*argv[:7], "another prompt", *argv[8:]]
    assert main(other) == 2  # the same name with another prompt
    assert "other settings (inputs.v)" in _last_error(capsys)
    assert main([*argv, "--guidance", "3", "--overwrite"]) == 0
    assert json.loads((out / "summary.json").read_text())["guidance"] == 3.0
    assert (out / "v.png").read_bytes() != image


def test_build_dataset_rerun_compares_models_by_identity(
    sdxl, sft_dataset, tmp_path, monkeypatch, capsys
):
    """A relative path to the same model resumes the dataset; another model under another
    path is refused naming it (the record held the --model text before)."""
    from pathlib import Path

    from noise_data_helpers import SIZE

    data = sft_dataset.parent / "data"
    argv = ["noise", "build-dataset", "--data-root", str(data), "--output-dir", str(sft_dataset)]
    argv += ["--steps", "1", "--batch-size", "2", "--no-plots"]
    argv += ["--height", str(SIZE), "--width", str(SIZE)]
    monkeypatch.chdir(Path(sdxl).parent)
    assert main([*argv, "--model", Path(sdxl).name]) == 0
    assert "0 failed" in capsys.readouterr().out
    other = str(shutil.copytree(sdxl, tmp_path / "other"))
    assert main([*argv, "--model", other]) == 2
    assert "other settings (model.model.path)" in _last_error(capsys)


# ---------------------------------------------------------------------------------------------
# text-stream generation folders


def test_textstream_settings_compare_models_by_identity(tmp_path, monkeypatch):
    """settings.json records the model by identity: a relative path to the same folder is the
    same run; other weights under the same path are not (the path text matched before)."""
    from diffalign.textstream.generate import (
        GenerationConfig,
        ResidualConfig,
        _base_settings,
        _settings_diff,
    )

    model = _model(tmp_path / "m")
    monkeypatch.chdir(tmp_path)

    def settings(path, **kw):
        kw.setdefault("steps", 28)  # the CLI fills unset sampling options from the model card
        cfg = GenerationConfig(model=str(path), **kw)
        return json.loads(json.dumps(_base_settings("generate", cfg, ResidualConfig())))

    first = settings(model)
    assert _settings_diff(first, settings("m")) == []
    assert _settings_diff(first, settings("m", steps=5)) == ["steps: 28 -> 5"]
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"changed")
    assert _settings_diff(first, settings(model)) == ["model.weights"]
