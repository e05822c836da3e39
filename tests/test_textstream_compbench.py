"""`diffalign textstream compbench` on the tiny SD3: T2I-CompBench's image layout
(FORMATS.md: T2I-CompBench), resume, refusals, bad input (spec T: Generation)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from diffalign.cli import main
from diffalign.engine.errors import DiffalignError
from diffalign.engine.prompts import load_compbench_prompts

TINY = ["--steps", "1", "--height", "32", "--width", "32"]
# as their files are: CRLF line ends (color_val.txt), periods, commas, apostrophes; a tab (the
# script keeps the text before it) and a blank line
COLOR = b"a green bench and a blue bowl\r\na man's red car.\tignored\r\n\r\n"
SPATIAL = b"a horse on the left of a car\n"


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("diffalign:")]


def official_names(prompts: list[str], n_iter: int) -> list[str]:
    """The names T2I-CompBench's GORS_finetune/inference_eval.py gives a fresh `samples/`
    (batch_size 1): its counter starts at the number of files already there and counts every
    image it saves, across prompts."""
    base_count, names = 0, []
    for prompt in prompts:
        for _ in range(n_iter):
            names.append(prompt + "_" + str(base_count).zfill(6) + ".png")
            base_count += 1
    return names


def evaluator_reads(folder: Path) -> list[tuple[int, str]]:
    """(question_id, prompt) as BLIP_vqa.py / CLIP_similarity.py read `samples/`: sorted by the
    number after the last `_`, the prompt up to the first `_`; numeracy_eval.py's id too."""
    names = os.listdir(folder)
    names.sort(key=lambda x: int(x.split("_")[-1].split(".")[0]))
    for name in names:
        assert int(name.split(".png")[0].split("_")[1]) == int(name.split("_")[-1].split(".")[0])
    return [(int(x.split("_")[-1].split(".")[0]), x.split("_")[0]) for x in names]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the lock, by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".diffalign.lock"
    }


@pytest.fixture(scope="module")
def sd3(tiny_model_dir):
    return tiny_model_dir("sd3")


@pytest.fixture(scope="module")
def full(sd3, tmp_path_factory):
    """A folder of two categories (and a `_val_seen.txt` file, not a category) run with 2
    images a prompt: (prompt folder, output folder)."""
    root = tmp_path_factory.mktemp("compbench")
    data = root / "dataset"
    data.mkdir()
    (data / "color_val.txt").write_bytes(COLOR)
    (data / "spatial_val.txt").write_bytes(SPATIAL)
    (data / "color_val_seen.txt").write_text("a blue bench\n")
    out = root / "out"
    argv = ["textstream", "compbench", "--prompts", str(root), "--outdir", str(out)]
    assert main([*argv, "--model", sd3, "--n-samples", "2", *TINY]) == 0
    return data, out


