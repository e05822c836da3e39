"""`diffalign repa preprocess images|vae|dino|clip` on real photos and tiny models (seed 003 §3)."""

from __future__ import annotations

import csv
import json
import zipfile

import lmdb
import pytest
import torch

from diffalign.cli import main
from diffalign.engine.lmdb_store import TensorLMDB
from diffalign.repa.images import ImageZip, read_classes, read_manifest, select_balanced
from diffalign.repa.preprocess import load_class_embeddings
from repa_data import NAMES, WNIDS, make_class_tree, make_imagenet


def _images(tree, data, *extra):
    args = ["repa", "preprocess", "images", "--source", str(tree), "--data-dir", str(data)]
    return main([*args, "--resolution", "64", *extra])


def test_class_tree_to_zip_and_manifest(tmp_path):
    tree = make_class_tree(tmp_path / "tree")
    assert _images(tree, tmp_path / "data") == 0
    rows = read_manifest(tmp_path / "data" / "manifest.csv")
    with open(tmp_path / "data" / "manifest.csv") as f:
        assert next(csv.reader(f)) == ["id", "wnid", "label", "split"]
    assert len(rows) == 12 and {r["split"] for r in rows} == {"train"}
    # stems repeat across class folders (img0 in each), so ids carry the class
    assert rows[0] == {"id": "china_img0", "wnid": "china", "label": 0, "split": "train"}
    assert [c["name"] for c in read_classes(tmp_path / "data" / "classes.csv")] == [
        "china", "digit", "flower"
    ]  # fmt: skip
    z = ImageZip(tmp_path / "data" / "images.zip")
    assert len(z) == 12
    img = z.read("digit_img2")  # a grayscale PNG became an RGB JPEG
    assert img.mode == "RGB" and img.size == (64, 64)
    with zipfile.ZipFile(tmp_path / "data" / "images.zip") as zf:
        assert zf.read("china_img1.jpg")[:3] == b"\xff\xd8\xff"  # JPEG
    summary = json.loads((tmp_path / "data" / "summary_images.json").read_text())
    assert summary["written"] == 12 and summary["failed"] == 0
    assert summary["layout"] == "class-folders"
    assert not (tmp_path / "data" / ".images_staging").exists()
    # a second run finds everything present
    assert _images(tree, tmp_path / "data") == 0
    summary = json.loads((tmp_path / "data" / "summary_images.json").read_text())
    assert summary["written"] == 0 and summary["already_present"] == 12


def test_num_samples_is_class_balanced_and_deterministic(tmp_path):
    from diffalign.repa.images import scan_source

    src = scan_source(make_class_tree(tmp_path / "tree"))
    a = select_balanced(src.samples, 7, seed=0)
    b = select_balanced(src.samples, 7, seed=0)
    c = select_balanced(src.samples, 7, seed=1)
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    assert [s.sample_id for s in a] != [s.sample_id for s in c]
    counts = sorted(sum(1 for s in a if s.label == k) for k in range(3))
    assert counts == [2, 2, 3]
    assert _images(tmp_path / "tree", tmp_path / "data", "--num-samples", "5") == 0
    rows = read_manifest(tmp_path / "data" / "manifest.csv")
    assert len(rows) == 5 and len({r["label"] for r in rows}) == 3


def test_kaggle_imagenet_label_and_name_files_above_cls_loc(tmp_path):
    """Kaggle's ImageNet: LOC_synset_mapping.txt and LOC_val_solution.csv sit three folders
    above ILSVRC/Data/CLS-LOC/{train,val}; the flat val was refused ('give their labels') and
    train named its classes by wnid ('a photo of a n00000001')."""
    from diffalign.repa.images import scan_source

    kaggle = tmp_path / "imagenet-object-localization-challenge"
    cls_loc = make_imagenet(kaggle / "ILSVRC" / "Data" / "CLS-LOC")
    for name in ("LOC_synset_mapping.txt", "LOC_val_solution.csv"):
        (cls_loc / name).rename(kaggle / name)
    train = scan_source(cls_loc, "train")
    assert [c["name"] for c in train.classes] == ["temple", "flower", "digit"]
    val = scan_source(cls_loc, "val")
    assert val.layout == "imagenet-flat-val"
    assert sorted((s.wnid, s.label) for s in val.samples) == [
        (w, i) for i, w in enumerate(sorted(NAMES))
    ]


