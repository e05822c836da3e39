"""The EM loop (spec N: EM loop; seed 001 "E-step: reassign matched noises with the current
model, M-step: fine-tune on the updated matched-noise dataset").

:func:`em_cycles` is the loop for every generator: cycle ``k`` lives in ``WORK/cycle-NNN/``;
its E-step assigns with the current model, its M-step fine-tunes from the current model, and
the next cycle starts from the M-step's ``checkpoint-final``. Re-running resumes at cycle
granularity: a finished cycle is kept (its M-step's export is reused), an unfinished E-step
resumes item by item and an unfinished M-step from its last resumable checkpoint. The toy branch
(`diffalign noise toy em`) and `diffalign noise em` (:func:`em`) plug their E/M steps in.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from diffalign.engine.errors import DiffalignError
from diffalign.engine.io import output_lock, write_json

# the advice of a refused M-step resume (`noise em`: --resume latest | restart, --overwrite)
EM_RESUME_HINT = (
    "resume with the settings it was made with, pass --resume restart to start this M-step "
    "over or --overwrite to start the loop over, or choose another --output-dir"
)


def cycle_seed(seed: int, cycle: int) -> int:
    """The base-noise seed of E-step ``cycle``: ``seed + 1000 * cycle``, so every cycle assigns
    from fresh base noise (the seed's `run_em_latent_matched_sft` passes ``seed + 1000 * cycle``
    to its dataset builder); cycle 0 uses ``seed`` itself, as a plain `build-dataset` does."""
    return int(seed) + 1000 * int(cycle)


def m_step_resume(resume: str, sft_dir: Path) -> str | None:
    """The M-step's `resume` for the training loop: "latest" continues an unfinished M-step
    from its last checkpoint; a new one (no checkpoint yet) starts without `--resume latest`'s
    "no checkpoint" notice, since the user gave no --resume."""
    from diffalign.engine.checkpoints import list_checkpoints

    return "latest" if resume == "latest" and list_checkpoints(sft_dir) else None


def resumed_m_step(
    work_dir: str | os.PathLike,
    num_cycles: int,
    initial_model: str,
    finished_model: Callable[[Path], str | None],
    resume: str,
) -> tuple[str, Path, int] | None:
    """The M-step a re-run of the loop would resume from a checkpoint, as ``(the model it starts
    from, its cycle folder, k)``: the first of the ``num_cycles`` cycles whose M-step has not
    finished, when it holds a resumable checkpoint and ``resume`` is "latest"; else None. Its
    used-folder and resume refusals can then be made before the first E-step loads a model."""
    current = str(initial_model)
    for k in range(num_cycles):
        cdir = Path(work_dir) / f"cycle-{k:03d}"
        done = finished_model(cdir)
        if done is None:
            return (current, cdir, k) if m_step_resume(resume, cdir / "sft") else None
        current = str(done)
    return None


def em_cycles(
    work_dir: str | os.PathLike,
    num_cycles: int,
    initial_model: str,
    e_step: Callable[[str, Path, int], dict],
    m_step: Callable[[str, Path, int], dict],
    finished_model: Callable[[Path], str | None],
    summary_extra: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Run ``num_cycles`` E+M cycles; ``e_step(model, cycle_dir, k)`` -> its summary,
    ``m_step(model, cycle_dir, k)`` -> ``{"model": next model, ...}``, ``finished_model(
    cycle_dir)`` -> the next model when the cycle's M-step finished in an earlier run.
    ``overwrite``: remove the folder's cycles (``cycle-NNN/``) and summary first."""
    if num_cycles < 1:
        raise DiffalignError("--num-cycles must be >= 1")
    out = Path(work_dir)
    with output_lock(out, "EM work folder"):  # one EM run per folder (re-entrant)
        if overwrite:
            _clear_cycles(out)
        return _cycles(
            out, num_cycles, str(initial_model), e_step, m_step, finished_model, summary_extra
        )


def _clear_cycles(out: Path) -> None:
    """Remove an earlier run's cycles and summary (rank 0; the others wait)."""
    import shutil

    from diffalign.noise.assign import dist_state

    rank, _, state = dist_state()
    if rank == 0:
        for cdir in out.glob("cycle-[0-9][0-9][0-9]"):
            shutil.rmtree(cdir)
        (out / "summary.json").unlink(missing_ok=True)
    if state is not None:
        state.wait_for_everyone()


def _cycles(out, num_cycles, initial_model, e_step, m_step, finished_model, summary_extra):
    current = str(initial_model)
    cycles = []
    for k in range(num_cycles):
        t0 = time.time()
        cdir = out / f"cycle-{k:03d}"
        a = e_step(current, cdir, k) or {}
        done = finished_model(cdir)
        if done is not None:
            m = {"model": done, "steps": None, "resumed": True}
        else:
            m = m_step(current, cdir, k)
        current = str(m["model"])
        cycles.append(
            {
                "cycle": k,
                "e_step": {
                    key: a.get(key)
                    for key in (
                        "finished",
                        "failed",
                        "loss_before_mean",
                        "loss_after_mean",
                        "mse_before_mean",
                        "mse_after_mean",
                        "latent_mse_before_mean",
                        "latent_mse_after_mean",
                    )
                    if key in a
                },
                "m_step_steps": m.get("steps"),
                "m_step_final": (m.get("summary") or {}).get("final_train"),
                "model": current,
                "seconds": round(time.time() - t0, 3),
            }
        )
    summary = {
        **(summary_extra or {}),
        "num_cycles": num_cycles,
        "initial_model": str(initial_model),
        "final_model": current,
        "cycles": cycles,
    }
    from diffalign.noise.assign import dist_state

    if dist_state()[0] == 0:  # under accelerate launch the ranks agree; rank 0 writes
        write_json(out / "summary.json", summary)
    return summary


