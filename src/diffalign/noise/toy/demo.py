"""`diffalign demo`: the whole toy pipeline on scikit-learn's digits (spec N; the README's main job).

Stages (each timed into ``summary["timings"]``):

1. ``train_gan``     base one-step class-conditional generator (hinge GAN, shared loop)
2. ``noise_theory``  `diffalign noise theory` at small size (is ``Q z`` still N(0, I)?)
3. ``classifier``    evaluation classifier on the real train split
4. ``assign``        matched noises for train targets (orthogonal ``Q`` per item)
5. ``direct_sft``    baseline: fine-tune on the same targets with fresh random noise
6. ``matched_sft``   fine-tune on the assigned noises (+ preserve loss vs the frozen base)
7. ``em_cycle``      one more EM cycle after matched SFT: re-assign with the fine-tuned model,
                     fine-tune again (so "em" has had two assign + fine-tune cycles)
8. ``evaluate``      the same held-out evaluation for base / direct / matched / em
9. ``report``        plots, sample grids, report.md, summary.json

Direct and matched SFT use the same targets, loss (reconstruction + the same preserve weight),
steps, batch size and learning rate; the only difference is the input noise.

The output folder must be new or empty; an existing demo folder is replaced only with
``overwrite=True`` (``--overwrite``), and a non-empty folder that is not a demo output is never
deleted.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from diffalign.engine.errors import DiffalignError

METHODS = ("base", "direct", "matched", "em")
METHOD_TITLES = {
    "base": "base GAN",
    "direct": "direct SFT",
    "matched": "matched SFT",
    "em": "EM (+1 cycle)",
}
MARKER = "demo_config.json"


@dataclass
class DemoSizes:
    """How much work each stage does (full run vs --quick)."""

    gan_steps: int = 3000
    gan_batch: int = 128
    gan_grids: int = 4  # validation sample grids during train-gan
    classifier_steps: int = 600
    theory_samples: int = 16384
    theory_opt_steps: int = 100
    theory_per_sample: int = 256
    train_items: int = 512
    assign_steps: int = 100
    sft_epochs: int = 40  # 512 items / batch 64 = 8 steps per epoch -> 320 steps
    sft_batch: int = 64
    sft_lr: float = 2e-4
    preserve_weight: float = 0.25
    eval_samples: int = 1000
    eval_recon_items: int = 300
    eval_assign_steps: int = 100


FULL = DemoSizes()
QUICK = DemoSizes(
    gan_steps=200,
    gan_grids=1,
    classifier_steps=100,
    theory_samples=1024,
    theory_opt_steps=10,
    theory_per_sample=32,
    train_items=64,
    assign_steps=20,
    sft_epochs=4,
    eval_samples=200,
    eval_recon_items=60,
    eval_assign_steps=20,
)


def _prepare_output(out: Path, overwrite: bool) -> None:
    from diffalign.engine.io import LOCK_NAME

    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} is a file")
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if entries:
        if not overwrite:
            raise DiffalignError(
                f"{out} is not empty (an earlier run?); pass --overwrite to replace a demo "
                "output, or choose another --output-dir"
            )
        if not (out / MARKER).is_file():
            raise DiffalignError(
                f"{out} is not empty and is not a diffalign demo output (no {MARKER}); "
                "refusing to delete it: choose another --output-dir"
            )
        for p in entries:  # everything but the lock this run holds
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(
    output_dir: str | os.PathLike = "demo-output",
    quick: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    sizes: DemoSizes | None = None,
) -> dict:
    """Run the toy pipeline on digits and write summary.json, report.md and PNGs; returns the
    summary. The comparison table is printed last on stdout. The folder is locked for the run
    (`engine.io.output_lock`): a second demo into it is refused, not mixed in."""
    from diffalign.engine.io import output_lock

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise DiffalignError(f"--output-dir {out} is a file")
    with output_lock(out, "demo output folder"):
        return _run_demo_locked(out, quick, seed, overwrite, progress, sizes)


def _run_demo_locked(
    out: Path, quick: bool, seed: int, overwrite: bool, progress: bool, sizes: DemoSizes | None
) -> dict:
    import torch

    from diffalign.engine.io import write_json, write_text
    from diffalign.engine.progress import progress as _progress
    from diffalign.noise.toy.assignment import assign
    from diffalign.noise.toy.data import load_dataset
    from diffalign.noise.toy.em_loop import em
    from diffalign.noise.toy.evaluate import (
        EvalSettings,
        evaluate_generator,
        reference_metrics,
        train_classifier,
    )
    from diffalign.noise.toy.finetune import direct_sft, sft
    from diffalign.noise.toy.gan import train_gan
    from diffalign.noise.toy.models import limit_threads, load_model

    limit_threads()
    t_start = time.time()
    s = sizes or (QUICK if quick else FULL)
    _prepare_output(out, overwrite)
    write_json(out / MARKER, {"quick": quick, "seed": seed, "sizes": asdict(s)})
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    stages = [
        "train_gan",
        "noise_theory",
        "classifier",
        "assign",
        "direct_sft",
        "matched_sft",
        "em_cycle",
        "evaluate",
        "report",
    ]
    n_st = len(stages)

    class _Stage:
        def __init__(self, name: str):
            self.name = name

        def __enter__(self):
            self.t0 = time.time()
            _say(f"[{stages.index(self.name) + 1}/{n_st}] {self.name} ...")

        def __exit__(self, *exc):
            timings[self.name] = round(time.time() - self.t0, 3)

    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    train_items = train.subset(range(min(s.train_items, len(train))))

    with _Stage("train_gan"):
        gan = train_gan(
            out / "gan",
            data=train,
            max_steps=s.gan_steps,
            batch_size=s.gan_batch,
            validate_every=max(1, s.gan_steps // max(1, s.gan_grids)),
            seed=seed,
            progress=progress,
        )
    base_ckpt = Path(gan["generator"])

    with _Stage("noise_theory"):
        theory = _noise_theory(out / "noise_theory", s, seed)

    with _Stage("classifier"):
        classifier = train_classifier(
            train, out / "classifier", max_steps=s.classifier_steps, seed=seed, progress=progress
        )

    with _Stage("assign"):
        asg = assign(
            base_ckpt,
            out / "assign",
            data=train_items,
            assign_steps=s.assign_steps,
            seed=seed,
        )
    manifest = out / "assign" / "manifest.jsonl"
    common = dict(
        epochs=s.sft_epochs,
        lr=s.sft_lr,
        batch_size=s.sft_batch,
        preserve_weight=s.preserve_weight,
        seed=seed,
        progress=progress,
    )
    with _Stage("direct_sft"):
        direct = direct_sft(base_ckpt, out / "direct_sft", manifest_path=manifest, **common)
    with _Stage("matched_sft"):
        matched = sft(base_ckpt, manifest, out / "matched_sft", **common)
    with _Stage("em_cycle"):
        em_sum = em(
            matched["generator"],
            out / "em",
            num_cycles=1,
            assign_steps=s.assign_steps,
            base_ckpt=base_ckpt,
            data=train_items,
            write_plots=False,  # the E-step's diagnostics JSON is written; PNGs are in assign/
            **common,
        )

    ckpts = {
        "base": base_ckpt,
        "direct": Path(direct["generator"]),
        "matched": Path(matched["generator"]),
        "em": Path(em_sum["final_generator"]),
    }
    settings = EvalSettings(
        num_samples=s.eval_samples,
        recon_items=s.eval_recon_items,
        assign_steps=s.eval_assign_steps,
        seed=seed,
    )
    results: dict[str, dict] = {}
    generators = {}
    with _Stage("evaluate"):
        reference = reference_metrics(classifier, train, test, settings)
        for name in _progress(METHODS, desc="evaluate", disable=None if progress else True):
            g, _ = load_model(ckpts[name], "generator", "digits")
            generators[name] = g
            results[name] = evaluate_generator(g, classifier, test, settings)

    with _Stage("report"):
        _plots(out, gan, direct, matched, generators)
        summary = {
            "dataset": "digits",
            "quick": quick,
            "seed": seed,
            "sizes": asdict(s),
            "eval_settings": asdict(settings),
            "methods": results,
            "reference": reference,
            "assign": {
                k: asg.get(k) for k in ("finished", "failed", "mse_before_mean", "mse_after_mean")
            },
            "em_cycles": em_sum["cycles"],
            "noise_theory": theory,
            "checkpoints": {k: str(v) for k, v in ckpts.items()},
            "train_sizes": {
                "train_split": len(train),
                "test_split": len(test),
                "sft_targets": len(train_items),
            },
        }
        table = comparison_table(results)
        write_text(out / "report.md", _report_md(summary, table))
    timings["total"] = round(time.time() - t_start, 3)
    summary["timings"] = timings
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", _report_md(summary, table))
    _say(f"\nwrote {out}/summary.json, report.md and PNGs ({timings['total']:.0f} s)")
    _say(table)
    return summary


def _noise_theory(out: Path, s: DemoSizes, seed: int) -> dict:
    """Small `diffalign noise theory` run; its headline numbers go into the summary."""
    try:
        from diffalign.noise.theory import run_noise_theory
    except ImportError:  # the theory module is optional for the demo
        return {"skipped": "diffalign.noise.theory not available"}
    full = run_noise_theory(
        out,
        channels=4,
        patch_size=2,
        num_samples=s.theory_samples,
        batch_size=min(4096, s.theory_samples),
        latent_size=4,
        seed=seed,
        opt_steps=s.theory_opt_steps,
        per_sample_count=s.theory_per_sample,
    )
    keep = {k: full[k] for k in ("all_checks_passed", "checks", "cases") if k in full}
    keep["output_dir"] = str(out)
    return keep


def comparison_table(results: dict[str, dict]) -> str:
    """The demo's table (method | held-out recon MSE | accuracy | FD), methods in fixed order."""
    from diffalign.noise.toy.evaluate import format_table

    return format_table({k: results[k] for k in METHODS if k in results}, METHOD_TITLES)


