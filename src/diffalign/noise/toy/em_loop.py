"""EM loop (spec N: EM loop; seed 001 "E-step: reassign matched noises with the current model,
M-step: fine-tune on the updated matched-noise dataset").

Cycle ``k`` lives in ``OUT/cycle-NNN/`` with ``assign/`` (E-step, with the current generator)
and ``sft/`` (M-step, latent-matched SFT starting from the current generator). The next cycle
starts from ``cycle-NNN/sft/checkpoint-final``. The preserve loss of every M-step is taken
against the generator the loop started from (or `base_ckpt`), so the cycles do not drift away
from the base one small step at a time. A finished cycle is skipped when the loop is re-run
(its assignment resumes item by item, an unfinished M-step from its last checkpoint, written
every `checkpoint_every` steps). The E-step of cycle ``k`` draws fresh per-item base noise
with seed ``seed + 1000 k`` (`diffalign.noise.em.cycle_seed`, as `noise em` and the seed's
`run_em_latent_matched_sft` do; cycle 0 uses ``seed``, as a plain `noise toy assign`) and
optimises its orthogonal ``Q`` for the current generator; the seed is recorded in the cycle's
``assign/assign_config.json``, so a resumed run draws the same noises as an uninterrupted one.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import output_lock, write_json

# the advice of a refused M-step resume (`noise toy em` has no --overwrite)
TOY_EM_RESUME_HINT = (
    "resume with the settings it was made with, pass --resume restart to start this M-step "
    "over, or choose another --output-dir"
)


def em(
    generator_ckpt: str | os.PathLike,
    output_dir: str | os.PathLike,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "train",
    num_cycles: int = 2,
    max_items: int | None = None,
    assign_steps: int = 100,
    assign_lr: float = 0.05,
    patch_size: int = 2,
    parametrization: str = "matrix_exp",
    epochs: int | None = 5,
    max_steps: int | None = None,
    lr: float = 1e-4,
    batch_size: int = 64,
    preserve_weight: float = 0.25,
    l1_weight: float = 0.0,
    seed: int = 0,
    base_ckpt: str | os.PathLike | None = None,
    progress: bool = True,
    data=None,
    write_plots: bool = True,
    checkpoint_every: int = 100,
    resume: str = "latest",
    tracker: str = "tensorboard",
) -> dict:
    """Run `num_cycles` assign (E) + matched-SFT (M) cycles; returns (and writes) the summary.
    ``tracker``: each M-step's (`sft`'s), logging to ``cycle-NNN/sft/logs``."""
    from diffalign.noise.toy.finetune import _check_settings
    from diffalign.noise.toy.models import resolve_weights

    if num_cycles < 1:
        raise DiffalignError("--num-cycles must be >= 1")
    if resume not in ("latest", "restart"):
        raise DiffalignError(f"--resume must be latest or restart, got {resume!r}")
    _check_settings(lr, batch_size, preserve_weight, l1_weight)  # before the first E-step
    from diffalign.noise.em import cycle_seed

    if not 0 <= int(seed) or cycle_seed(seed, num_cycles - 1) > 2**63 - 1:  # before cycle 0
        raise DiffalignError(
            f"--seed must be between 0 and 2**63 - 1 - 1000 x (num_cycles - 1) (cycle k draws "
            f"its base noise with seed + 1000 k), got {seed} with {num_cycles} cycles"
        )
    out = Path(output_dir)
    anchor = resolve_weights(base_ckpt if base_ckpt is not None else generator_ckpt)
    current = resolve_weights(generator_ckpt)
    with output_lock(out, "EM work folder"):  # one EM run per folder
        return _em_cycles(
            out,
            anchor,
            current,
            dataset=dataset,
            data_dir=data_dir,
            split=split,
            num_cycles=num_cycles,
            max_items=max_items,
            assign_steps=assign_steps,
            assign_lr=assign_lr,
            patch_size=patch_size,
            parametrization=parametrization,
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            preserve_weight=preserve_weight,
            l1_weight=l1_weight,
            seed=seed,
            progress=progress,
            data=data,
            write_plots=write_plots,
            checkpoint_every=checkpoint_every,
            resume=resume,
            tracker=tracker,
        )


def _em_cycles(
    out: Path,
    anchor: Path,
    current: Path,
    *,
    dataset,
    data_dir,
    split,
    num_cycles,
    max_items,
    assign_steps,
    assign_lr,
    patch_size,
    parametrization,
    epochs,
    max_steps,
    lr,
    batch_size,
    preserve_weight,
    l1_weight,
    seed,
    progress,
    data,
    write_plots,
    checkpoint_every,
    resume,
    tracker,
) -> dict:
    from diffalign.noise.em import cycle_seed, em_cycles, m_step_resume, resumed_m_step
    from diffalign.noise.toy.assignment import assign, check_assign_before_loading
    from diffalign.noise.toy.finetune import check_sft_before_loading, sft

    def e_step_options(current: str, cdir: Path, k: int) -> dict:
        """`assign`'s arguments for the E-step of cycle ``k``."""
        return dict(
            generator_ckpt=current,
            output_dir=cdir / "assign",
            dataset=dataset,
            data_dir=data_dir,
            split=split,
            max_items=max_items,
            assign_steps=assign_steps,
            lr=assign_lr,
            patch_size=patch_size,
            parametrization=parametrization,
            l1_weight=l1_weight,
            seed=cycle_seed(seed, k),  # fresh base noises every cycle, as `noise em`
            data=data,
            desc=f"E-step {k}",
            write_plots=write_plots,
        )

    def e_step(current: str, cdir: Path, k: int) -> dict:
        return assign(**e_step_options(current, cdir, k))

    def m_step_options(current: str, cdir: Path, k: int) -> dict:
        """`sft`'s arguments for the M-step of cycle ``k``."""
        return dict(
            generator_ckpt=current,
            manifest_path=cdir / "assign" / "manifest.jsonl",
            output_dir=cdir / "sft",
            dataset=dataset,
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            preserve_weight=preserve_weight,
            l1_weight=l1_weight,
            seed=seed + k,
            base_ckpt=anchor,
            resume=m_step_resume(resume, cdir / "sft"),
            overwrite=resume == "restart",
            tracker=tracker,
            progress=progress,
            checkpoint_every=checkpoint_every,
        )

    def m_step(current: str, cdir: Path, k: int) -> dict:
        m = sft(**m_step_options(current, cdir, k))
        return {**m, "model": m["generator"]}

    def finished(cdir: Path) -> str | None:
        final = cdir / "sft" / "checkpoint-final" / "generator.safetensors"
        return str(final) if final.is_file() else None  # M-step finished in an earlier run

    # a re-run with other settings is refused before the first E-step loads a generator: the
    # E-steps up to the first unfinished cycle (their generators are known) and the M-step it
    # would resume (what is known once loaded is compared then)
    model = str(current)
    for k in range(num_cycles):
        cdir = out / f"cycle-{k:03d}"
        if (cdir / "assign").is_dir():
            check_assign_before_loading(**e_step_options(model, cdir, k))
        model = finished(cdir)
        if model is None:
            break
    found = resumed_m_step(out, num_cycles, str(current), finished, resume)
    if found is not None and (found[1] / "assign" / "manifest.jsonl").is_file():
        check_sft_before_loading(hint=TOY_EM_RESUME_HINT, **m_step_options(*found))
    summary = em_cycles(out, num_cycles, str(current), e_step, m_step, finished)
    summary.update(base=str(anchor), final_generator=summary["final_model"])
    write_json(out / "summary.json", summary)
    return summary
