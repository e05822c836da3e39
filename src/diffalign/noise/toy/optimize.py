"""`diffalign noise toy optimize`: the test-time optimisation method end to end on the toy
digits generator, with a proof that it works (spec N; issue "Proof that it works").

The method is :func:`diffalign.noise.optimize.run_optimize`, unchanged; the toy only plugs in
its generator (:class:`ToyOneStepGenerator`) and a reward: the evaluation classifier trained on
the *real* train split (:class:`ToyClassifierReward`, ``log p(class | image)``). Prompts are the
classes. The proof, written to ``summary.json["proof"]``:

1. **reward rises**: per class, the reward at the best step against step 0 (Q = I), and the
   mean over classes of the last step against step 0;
2. **Q stays orthogonal**: ``max |Q^T Q - I|`` over every optimised Q (float32 rounding only);
3. **Q z stays N(0, I) on fresh noise**: with each Q fixed after optimisation, ``Q z`` for
   ``heldout_noise`` fresh latents (never seen by the optimisation) passes the
   Kolmogorov-Smirnov test against N(0, 1) (p above ``alpha / num_classes``), like ``z`` itself;
4. **held-out noise**: the mean reward of ``G(Q z')`` against ``G(z')`` on those fresh latents,
   side by side with the in-sample gain (``proof["table"]``, printed by the CLI). For a Q fixed
   after optimisation ``Q z'`` is exactly N(0, I), so the held-out gain must be zero up to Monte
   Carlo error: checked as ``|gain| <= 4 standard errors`` (paired over the fresh latents) per
   class. The method's gain is test-time, on the noises it optimised.

The reward is only informative when it is not saturated: ``heldout_mean_p_class_identity``
(mean ``p(class | G(z'))`` with Q = I) above 0.99 sets ``reward_saturated`` and the CLI says to
use a weaker generator (e.g. ``train-gan --max-steps 300``), where log p has room to rise.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from diffalign.engine.errors import DiffalignError
from diffalign.noise.optimize import OptimizeSettings, check_patch_size, run_optimize

KS_ALPHA = 0.01
ORTHOGONALITY_TOL = 1e-5
HELDOUT_SE = 4.0  # the held-out gain must stay within this many standard errors of 0
SATURATED_P = 0.99  # mean p(class) above which log p has no room to rise


def toy_optimize(
    generator_ckpt: str | os.PathLike, output_dir: str | os.PathLike, **kwargs: Any
) -> dict[str, Any]:
    """Optimise one Q per class against the classifier reward and write the proof (module doc;
    keyword options as :func:`_toy_optimize`). Holds the output folder's lock for the whole run:
    the classifier it trains into ``output_dir/classifier`` is written under it too."""
    from diffalign.engine.io import output_lock

    with output_lock(output_dir, "output folder"):
        return _toy_optimize(generator_ckpt, output_dir, **kwargs)


def _toy_optimize(
    generator_ckpt: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    reward: str = "classifier",
    dataset: str | None = None,
    data_dir: str | None = None,
    classifier_ckpt: str | None = None,
    classifier_steps: int = 600,
    classes: list[str] | None = None,
    settings: OptimizeSettings | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    heldout_noise: int = 4096,
    save_every: int = 1,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Optimise one Q per class against the classifier reward and write the proof (module doc)."""
    from diffalign.engine.io import write_json
    from diffalign.noise.diagnostics import gaussianity_report
    from diffalign.noise.orthogonal import apply_patch_orthogonal, orthogonality_error
    from diffalign.noise.toy.models import load_model
    from diffalign.noise.toy.onestep import ToyClassifierReward, ToyOneStepGenerator

    if reward != "classifier":
        raise DiffalignError(f"unknown toy reward '{reward}'; the toy branch has: classifier")
    if heldout_noise < 2:
        raise DiffalignError("--heldout-noise must be at least 2")
    settings = settings or OptimizeSettings(steps=60, lr=0.05, images_per_prompt=16)
    g_model, g_cfg = load_model(generator_ckpt, "generator", dataset)
    dataset = g_cfg.dataset
    out = Path(output_dir)
    if (out / "summary.json").exists() and not overwrite:
        raise DiffalignError(
            f"--output-dir {out} already holds a run (summary.json); pass --overwrite"
        )
    gen = ToyOneStepGenerator(g_model)
    check_patch_size(gen, settings.patch_size, None, None)  # before the classifier trains
    prompts = classes or [str(c) for c in range(g_cfg.num_classes)]
    for p in prompts:  # one clear line for a bad class before any work (the classifier)
        gen.encode_prompts([p])
    if classifier_ckpt:
        classifier, _ = load_model(classifier_ckpt, "classifier", dataset)
        classifier_source = str(classifier_ckpt)
    else:
        from diffalign.noise.toy.data import load_dataset
        from diffalign.noise.toy.evaluate import train_classifier

        classifier = train_classifier(
            load_dataset(dataset, "train", data_dir),
            out / "classifier",
            classifier_steps,
            seed=seed,
            overwrite=True,
            progress=show_progress,
        )
        classifier_source = str(out / "classifier")
    rew = ToyClassifierReward(classifier, dataset)
    report = run_optimize(
        gen,
        rew,
        prompts,
        out,
        settings,
        batch_size=batch_size or len(prompts),
        seed=seed,
        save_every=save_every,
        overwrite=True,  # checked above (the classifier may already be in the folder)
        run_info={
            "command": "noise toy optimize",
            "generator": str(generator_ckpt),
            "dataset": dataset,
            "reward": "classifier",
            "classifier": classifier_source,
        },
        show_progress=show_progress,
    )
    results = report.results
    g = torch.Generator().manual_seed(90_000 + seed)
    fresh = gen.sample_noise(heldout_noise, generator=g)
    per_class = []
    ks_threshold = KS_ALPHA / len(results)
    z_report = gaussianity_report(fresh, fresh, patch_size=settings.patch_size)
    for res in results:
        if not res.ok:
            per_class.append({"prompt": res.prompt, "status": "failed", "error": res.error})
            continue
        q = res.q_best
        qz = apply_patch_orthogonal(fresh, q, settings.patch_size)
        rep = gaussianity_report(fresh, qz, q=q, patch_size=settings.patch_size)
        with torch.no_grad():
            emb = gen.encode_prompts([res.prompt] * heldout_noise)
            v_base = rew(gen.generate(fresh, emb), [res.prompt] * heldout_noise).double()
            v_q = rew(gen.generate(qz, emb), [res.prompt] * heldout_noise).double()
        r_base, r_q = float(v_base.mean()), float(v_q.mean())
        gain, gain_se = paired_gain(v_q, v_base)
        h = res.reward_history
        per_class.append(
            {
                "prompt": res.prompt,
                "status": "ok",
                "reward_step0": h[0],
                "reward_best": res.best_reward,
                "reward_last": h[-1],
                "best_step": res.best_step,
                "reward_rises": res.best_reward > h[0],
                "orthogonality_error": max(
                    orthogonality_error(q), orthogonality_error(res.q_final)
                ),
                "fresh_qz_ks_statistic": rep["z2"]["ks_statistic"],
                "fresh_qz_ks_pvalue": rep["z2"]["ks_pvalue"],
                "fresh_qz_patch_cov_error_fro_over_d": rep["z2"]["patch_cov_error_fro_over_d"],
                "fresh_qz_patch_norm_max_abs_diff": rep["patch_norm_max_abs_diff"],
                "heldout_noise_reward_identity": r_base,
                "heldout_noise_reward_q": r_q,
                "heldout_noise_gain": gain,
                "heldout_noise_gain_se": gain_se,
                "heldout_gain_within_noise": abs(gain) <= HELDOUT_SE * gain_se,
                "heldout_mean_p_class_identity": float(v_base.exp().mean()),
            }
        )
    ok = [c for c in per_class if c["status"] == "ok"]
    if not ok:
        raise DiffalignError("every class failed; see failures.jsonl")
    mean_curve = report.summary.get("mean_reward_per_step", [])
    proof = {
        "num_classes": len(per_class),
        "heldout_noise": heldout_noise,
        "ks_alpha": KS_ALPHA,
        "ks_threshold_per_class": ks_threshold,
        "fresh_z_ks_pvalue": z_report["z"]["ks_pvalue"],
        "fresh_z_ks_statistic": z_report["z"]["ks_statistic"],
        "mean_reward_step0": mean_curve[0] if mean_curve else math.nan,
        "mean_reward_last": mean_curve[-1] if mean_curve else math.nan,
        "mean_reward_best": sum(c["reward_best"] for c in ok) / len(ok),
        "fraction_classes_reward_rises": sum(c["reward_rises"] for c in ok) / len(ok),
        "max_orthogonality_error": max(c["orthogonality_error"] for c in ok),
        "min_fresh_qz_ks_pvalue": min(c["fresh_qz_ks_pvalue"] for c in ok),
        "max_fresh_qz_ks_statistic": max(c["fresh_qz_ks_statistic"] for c in ok),
        "mean_heldout_noise_reward_identity": sum(c["heldout_noise_reward_identity"] for c in ok)
        / len(ok),
        "mean_heldout_noise_reward_q": sum(c["heldout_noise_reward_q"] for c in ok) / len(ok),
        "heldout_mean_p_class_identity": sum(c["heldout_mean_p_class_identity"] for c in ok)
        / len(ok),
        "table": proof_table(ok),
        "per_class": per_class,
    }
    proof["reward_saturated"] = bool(proof["heldout_mean_p_class_identity"] > SATURATED_P)
    proof["checks"] = {
        "reward_rises": bool(
            proof["fraction_classes_reward_rises"] == 1.0
            and proof["mean_reward_last"] > proof["mean_reward_step0"]
        ),
        "q_orthogonal": bool(proof["max_orthogonality_error"] < ORTHOGONALITY_TOL),
        "fresh_qz_passes_ks": bool(proof["min_fresh_qz_ks_pvalue"] > ks_threshold),
        "heldout_gain_within_noise": all(c["heldout_gain_within_noise"] for c in ok),
    }
    proof["all_checks_passed"] = all(proof["checks"].values())
    summary = {**report.summary, "proof": proof}
    write_json(out / "summary.json", summary)
    return summary