def _plots(out: Path, gan: dict, direct: dict, matched: dict, generators) -> None:
    import torch

    from diffalign.engine.reports import plot_curves
    from diffalign.noise.toy.gan import fixed_grid_inputs

    def series(history, key):
        pts = [(e["step"], e[key]) for e in history if key in e and "val" not in e]
        return ([p[0] for p in pts], [p[1] for p in pts])

    plot_curves(
        out / "loss_gan.png",
        {
            "discriminator (hinge)": series(gan["history"], "loss_d"),
            "generator (hinge)": series(gan["history"], "loss_g"),
        },
        title="train-gan losses",
        ylabel="loss",
    )
    plot_curves(
        out / "loss_sft.png",
        {
            "direct: recon": series(direct["history"], "recon"),
            "matched: recon": series(matched["history"], "recon"),
            "direct: preserve": series(direct["history"], "preserve"),
            "matched: preserve": series(matched["history"], "preserve"),
        },
        title="SFT losses (same targets, steps, lr; only the input noise differs)",
        ylabel="MSE",
        logy=True,
    )
    # sample grids on the same fixed noise: rows = classes 0..9
    z, labels = fixed_grid_inputs(next(iter(generators.values())).config.latent_shape)
    grids = {}
    with torch.no_grad():
        for name, g in generators.items():
            grids[name] = g.eval()(z, labels)
            from diffalign.engine.reports import save_image_grid

            save_image_grid(
                out / f"samples_{name}.png",
                grids[name],
                ncols=10,
                pad=1,
                upscale=8,
                row_labels=[f"class {c}" for c in range(10)],
                col_labels=[f"z{k}" for k in range(10)],
                title=METHOD_TITLES[name],
            )
    _comparison_figure(out / "samples_comparison.png", grids)
    for name in ("orthogonal_gaussian_init", "orthogonal_gaussian_final"):
        src = out / "assign" / f"{name}.png"
        if src.is_file():
            shutil.copyfile(src, out / f"noise_{name}.png")


