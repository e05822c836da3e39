"""The resumable, sharded, batched assignment job (spec N: matched-noise dataset builder).

One runner for every assignment dataset: `diffalign noise build-dataset`
(:mod:`diffalign.noise.dataset`, pairs.jsonl on a diffusion generator) and
`diffalign noise toy assign` (:mod:`diffalign.noise.toy.assignment`, a toy dataset split on the
toy GAN). An :class:`AssignmentJob` says what its items are, when an item's earlier output is
still good and how a batch is assigned and written; :func:`run_assignment_job` owns the rest:

- the settings file (a re-run with other settings is refused: `engine.identity`, the models by
  resolved path and hashes) and the folder's state;
- resume: items whose manifest record the job accepts are skipped, the others redone;
- fixed batches (all items in order, ``batch_size`` at a time): a batch with unfinished work
  runs whole again and only its unfinished items are written, so a resumed run gives the same
  results as an uninterrupted one, whatever the number of processes of either;
- sharding under ``accelerate launch``: rank ``r`` of ``w`` takes the batches ``b % w == r``
  (`engine.distributed.rank_batches`: each item is assigned in the batch it has in a 1-process
  run, so the noises are the same) and appends to ``manifest.rank-RR.jsonl`` /
  ``failures.rank-RR.jsonl``; rank 0 merges them into ``manifest.jsonl`` / ``failures.jsonl``
  (sorted by id, de-duplicated) at the end, and a run merges the parts a killed run left before
  it starts;
- the progress bar and ``summary.json``; the base-vs-assigned noise diagnostics of a
  job's `finalize` (:func:`finished_noises`, :func:`noise_gaussianity`).

The caller holds the folder's lock (`engine.io.output_lock`) around the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffalign.engine.distributed import rank_batches
from diffalign.engine.errors import DiffalignError
from diffalign.engine.identity import check_identity
from diffalign.engine.io import (
    append_jsonl,
    clean_stale_temporaries,
    load_tensors,
    read_json_object,
    remove_units,
    resolve_inside,
    write_json,
)
from diffalign.engine.progress import progress
from diffalign.noise.assign import dist_state, read_records, rewrite_jsonl, small_report


class AssignmentJob:
    """What a resumable assignment job does per item (module doc)."""

    config_file: str = "dataset_config.json"
    config_ignore: tuple[str, ...] = ()  # settings that may change between runs
    what: str = "dataset"
    # the refusal's advice for a folder made with other settings: only options the verb has
    restart_hint: str = (
        "rerun with the settings it was made with, pass --overwrite to start over, or write to "
        "another --output-dir"
    )

    def item_ids(self) -> list[int]:
        """All item ids of the job (0..n-1)."""
        raise NotImplementedError

    def check_done(self, item: int, record: dict) -> str | None:
        """None when ``record`` (the item's manifest line) names complete, valid output."""
        raise NotImplementedError

    def run_batch(self, ids: list[int], todo: set[int], writer: JobWriter) -> None:
        """Assign the items ``ids`` together; write those in ``todo`` (``writer.done`` /
        ``writer.fail``); the others are in the batch only as neighbours."""
        raise NotImplementedError

    def finalize(self, out: Path, records: list[dict], failures: list[dict]) -> dict:
        """Rank 0, after the merge: diagnostics and plots; returns summary entries."""
        return {}

    def item_dirs(self, item: int) -> list[Path]:
        """The folders of an item's files (stale temporaries of a killed write are removed
        there before it is redone)."""
        return []

    def earlier_units(self, out: Path) -> list[Path]:
        """The item files and diagnostics an earlier run's layout wrote in ``out``, which
        ``overwrite`` removes (beside the records the runner keeps) before the settings are
        recorded."""
        return []


class JobWriter:
    """Appends this process's manifest and failure lines."""

    def __init__(self, out: Path, world: int, rank: int) -> None:
        suffix = "" if world == 1 else f".rank-{rank:02d}"
        self.manifest = out / f"manifest{suffix}.jsonl"
        self.failures = out / f"failures{suffix}.jsonl"
        self.written = 0
        self.failed = 0

    def done(self, record: dict) -> None:
        """The item's files are written: its manifest line comes last."""
        append_jsonl(self.manifest, record)
        self.written += 1

    def fail(self, record: dict) -> None:
        append_jsonl(self.failures, record)
        self.failed += 1


def merge_records(out: Path) -> tuple[list[dict], list[dict]]:
    """Merge the rank parts; rewrite manifest.jsonl / failures.jsonl sorted and de-duplicated
    (an item finished later is no failure); remove the parts."""
    done = read_records(out, "manifest")
    fails = read_records(out, "failures")
    records = [done[i] for i in sorted(done)]
    failures = [fails[i] for i in sorted(fails) if i not in done]
    rewrite_jsonl(out / "manifest.jsonl", records)
    rewrite_jsonl(out / "failures.jsonl", failures)
    for part in out.glob("*.rank-*.jsonl"):
        part.unlink()
    return records, failures


def finished_noises(out: Path, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(base noises, assigned noises) stacked from the finished records' noise files, those
    that cannot be read left out; None when none can."""
    eps, noise = [], []
    for r in records:
        try:
            t, _ = load_tensors(resolve_inside(out, str(r["noise_file"]), "noise_file"))
            eps.append(t["base_noise"])
            noise.append(t["noise"])
        except (DiffalignError, KeyError):
            continue
    return (torch.stack(eps), torch.stack(noise)) if eps else None


def noise_gaussianity(
    out: Path, eps: torch.Tensor, noise: torch.Tensor, patch_size: int, plots: bool
) -> dict:
    """`orthogonal_gaussian_{init,final}` diagnostics (init: the base noise against itself, Q =
    I; final: base against assigned noise) into ``out`` (JSON, and PNGs with ``plots``);
    returns their summary entries ``gaussianity_init`` / ``gaussianity_final``."""
    from diffalign.noise.diagnostics import gaussianity_report, write_gaussianity_diagnostics

    entries = {}
    for key, (a, b) in {"init": (eps, eps.clone()), "final": (eps, noise)}.items():
        name = f"orthogonal_gaussian_{key}"
        if plots:
            rep = write_gaussianity_diagnostics(out, name, a, b, patch_size=patch_size)
        else:
            rep = gaussianity_report(a, b, patch_size=patch_size)
            write_json(out / f"{name}.json", rep)
        entries[f"gaussianity_{key}"] = small_report(rep)
    return entries


def check_job_record(
    job: AssignmentJob | type[AssignmentJob], out: Path, config: dict, free=()
) -> bool:
    """Refuse (one line, `engine.identity`) a folder whose settings file records other settings
    than ``config`` (outside the job's `config_ignore` and ``free``); True when the record
    binds (items were written under it), False when there is none to hold the run to (a folder
    whose earlier run finished no item: its record is replaced)."""
    cfg_path = Path(out) / job.config_file
    if not (cfg_path.is_file() and read_records(Path(out), "manifest")):
        return False
    check_identity(
        read_json_object(cfg_path),
        config,
        f"{out} holds {'an' if job.what[:1] in 'aeiou' else 'a'} {job.what}",
        free=(*job.config_ignore, *free),
        hint=job.restart_hint,
    )
    return True


def run_assignment_job(
    job: AssignmentJob,
    out: str | Path,
    config: dict,
    batch_size: int,
    desc: str = "assign",
    t0: float | None = None,
    overwrite: bool = False,
) -> dict:
    """Run (or resume) ``job`` into ``out`` (module doc); returns the summary on rank 0.
    ``overwrite``: remove the folder's records (settings, manifest, failures, summary) and the
    job's `earlier_units` first (the caller has loaded its models), so every item is assigned
    again under these settings and nothing of the earlier run is left beside the new items."""
    t0 = time.time() if t0 is None else t0
    out = Path(out)
    rank, world, state = dist_state()
    if overwrite:
        if rank == 0:
            records = ("manifest*.jsonl", "failures*.jsonl", job.config_file, "summary.json")
            remove_units(
                [*(p for name in records for p in out.glob(name)), *job.earlier_units(out)]
            )
        if state is not None:
            state.wait_for_everyone()
    cfg_path = out / job.config_file
    if not check_job_record(job, out, config) and rank == 0:
        for old in out.glob("failures*.jsonl"):  # the failures of the replaced settings
            old.unlink()
        write_json(cfg_path, config)
    if rank == 0 and any(out.glob("*.rank-*.jsonl")):
        # the parts of a killed run merge first: the records of items this run redoes are read
        # after them, whatever the number of processes of either run
        merge_records(out)
    if state is not None:
        state.wait_for_everyone()
    t_sync = time.time()  # every process is ready: the work (and its timing) starts here

    ids = job.item_ids()
    done = read_records(out, "manifest")
    batches = rank_batches(ids, batch_size, rank, world)
    mine = [i for batch in batches for i in batch]
    todo: set[int] = set()
    skipped = redone = 0
    for i in mine:
        if i in done:
            problem = job.check_done(i, done[i])
            if problem is None:
                skipped += 1
                continue
            redone += 1
            print(f"diffalign: item {i}: {problem}; assigning it again", flush=True)
        todo.add(i)
    # a kill mid-write leaves `.<name>.XXXXXXXX.tmp` beside the file: only in the folders of
    # items still to do (a finished item's files were renamed into place before its record)
    if rank == 0:
        clean_stale_temporaries(out)
    for i in sorted(todo):
        for folder in job.item_dirs(i):
            clean_stale_temporaries(folder)
    batches = [b for b in batches if todo.intersection(b)]
    writer = JobWriter(out, world, rank)
    bar = progress(total=len(todo), desc=desc)
    for batch in batches:
        job.run_batch(batch, todo, writer)
        bar.update(len(todo.intersection(batch)))
    bar.close()

    if state is not None:
        state.wait_for_everyone()
    counts = {"skipped": skipped, "redone": redone, "written": writer.written}
    if state is not None:  # every rank's counts, summed on rank 0 (summary.json)
        from accelerate.utils import gather_object

        parts = gather_object([counts])
        counts = {k: sum(int(p[k]) for p in parts) for k in counts}
    summary: dict = {}
    if rank == 0:
        records, failures = merge_records(out)
        summary = {
            "config": config,
            "num_items": len(ids),
            "finished": len(records),
            "failed": len(failures),
        }
        summary.update(job.finalize(out, records, failures))
        work = time.time() - t_sync
        written = counts["written"]
        summary.update(
            skipped_finished=counts["skipped"],
            redone_damaged=counts["redone"],
            world_size=world,
            written_this_run=written,
            samples_per_second=written / work if written else None,
            seconds=round(time.time() - t0, 3),
            work_seconds=round(work, 3),
        )
        write_json(out / "summary.json", summary)
    if state is not None:
        state.wait_for_everyone()
    return summary