@pytest.mark.parametrize("val_labels", ["LOC_val_solution.csv", "val.txt"])
def test_imagenet_layout_train_and_flat_val(tmp_path, val_labels):
    root = make_imagenet(tmp_path / "imagenet", val_labels)
    data = tmp_path / "data"
    assert _images(root, data, "--split", "train") == 0
    assert _images(root, data, "--split", "val") == 0
    rows = read_manifest(data / "manifest.csv")
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert len(train) == 9 and len(val) == 3
    assert train[0] == {"id": "n00000001_10", "wnid": "n00000001", "label": 0, "split": "train"}
    by_id = {r["id"]: r for r in val}
    for n, cls in enumerate(("china", "flower", "digit"), 1):  # make_imagenet's val order
        r = by_id[f"ILSVRC2012_val_{n:08d}"]
        assert r["wnid"] == WNIDS[cls] and r["label"] == sorted(NAMES).index(WNIDS[cls])
    classes = read_classes(data / "classes.csv")
    assert [c["name"] for c in classes] == ["temple", "flower", "digit"]  # first synonym
    assert len(ImageZip(data / "images.zip")) == 12
    assert json.loads((data / "summary_images.json").read_text())["layout"] == "imagenet-flat-val"


def test_bad_sources_are_one_line_errors(tmp_path, capsys):
    tree = make_class_tree(tmp_path / "tree")
    (tree / "empty").mkdir()
    assert _images(tree, tmp_path / "data") == 2
    err = capsys.readouterr().err
    assert err.startswith("diffalign: error: empty class folder") and err.count("\n") == 1
    (tree / "empty").rmdir()
    flat = tmp_path / "flat"
    flat.mkdir()
    (tree / "china" / "img0.jpg").rename(flat / "a.jpg")
    assert _images(flat, tmp_path / "d2") == 2
    assert "--val-labels" in capsys.readouterr().err
    assert _images(tmp_path / "nowhere", tmp_path / "d3") == 2
    assert "no such folder" in capsys.readouterr().err
    assert _images(tree, tmp_path / "d4", "--resolution", "60") == 2
    assert "multiple of 8" in capsys.readouterr().err
    # an unreadable image is counted and skipped, not fatal
    (tree / "flower" / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert _images(tree, tmp_path / "d5") == 0
    assert "1 images could not be read" in capsys.readouterr().err
    summary = json.loads((tmp_path / "d5" / "summary_images.json").read_text())
    assert summary["failed"] == 1 and summary["failures"][0]["id"] == "flower_broken"
    assert "flower_broken" not in {r["id"] for r in read_manifest(tmp_path / "d5" / "manifest.csv")}


def test_manifest_validation(tmp_path):
    from diffalign.engine.errors import DiffalignError

    bad = tmp_path / "m.csv"
    bad.write_text("id,wnid,label,split\n../etc/passwd,n1,0,train\n")
    with pytest.raises(DiffalignError, match="unsafe sample id"):
        read_manifest(bad)
    bad.write_text("id,wnid,label\na,n1,0\n")
    with pytest.raises(DiffalignError, match="missing column"):
        read_manifest(bad)
    bad.write_text("id,wnid,label,split\na,n1,x,train\n")
    with pytest.raises(DiffalignError, match="not an integer"):
        read_manifest(bad)


def test_images_resume_from_staged_files(tmp_path):
    tree = make_class_tree(tmp_path / "tree")
    data = tmp_path / "data"
    staging = data / ".images_staging"
    staging.mkdir(parents=True)
    # a killed run left two staged crops (marked so we can see they are reused, not redone)
    from PIL import Image

    for sid in ("china_img0", "flower_img3"):
        Image.new("RGB", (64, 64), (255, 0, 0)).save(staging / f"{sid}.jpg")
    assert _images(tree, data) == 0
    summary = json.loads((data / "summary_images.json").read_text())
    assert summary["written"] == 10 and summary["resumed_from_staging"] == 2
    assert ImageZip(data / "images.zip").read("china_img0").getpixel((5, 5))[0] > 200


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repa-data")
    tree = make_class_tree(tmp / "tree")
    assert _images(tree, tmp / "data") == 0
    return tmp / "data"


def _pixels(data, sid):
    from diffalign.engine.reports import pil_to_tensor

    return pil_to_tensor(ImageZip(data / "images.zip").read(sid)).unsqueeze(0)


def test_vae_step_latents_resume_and_corrupt_record(data_dir, tiny_model_dir, capsys):
    from diffusers import AutoencoderKL

    sd15 = tiny_model_dir("sd15")
    args = ["repa", "preprocess", "vae", "--data-dir", str(data_dir), "--batch-size", "5"]
    args += ["--model", sd15]  # re-runs keep the batch size: the store records it
    assert main(args) == 0
    db = TensorLMDB(data_dir / "vae_latents.lmdb")
    assert len(db) == 12 and db.shape == (4, 8, 8) and db.dtype == torch.float16
    assert db.meta["scaling_factor"] == pytest.approx(0.18215)
    vae = AutoencoderKL.from_pretrained(sd15, subfolder="vae").eval()
    with torch.no_grad():
        x = _pixels(data_dir, "flower_img2") * 2 - 1
        expected = vae.encode(x).latent_dist.mode()[0] * 0.18215
    assert torch.allclose(db.get("flower_img2").float(), expected, atol=2e-3, rtol=1e-2)
    # corrupt one record: the rerun redoes exactly that one
    db.close()
    env = lmdb.open(str(data_dir / "vae_latents.lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(b"china_img1", b"\x00" * 7)
    env.close()
    assert main(args) == 0
    summary = json.loads((data_dir / "summary_vae.json").read_text())
    assert summary["written"] == 1 and summary["already_present"] == 11
    assert TensorLMDB(data_dir / "vae_latents.lmdb").is_valid("china_img1")
    capsys.readouterr()
    assert main([*args[:-1], str(data_dir)]) == 2  # a data folder is not a model
    assert capsys.readouterr().err.startswith("diffalign: error: ")


def test_dino_step_tokens_and_layout_guard(data_dir, tiny_model_dir, capsys):
    from diffalign.repa.teacher import dino_tokens, load_dino

    dino = tiny_model_dir("dinov2-reg")
    args = ["repa", "preprocess", "dino", "--data-dir", str(data_dir), "--dino-model", dino]
    assert main([*args, "--batch-size", "6"]) == 0
    db = TensorLMDB(data_dir / "dino_tokens.lmdb")
    assert len(db) == 12 and "digit_img0_mid" in db and db.shape == (256, 32)
    assert db.meta["token_layout"] == "grid"
    expected = dino_tokens(load_dino(dino), _pixels(data_dir, "digit_img0"))[0]
    assert torch.allclose(db.get("digit_img0_mid").float(), expected, atol=2e-3)
    assert torch.allclose(db.get("china_img3_mid").float().norm(dim=-1), torch.ones(256), atol=1e-2)
    capsys.readouterr()
    assert main([*args, "--token-layout", "seed"]) == 2  # one store, one layout
    assert "holds grid tokens" in capsys.readouterr().err
    assert main([*args[:-1], str(data_dir / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_clip_step_embeddings(data_dir, tiny_model_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    sd15 = tiny_model_dir("sd15")
    args = ["repa", "preprocess", "clip", "--data-dir", str(data_dir), "--model", sd15]
    assert main([*args, "--batch-size", "2"]) == 0
    emb, prompts = load_class_embeddings(data_dir / "clip_embeddings.safetensors")
    assert prompts == ["a photo of a china", "a photo of a digit", "a photo of a flower", ""]
    tok = CLIPTokenizer.from_pretrained(sd15, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(sd15, subfolder="text_encoder").eval()
    assert emb.shape == (4, 77, enc.config.hidden_size) and emb.dtype == torch.float16
    ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        null = enc(ids)[0][0]
    assert torch.allclose(emb[-1].float(), null, atol=2e-3)
    assert main(args) == 0  # same prompts: nothing to do
    assert json.loads((data_dir / "summary_clip.json").read_text())["shape"] == [4, 77, 32]


def test_clip_step_refuses_a_tokenizer_without_its_vocabulary(
    data_dir, tiny_model_dir, tmp_path, capsys
):
    import shutil

    model = tmp_path / "sd15"
    shutil.copytree(tiny_model_dir("sd15"), model)
    # the slow layout (vocab.json + merges.txt, as SD 1.5's own folder) without merges.txt: the
    # component check passes on vocab.json; the line names the missing file (before: "model not
    # found", from the tokenizer's own error), as the reward loaders do
    tok = model / "tokenizer"
    vocab = json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"]
    (tok / "vocab.json").write_text(json.dumps(vocab))
    for name in ("merges.txt", "tokenizer.json"):
        (tok / name).unlink(missing_ok=True)
    # a copy without the clip embeddings another test may have written (their identity would
    # be checked first)
    data = tmp_path / "data"
    shutil.copytree(data_dir, data, ignore=shutil.ignore_patterns("clip_embeddings*", "*clip*"))
    before = sorted(p.name for p in data.iterdir())
    args = ["repa", "preprocess", "clip", "--data-dir", str(data), "--model", str(model)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer vocabulary" in err and "merges.txt" in err
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written


def test_steps_need_the_images_first(tmp_path, capsys):
    for step in ("vae", "dino", "clip"):
        assert main(["repa", "preprocess", step, "--data-dir", str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err
        assert "run `diffalign repa preprocess images`" in err and err.count("\n") == 1


def test_ranks_compute_the_one_process_batches(monkeypatch):
    """Under N processes every item runs in the batch it has in a 1-process run (the encoders'
    numerics depend on the batch: the identity records its size), and every rank takes part in
    the same number of gathers."""
    from types import SimpleNamespace

    from diffalign.repa import preprocess

    gathers = []

    def gather(state, obj):
        gathers.append(state.process_index)
        return [obj]

    monkeypatch.setattr(preprocess, "_gather_to_main", gather)

    def batches_of(rank: int, world: int, needed=None) -> list[list[int]]:
        seen: list[list[int]] = []
        state = SimpleNamespace(process_index=rank, num_processes=world)
        preprocess._run_sharded(
            state, list(range(7)), 2, lambda b: seen.append(b) or ([], []), None, "t", needed=needed
        )
        return seen

    one = batches_of(0, 1)
    assert one == [[0, 1], [2, 3], [4, 5], [6]]
    for world in (2, 3):
        gathers.clear()
        got = [batches_of(rank, world) for rank in range(world)]
        assert sorted(b for part in got for b in part) == one
        assert all(gathers.count(r) == gathers.count(0) for r in range(world))
    # a resume computes only the batches with unfinished items, the same ones
    assert batches_of(1, 2, needed=lambda b: 3 in b) == [[2, 3]]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, data_dir, tiny_model_dir):
    """All four steps sharded over 2 CPU processes under `accelerate launch` (rank 0 writes)."""
    from pathlib import Path

    from launch_helper import launch_two_cpu_processes

    sd15, dino = tiny_model_dir("sd15"), tiny_model_dir("dinov2")
    tree = make_class_tree(tmp_path / "tree")
    worker = str(Path(__file__).with_name("repa_preprocess_worker.py"))
    proc = launch_two_cpu_processes([worker, str(tree), str(tmp_path / "two"), sd15, dino])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert read_manifest(two / "manifest.csv") == read_manifest(data_dir / "manifest.csv")
    for step in ("images", "vae", "dino", "clip"):
        assert json.loads((two / f"summary_{step}.json").read_text())["num_processes"] == 2
    one_dir = tmp_path / "one"  # the same steps in this process, for comparison
    from diffalign.repa.preprocess import preprocess_dino, preprocess_images, preprocess_vae

    preprocess_images(tree, one_dir, resolution=64)
    preprocess_vae(one_dir, sd15)
    preprocess_dino(one_dir, dino)
    for store in ("vae_latents.lmdb", "dino_tokens.lmdb"):
        a, b = TensorLMDB(two / store), TensorLMDB(one_dir / store)
        assert a.keys() == b.keys() and len(a) == 12
        for k in a.keys():
            assert torch.allclose(a.get(k).float(), b.get(k).float(), atol=2e-3)
    emb, prompts = load_class_embeddings(two / "clip_embeddings.safetensors")
    assert emb.shape[0] == 4 and prompts[-1] == ""
    assert not (two / ".images_staging").exists()


def _zip_size_in_child(z):
    return z.read("china_img0").size


def test_image_zip_reopens_in_workers_and_threads(data_dir):
    import multiprocessing as mp
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    z = ImageZip(data_dir / "images.zip")
    assert z.read("china_img0").size == (64, 64)  # opened in the parent
    assert pickle.loads(pickle.dumps(z))._zip is None
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply(_zip_size_in_child, (z,)) == (64, 64)
    ids = sorted(z.names())
    with ThreadPoolExecutor(4) as ex:
        sizes = list(ex.map(lambda sid: z.read(sid).size, ids * 3))
    assert sizes == [(64, 64)] * 36
    from diffalign.engine.errors import DiffalignError

    with pytest.raises(DiffalignError, match="image 'nope' not found"):
        z.read("nope")


def test_clip_step_bad_model_and_template(data_dir, tmp_path, capsys):
    args = ["repa", "preprocess", "clip", "--data-dir", str(data_dir)]
    other = ["--prompt-template", "a picture of a {name}"]  # not done yet: the model is needed
    assert main([*args, *other, "--model", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*args, "--prompt-template", "a photo"]) == 2
    assert "{name}" in capsys.readouterr().err


def test_vae_step_interrupted_keeps_its_records_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    import diffalign.repa.preprocess as pre

    assert _images(make_class_tree(tmp_path / "tree"), tmp_path / "data") == 0
    real, calls = pre._load_batch, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pre, "_load_batch", dies_on_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        pre.preprocess_vae(tmp_path / "data", tiny_model_dir("sd15"), batch_size=2)
    assert len(TensorLMDB(tmp_path / "data" / "vae_latents.lmdb")) == 4  # 2 batches kept
    monkeypatch.setattr(pre, "_load_batch", real)
    s = pre.preprocess_vae(tmp_path / "data", tiny_model_dir("sd15"), batch_size=2)
    assert s["already_present"] == 4 and s["written"] == 8


def test_clip_class_names_must_match_the_data_folder(data_dir, tmp_path, capsys):
    names = tmp_path / "synset_words.txt"
    names.write_text("china porcelain\nflower rose\ndigit numeral\n")  # another order
    args = ["repa", "preprocess", "clip", "--data-dir", str(data_dir), "--class-names", str(names)]
    assert main(args) == 2
    assert "other classes" in capsys.readouterr().err


def test_imagenet_val_sorted_into_folders(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    for line in (root / "LOC_val_solution.csv").read_text().splitlines()[1:]:
        image_id, pred = line.split(",")
        wnid = pred.split()[0]
        (root / "val" / wnid).mkdir(exist_ok=True)
        (root / "val" / f"{image_id}.JPEG").rename(root / "val" / wnid / f"{image_id}.JPEG")
    (root / "LOC_val_solution.csv").unlink()
    assert _images(root, tmp_path / "data", "--split", "val") == 0
    rows = read_manifest(tmp_path / "data" / "manifest.csv")
    assert {(r["id"], r["wnid"]) for r in rows} == {
        (f"ILSVRC2012_val_{n:08d}", WNIDS[c]) for n, c in enumerate(WNIDS, 1)
    }
    summary = json.loads((tmp_path / "data" / "summary_images.json").read_text())
    assert summary["layout"] == "imagenet-folders"