def em(
    model: str,
    data_root: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    num_cycles: int = 2,
    load: Callable[[str, bool], object],
    assign_kwargs: dict,
    sft_kwargs: dict,
    lora: bool = False,
    progress: bool = True,
    resume: str = "latest",
    overwrite: bool = False,
) -> dict:
    """`diffalign noise em` on a diffusion generator. ``load(model, first)`` loads a generator
    (``first``: the initial model; later cycles load the last ``checkpoint-final``, a pipeline
    or a LoRA export, as the recipe it recorded; a LoRA M-step trains from the base model and
    continues the last LoRA via ``init_lora``). The E-step of cycle ``k`` draws fresh base
    noise with :func:`cycle_seed` (``assign_kwargs["settings"].seed + 1000 k``). ``resume``:
    ``latest`` continues an unfinished M-step from its last checkpoint, ``restart`` starts it
    over (finished cycles are kept either way); ``overwrite`` starts the whole loop over."""
    from diffalign.noise.dataset import build_dataset, check_datasets_before_loading
    from diffalign.noise.sft import check_before_loading, sft

    if resume not in ("latest", "restart"):
        raise DiffalignError(f"--resume must be latest or restart, got {resume!r}")
    if sft_kwargs.get("deterministic"):  # before the first E-step's matmuls on CUDA
        from diffalign.engine.train import set_cublas_workspace_config

        set_cublas_workspace_config()
    initial = str(model)

    def m_step_folders(cdir: Path) -> tuple[Path, Path]:
        """The M-step's manifest (its E-step's dataset) and output folder."""
        return cdir / "dataset" / "manifest.jsonl", cdir / "sft"

    def m_step_options(current: str, cdir: Path, k: int) -> dict:
        """`sft`'s keywords for the M-step of cycle ``k``."""
        return dict(
            # a LoRA M-step trains from the base model; the previous LoRA trains on
            init_lora=current if lora and current != initial else None,
            resume=m_step_resume(resume, cdir / "sft"),
            overwrite=resume == "restart",
            progress=progress,
            model_info={"model": current, "cycle": k},
            **sft_kwargs,
        )

    def finished(cdir: Path) -> str | None:
        final = cdir / "sft" / "checkpoint-final"
        return str(final) if final.is_dir() else None

    def e_step_options(k: int) -> dict:
        """`build_dataset`'s settings and keywords for the E-step of cycle ``k``."""
        kwargs = dict(assign_kwargs)
        settings = kwargs.pop("settings")
        return dict(
            settings=dataclasses.replace(settings, seed=cycle_seed(settings.seed, k)), **kwargs
        )

    # a re-run with other settings is refused before any model loads: the cycles' datasets
    # (E-steps) and the M-step it would resume (the loaded models are compared once loaded)
    if not overwrite:
        datasets = [(Path(work_dir) / f"cycle-{k:03d}" / "dataset", k) for k in range(num_cycles)]
        check_datasets_before_loading(  # the pairs read and hashed once for every cycle
            data_root, [(d, e_step_options(k)) for d, k in datasets if d.is_dir()]
        )
        found = resumed_m_step(work_dir, num_cycles, initial, finished, resume)
        if found is not None and m_step_folders(found[1])[0].is_file():
            options = m_step_options(*found)
            check_before_loading(*m_step_folders(found[1]), hint=EM_RESUME_HINT, **options)
    preloaded: dict[str, object] = {}
    if overwrite:  # the earlier cycles go only once the pairs and the initial model are fine
        from diffalign.noise.dataset import read_pairs

        fields = {
            k: assign_kwargs[k] for k in ("prompt_field", "image_field") if k in assign_kwargs
        }
        read_pairs(data_root, **fields)
        preloaded[initial] = load(initial, True)

    def e_step(current: str, cdir: Path, k: int) -> dict:
        # a LoRA export loads as its base + the Hyper-SD weights (once) + its LoRA, fused
        if current in preloaded:
            gen = preloaded.pop(current)
        else:
            gen = load(current, current == initial)
        return build_dataset(
            gen,
            data_root,
            cdir / "dataset",
            desc=f"E-step {k}",
            model_info={"model": current},
            **e_step_options(k),
        )

    def m_step(current: str, cdir: Path, k: int) -> dict:
        options = m_step_options(current, cdir, k)
        gen = load(initial, True) if options["init_lora"] else load(current, current == initial)
        return sft(gen, *m_step_folders(cdir), **options)

    return em_cycles(
        work_dir, num_cycles, initial, e_step, m_step, finished, {"lora": lora}, overwrite
    )