def paired_gain(after: torch.Tensor, before: torch.Tensor) -> tuple[float, float]:
    """Mean of ``after - before`` over paired samples and its standard error."""
    d = (after - before).double()
    se = float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else math.inf
    return float(d.mean()), se


def proof_table(per_class: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """In-sample (the K noises Q was optimised on) beside held-out (the same Q on fresh noise),
    one row per class and a mean row."""
    keys = {
        "in_sample_step0": "reward_step0",
        "in_sample_best": "reward_best",
        "in_sample_last": "reward_last",
        "heldout_identity": "heldout_noise_reward_identity",
        "heldout_q": "heldout_noise_reward_q",
        "heldout_gain": "heldout_noise_gain",
        "heldout_gain_se": "heldout_noise_gain_se",
    }
    rows = [{"class": c["prompt"], **{k: c[v] for k, v in keys.items()}} for c in per_class]
    mean = {"class": "mean"}
    for k in keys:
        mean[k] = sum(r[k] for r in rows) / len(rows)
    mean["heldout_gain_se"] = math.sqrt(sum(r["heldout_gain_se"] ** 2 for r in rows)) / len(rows)
    return rows + [mean]


def format_proof_table(table: list[dict[str, Any]]) -> str:
    """The table the CLI prints: in-sample and held-out reward (log p(class)) side by side."""
    lines = [
        f"{'class':>8} | {'in-sample: step 0 -> best (last)':>34} | "
        f"{'held-out: Q = I -> Q (gain +- se)':>42}",
        "-" * 92,
    ]
    for r in table:
        lines.append(
            f"{r['class']:>8} | {r['in_sample_step0']:>9.4f} -> {r['in_sample_best']:>8.4f} "
            f"({r['in_sample_last']:>8.4f}) | {r['heldout_identity']:>9.4f} -> "
            f"{r['heldout_q']:>8.4f} ({r['heldout_gain']:+.4f} +- {r['heldout_gain_se']:.4f})"
        )
    return "\n".join(lines)