def _comparison_figure(path: Path, grids: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffalign.engine.io import atomic_path
    from diffalign.engine.reports import make_grid, tensor_to_pil

    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4.4), dpi=100)
    for ax, (name, imgs) in zip(axes, grids.items()):
        grid = make_grid([tensor_to_pil(x) for x in imgs], ncols=10, pad=1)
        ax.imshow(grid, cmap="gray", interpolation="nearest")
        ax.set_title(METHOD_TITLES[name])
        h, w = imgs.shape[-2:]  # rows = classes, columns = the same 10 noises for every model
        ax.set_yticks([r * (h + 1) + h / 2 for r in range(10)], [f"class {r}" for r in range(10)])
        ax.set_xticks([c * (w + 1) + w / 2 for c in range(10)], [f"z{c}" for c in range(10)])
        ax.tick_params(length=0, labelsize=7)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle("random-noise samples on the same noise (row = class 0..9)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _reading(summary: dict) -> str:
    """One honest paragraph generated from the numbers (no claim the numbers do not make)."""
    r = summary["methods"]
    ref = summary["reference"]
    b, d, m, e = (r[k] for k in METHODS)
    ev = summary["eval_settings"]

    def cmp(x, y, lower_better=True):
        if abs(x - y) <= 1e-3 * max(abs(x), abs(y), 1e-12):
            return "about the same as"
        better = x < y if lower_better else x > y
        return "better than" if better else "worse than"

    parts = [
        f"On held-out digits, assignment with the base generator lowers the reconstruction MSE "
        f"from {b['recon_mse_before']:.4f} (Q = I) to {b['recon_mse_after']:.4f}. "
        f"After fine-tuning, matched SFT reaches {m['recon_mse_after']:.4f} and direct SFT "
        f"{d['recon_mse_after']:.4f} (matched is {cmp(m['recon_mse_after'], d['recon_mse_after'])} "
        f"direct on this metric; EM: {e['recon_mse_after']:.4f}).",
        f"On random noise, class accuracy is base {b['accuracy']:.3f}, direct {d['accuracy']:.3f}, "
        f"matched {m['accuracy']:.3f}, EM {e['accuracy']:.3f} (the classifier itself scores "
        f"{ref['classifier_test_accuracy']:.3f} on real held-out digits), and the Frechet distance "
        f"to held-out digits is base {b['fd']:.2f}, direct {d['fd']:.2f}, matched {m['fd']:.2f}, "
        f"EM {e['fd']:.2f} (real train vs held-out: {ref['fd_real_train_vs_test']:.2f}); "
        f"matched is {cmp(m['fd'], d['fd'])} direct on FD and "
        f"{cmp(m['accuracy'], d['accuracy'], lower_better=False)} it on accuracy. "
        f"Against the base generator (the preserve loss's anchor), matched SFT's FD is "
        f"{cmp(m['fd'], b['fd'])} the base's and direct SFT's is {cmp(d['fd'], b['fd'])} it.",
        f"These are single-seed numbers ({ev['recon_items']} held-out images for reconstruction, "
        f"{ev['num_samples']} samples for accuracy and FD); FD in the classifier's 64-d feature "
        "space from that many samples carries a sampling bias, so read differences smaller than "
        "the real-vs-real reference with caution. EM had one more assign + fine-tune cycle than "
        "matched SFT.",
    ]
    accs = [x["accuracy"] for x in (b, d, m, e)]
    if min(accs) >= ref["classifier_test_accuracy"]:
        parts.append(
            "Accuracy is saturated here (every generator's samples are classified at least as "
            "well as real held-out digits, i.e. they are prototypical), so it does not separate "
            "the methods; FD, which also sees diversity, does."
        )
    if summary.get("quick"):
        parts.append(
            "This was a --quick run: the models are barely trained and the numbers only show "
            "that the pipeline works, not which method is better."
        )
    return " ".join(parts)


def _report_md(summary: dict, table: str) -> str:
    s = summary["sizes"]
    t = summary.get("timings", {})
    lines = [
        "# diffalign demo: orthogonal noise assignment on digits",
        "",
        "What was run (dataset: scikit-learn digits, 8x8, 1,497 train / 300 held-out):",
        "",
        f"1. `train-gan`: hinge GAN, {s['gan_steps']} steps, batch {s['gan_batch']}, EMA 0.999.",
        "2. `noise theory` at small size (`noise_theory/`): fixed Q, optimised shared Q, "
        "per-sample optimised Q.",
        f"3. evaluation classifier on the real train split ({s['classifier_steps']} steps).",
        f"4. `assign`: {s['train_items']} train targets, orthogonal Q per item on 2x2 patches of "
        f"the 4x4x4 latent (D = 16), {s['assign_steps']} Adam steps.",
        f"5. `direct-sft` and 6. `sft` (matched): same {s['train_items']} targets, "
        f"{s['sft_epochs']} epochs, batch {s['sft_batch']}, lr {s['sft_lr']}, preserve weight "
        f"{s['preserve_weight']} against the frozen base; only the input noise differs.",
        "7. `em`: one more cycle after matched SFT (re-assign with the fine-tuned model, "
        "fine-tune again; preserve anchor = base).",
        f"8. evaluation, identical for every method: held-out reconstruction after assignment "
        f"({summary['eval_settings']['recon_items']} held-out items, "
        f"{summary['eval_settings']['assign_steps']} steps), and accuracy / Frechet distance "
        f"of {summary['eval_settings']['num_samples']} random-noise samples.",
        "",
        "## Results",
        "",
        "```",
        table,
        "```",
        "",
        f"Reference: classifier accuracy on real held-out digits "
        f"{summary['reference']['classifier_test_accuracy']:.3f}; FD real train vs held-out "
        f"{summary['reference']['fd_real_train_vs_test']:.3f}.",
        "",
        _reading(summary),
        "",
        "## Files",
        "",
        "- `samples_comparison.png`, `samples_{base,direct,matched,em}.png`: samples on the same "
        "fixed noise (row = class).",
        "- `loss_gan.png`, `loss_sft.png`: training curves; each stage folder has its own "
        "`train_history.png` / `train_summary.json`.",
        "- `noise_orthogonal_gaussian_{init,final}.png`: base noise vs assigned noise "
        "(`assign/*.json` for the numbers); `noise_theory/` for the standalone check.",
        "- `assign/assign_examples.png`: target / G(eps) / G(Q eps) for the first items.",
        "",
    ]
    if t:
        lines += ["## Timings (seconds)", ""]
        lines += [f"- {k}: {v:.1f}" for k, v in t.items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    run_demo(quick="--quick" in sys.argv)