def test_layout_is_what_the_evaluators_read(full):
    data, out = full
    assert sorted(p.name for p in out.iterdir()) == [
        ".diffalign.lock",
        "color",
        "settings.json",
        "spatial",
        "summary.json",
    ]
    color = ["a green bench and a blue bowl", "a man's red car."]
    spatial = ["a horse on the left of a car"]
    for cat, prompts in (("color", color), ("spatial", spatial)):
        assert [p.name for p in (out / cat).iterdir()] == ["samples"]
        samples = out / cat / "samples"
        assert sorted(os.listdir(samples)) == sorted(official_names(prompts, 2))
        expected = [(c, prompts[c // 2]) for c in range(2 * len(prompts))]
        assert evaluator_reads(samples) == expected
    settings = json.loads((out / "settings.json").read_text())
    assert settings["command"] == "compbench" and settings["categories"] == ["color", "spatial"]
    assert settings["options"]["n_samples"] == 2 and settings["num_prompts"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["prompts_done"], summary["images_written"]) == (3, 6)
    assert load_compbench_prompts(data) == [("color", color), ("spatial", spatial)]


def test_resume_after_partial_run_gives_the_same_files(full, sd3, tmp_path):
    data, out = full
    part = tmp_path / "part"
    argv = ["textstream", "compbench", "--prompts", str(data / "color_val.txt"), "--model", sd3]
    argv += ["--output-dir", str(part), "--n-samples", "2", *TINY]
    assert main([*argv, "--limit", "1"]) == 0
    samples = part / "samples"
    assert sorted(os.listdir(samples)) == official_names(["a green bench and a blue bowl"], 2)
    stamp = (samples / "a green bench and a blue bowl_000000.png").stat().st_mtime_ns
    (samples / ".a man's red car._000002.png.k3j2h1g0.tmp").write_bytes(b"killed")
    assert main(argv) == 0  # the killed run's temporary goes, prompt 0 is kept
    summary = json.loads((part / "summary.json").read_text())
    assert (summary["prompts_done"], summary["prompts_skipped"]) == (1, 1)
    assert (samples / "a green bench and a blue bowl_000000.png").stat().st_mtime_ns == stamp
    # a single file's images are its category's in a folder run: counters and seeds per file
    reference = out / "color" / "samples"
    assert sorted(os.listdir(samples)) == sorted(os.listdir(reference))
    for name in os.listdir(reference):
        assert (samples / name).read_bytes() == (reference / name).read_bytes(), name
    # a prompt with an image missing is redone, the same bytes again
    (samples / "a man's red car._000003.png").unlink()
    assert main(argv) == 0
    assert json.loads((part / "summary.json").read_text())["prompts_done"] == 1
    for name in os.listdir(reference):
        assert (samples / name).read_bytes() == (reference / name).read_bytes(), name


def test_refuses_differing_rerun_and_foreign_images(full, sd3, tmp_path, capsys):
    data, out = full
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*.png")}
    argv = ["textstream", "compbench", "--prompts", str(data.parent), "--model", sd3]
    argv += ["--output-dir", str(copy), "--height", "32", "--width", "32"]
    capsys.readouterr()
    assert main([*argv, "--n-samples", "2", "--steps", "2"]) == 2
    (line,) = error_lines(capsys)
    assert "other settings" in line and "steps: 1 -> 2" in line and "--overwrite" in line
    # another n_samples would leave the old counters beside the new ones: refused even with
    # --overwrite, naming the folder and a file
    assert main([*argv, "--n-samples", "1", "--steps", "1", "--overwrite"]) == 2
    (line,) = error_lines(capsys)
    assert str(copy / "color" / "samples") in line and "would not write" in line
    # an image of another prompt file in a samples/ folder
    (copy / "spatial" / "samples" / "a cat_000007.png").write_bytes(b"x")
    assert main([*argv, "--n-samples", "2", "--steps", "1"]) == 2
    (line,) = error_lines(capsys)
    assert "'a cat_000007.png'" in line and "evaluators" in line
    assert {p: p.read_bytes() for p in copy.rglob("*.png") if p.name != "a cat_000007.png"} == {
        p: before[p] for p in before
    }


def test_rerun_reads_the_same_prompts(full, sd3, tmp_path, capsys):
    """The run records its prompts by content: the same files by another path resume with
    nothing to do; a prompt added to a category (whose images the evaluators would score with
    the old ones') is refused, naming `prompts`, before anything is written."""
    data, out = full
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    argv = ["textstream", "compbench", "--model", sd3, "--output-dir", str(copy)]
    argv += ["--n-samples", "2", *TINY]
    assert main([*argv, "--prompts", str(data)]) == 0  # the fixture read data.parent
    assert json.loads((copy / "summary.json").read_text())["prompts_skipped"] == 3
    more = tmp_path / "more"
    shutil.copytree(data, more)
    with open(more / "spatial_val.txt", "ab") as f:
        f.write(b"a cat on the right of a dog\n")
    before = files(copy)
    capsys.readouterr()
    assert main([*argv, "--prompts", str(more)]) == 2
    (line,) = error_lines(capsys)
    assert "other settings (prompts)" in line and "--overwrite" in line
    assert files(copy) == before


@pytest.mark.parametrize(
    "content, match",
    [
        ("a dog_1\n", "holds '_'"),
        ("a red/blue car\n", "holds '/'"),
        ("a dog\x07\n", "control character"),
        ("a" * 245 + "\n", "too long for a file name (256 bytes"),
        ("\n \n", "has no prompts"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_prompt_files_one_line_nothing_written(sd3, tmp_path, capsys, content, match):
    path = tmp_path / "color_val.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    argv = ["textstream", "compbench", "--prompts", str(path), "--model", sd3]
    capsys.readouterr()
    assert main([*argv, "--output-dir", str(out)]) == 2
    (line,) = error_lines(capsys)
    assert match in line
    if isinstance(content, str) and content.strip():
        assert line.startswith(f"diffalign: error: {path}:1: prompt ")
    assert not out.exists()


def test_prompt_input_errors(tmp_path):
    with pytest.raises(DiffalignError, match="^T2I-CompBench prompt file not found: "):
        load_compbench_prompts(tmp_path / "missing_val.txt")
    (tmp_path / "color.txt").write_text("a red car\n")  # a train file: not a category
    with pytest.raises(DiffalignError, match=r"no T2I-CompBench prompt files \(<category>"):
        load_compbench_prompts(tmp_path)
    # a single file of any name is read; its category is the name without `_val.txt`
    assert load_compbench_prompts(tmp_path / "color.txt") == [("color", ["a red car"])]
    bom = tmp_path / "shape_val.txt"
    bom.write_bytes("\ufeffa round clock\n".encode())
    assert load_compbench_prompts(tmp_path) == [("shape", ["a round clock"])]


def test_overwrite_without_a_run_record_keeps_the_samples_there(full, sd3, tmp_path):
    """`--overwrite` removed every image of `samples/` though no `OUT/settings.json` recorded
    a compbench run there: the official script's images of the prompts past `--limit` went."""
    data, _ = full
    out = tmp_path / "theirs"
    (out / "samples").mkdir(parents=True)
    names = official_names(["a green bench and a blue bowl", "a man's red car."], 1)
    for name in names:
        (out / "samples" / name).write_bytes(b"their image")
    argv = ["textstream", "compbench", "--prompts", str(data / "color_val.txt"), "--model", sd3]
    argv += ["--outdir", str(out), "--n-samples", "1", "--limit", "1", "--overwrite", *TINY]
    assert main(argv) == 0
    assert sorted(os.listdir(out / "samples")) == sorted(names)
    assert (out / "samples" / names[1]).read_bytes() == b"their image"
    assert (out / "samples" / names[0]).read_bytes() != b"their image"  # redone
