"""Submission: the unfinished trials of a sweep, in-process, as local processes or a SLURM array.

Everything about a trial lives in its run directory, so a sweep can be submitted again at any time:
finished trials (``test.json``) are skipped, the others resume from their last checkpoint.
``<sweep_dir>/sweep.json`` keeps the trial list and the MLflow parent run, so every submission of a
sweep reports to the same parent run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hmaml.config import override_text
from hmaml.errors import HmamlError, first_line
from hmaml.files import read_json, write_json_atomic
from hmaml.sweep.executors import (
    LOCAL_SIGNAL_DELAY_S,
    executor_parameters,
    gpu_slots,
    local_executor,
    result_line,
    slurm_executor,
    sqlite_warning,
)
from hmaml.sweep.job import PackedTrials, TrialJob
from hmaml.sweep.report import SWEEP_JSON, summarize
from hmaml.sweep.search import run_search
from hmaml.sweep.signals import still_running
from hmaml.sweep.spec import CLUSTERS, ExecutorSpec, Sweep, Trial, load_sweep
from hmaml.train.plan import make_plan
from hmaml.train.rundir import RunDir, Status
from hmaml.train.tracking import Tracker

_POLL_S = 0.5


# --- sweep directory ------------------------------------------------------------------------


def _trial_record(trial: Trial) -> dict[str, Any]:
    return {"name": trial.name, "run_dir": trial.cfg.run_dir, "axes": trial.axes,
            "overrides": trial.overrides}


def _merge_records(sweep: Sweep, old: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The trial records of ``sweep``; refuses a sweep file whose trials changed meaning."""
    records = [_trial_record(t) for t in sweep.trials]
    if old is None:
        return records
    known = {r["name"]: r for r in old.get("trials", [])}
    for record in records:
        before = known.pop(record["name"], None)
        if before is not None and json.dumps(before["overrides"], sort_keys=True) != \
                json.dumps(record["overrides"], sort_keys=True):
            raise HmamlError(f"{sweep.path}: trial {record['name']} already ran in "
                             f"{sweep.sweep_dir} with other overrides; give the sweep another "
                             f"sweep_dir")
    return records + list(known.values())


def _slurm_jobs(old: dict[str, Any] | None) -> dict[str, str]:
    """Each trial's SLURM job of the latest submission that queued it."""
    jobs: dict[str, str] = {}
    for submission in (old or {}).get("submissions", []):
        if submission.get("cluster") == "slurm":
            jobs.update(submission.get("jobs", {}))
    return jobs


def _check_plans(sweep: Sweep, cluster: str) -> None:
    """Refuse, before anything is queued, a trial whose distributed plan cannot work."""
    ex = sweep.spec.executor
    if cluster == "local" and ex.nodes != 1:
        raise HmamlError(f"{sweep.path}: executor.nodes={ex.nodes}: the local cluster has one "
                         "node")
    if cluster == "local" and ex.packed and not ex.gpus_per_node:
        raise HmamlError(f"{sweep.path}: executor.trials_per_gpu={ex.trials_per_gpu} without "
                         "GPUs packs trials into SLURM jobs; locally, executor.max_local_parallel "
                         "sets how many trial processes run at once")
    nodes = ex.nodes if cluster == "slurm" else 1
    processes = 1 if cluster == "debug" else nodes * ex.processes_per_node()
    for trial in sweep.trials:
        try:
            make_plan(trial.cfg, processes, nodes=nodes)
        except HmamlError as exc:
            raise HmamlError(f"{sweep.path}: trial {trial.name}: {exc} ({processes} processes "
                             f"on {nodes} node{'s' if nodes > 1 else ''}, cluster {cluster})"
                             ) from None


# --- submission -----------------------------------------------------------------------------


def describe(sweep: Sweep, cluster: str) -> str:
    """The trials (name and overrides) and the executor settings, as printed by --dry-run."""
    lines = [f"sweep {sweep.name}: {len(sweep.trials)} trials of {sweep.spec.base} "
             f"in {sweep.sweep_dir}",
             f"MLflow: {sweep.tracking_uri} experiment {sweep.experiment}"
             + ("" if sweep.tracking_enabled else " (tracking disabled)")]
    for trial in sweep.trials:
        overrides = " ".join(f"{k}={override_text(v)}" for k, v in trial.overrides.items())
        lines.append(f"  {trial.name}: {overrides}")
    lines.append(f"executor ({cluster}):")
    if cluster == "debug":
        lines.append("  in-process, one trial after another")
    for key, value in executor_parameters(sweep.spec.executor, cluster).items():
        lines.append(f"  {key}: {value}")
    ex = sweep.spec.executor
    if cluster == "local":
        slots = gpu_slots(ex)
        lines.append(f"  max_local_parallel: {ex.max_local_parallel}" if slots is None else
                     f"  trials at once: {len(slots)} ({ex.trials_per_gpu} per GPU on GPUs "
                     f"{', '.join(sorted({str(g) for slot in slots for g in slot}))})")
    if cluster != "debug":
        lines.append(f"  max_num_timeout: {ex.max_num_timeout}")
    if cluster == "slurm":
        lines.append(f"  max_lost_rank_requeues: {ex.max_lost_rank_requeues}")
        jobs = -(-len(sweep.trials) // ex.trials_per_gpu)
        lines.append(f"  one job array of {jobs} jobs, {ex.trials_per_gpu} trials each "
                     f"({'sharing its GPU' if ex.gpus_per_node else 'sharing its CPUs'})"
                     if ex.packed else f"  one job array of {len(sweep.trials)} trials")
    return "\n".join(lines)


def submit(sweep_file: str | Path, cluster: str | None = None, dry_run: bool = False,
           echo: Callable[[str], None] = print, overrides: Sequence[str] = ()
           ) -> dict[str, Any]:
    """Submit the unfinished trials of a sweep (its file with ``key.sub=value`` ``overrides``);
    returns ``{"submitted": {trial: job id}, ...}``.

    ``debug`` and ``local`` wait for the trials and then write the summary; ``slurm`` returns
    once the job array is queued (``--summarize`` later).
    """
    sweep = load_sweep(sweep_file, overrides)
    cluster = cluster or sweep.spec.executor.cluster
    if cluster not in CLUSTERS:
        raise HmamlError(f"cluster {cluster!r} is not one of {', '.join(CLUSTERS)}")
    if sweep.spec.search is not None:
        return run_search(sweep, cluster, echo, dry_run)
    _check_plans(sweep, cluster)
    warning = sqlite_warning(sweep, cluster)
    if warning:
        echo(warning)
    if dry_run:
        echo(describe(sweep, cluster))
        return {"submitted": {}, "skipped": [], "dry_run": True}
    sweep_dir = sweep.sweep_dir
    folder = sweep_dir / "submitit"
    old = read_json(sweep_dir / SWEEP_JSON)
    records = _merge_records(sweep, old)
    parent = _parent_run(sweep, old)
    info = {"name": sweep.name, "sweep_file": str(Path(sweep_file).resolve()),
            "sweep_overrides": list(overrides),
            "base": sweep.spec.base, "tracking_uri": sweep.tracking_uri,
            "experiment": sweep.experiment, "parent_run_id": parent, "trials": records,
            "register": dataclasses.asdict(sweep.spec.register) if sweep.spec.register else None,
            "submissions": (old or {}).get("submissions", [])}
    write_json_atomic(sweep_dir / SWEEP_JSON, info)

    slurm_jobs = _slurm_jobs(old)
    todo, skipped = [], []
    for trial in sweep.trials:
        rd = RunDir(trial.cfg.run_dir)
        if rd.test.is_file() or still_running(rd.read_trial(),
                                              slurm_jobs.get(trial.name)):
            skipped.append(trial.name)
        else:
            todo.append(trial)
    echo(f"sweep {sweep.name}: {len(todo)} to run, {len(skipped)} finished or running "
         f"({sweep_dir})")
    if not todo:
        if cluster != "slurm":
            summarize(sweep_dir, echo=echo)
        return {"submitted": {}, "skipped": skipped, "parent_run_id": parent}

    delay = sweep.spec.executor.signal_delay_s if cluster == "slurm" else LOCAL_SIGNAL_DELAY_S
    requeues = sweep.spec.executor.max_lost_rank_requeues
    jobs = [(t, TrialJob(t.cfg, parent, _trial_tags(sweep, t), grace_s=delay / 2,
                         lost_rank_requeues=requeues)) for t in todo]
    if cluster == "debug":
        submitted = _run_debug(jobs, echo)
    elif cluster == "local":
        submitted = _run_local(jobs, sweep.spec.executor, folder, echo)
    else:
        submitted = _submit_slurm(jobs, sweep.spec.executor, folder, echo)
    info["submissions"].append({"time": time.time(), "cluster": cluster, "jobs": submitted})
    write_json_atomic(sweep_dir / SWEEP_JSON, info)
    if cluster != "slurm":
        summarize(sweep_dir, echo=echo)
    return {"submitted": submitted, "skipped": skipped, "parent_run_id": parent}


def _parent_run(sweep: Sweep, old: dict[str, Any] | None) -> str | None:
    if not sweep.tracking_enabled:
        return None
    params: dict[str, Any] = {"sweep.base": sweep.spec.base, "sweep.trials": len(sweep.trials)}
    for key in sweep.trials[0].axes:
        values = list(dict.fromkeys(json.dumps(t.axes[key]) for t in sweep.trials))
        params[f"sweep.axis.{key}"] = ", ".join(values)
    tags = {"sweep.name": sweep.name, "sweep.dir": str(sweep.sweep_dir),
            "sweep.file": str(sweep.path.resolve())}
    tracker = Tracker(consequence="the sweep's trials still run, without a parent run")
    tracker.open(sweep.tracking_uri, sweep.experiment, sweep.name, params, tags,
                 run_id=(old or {}).get("parent_run_id"), start_tags={"hmaml.kind": "sweep"})
    return tracker.run_id if tracker.active else None


def _trial_tags(sweep: Sweep, trial: Trial) -> dict[str, str]:
    tags = {"sweep.name": sweep.name, "sweep.trial": trial.name}
    tags.update({f"sweep.axis.{k}": override_text(v) for k, v in trial.axes.items()})
    return tags


def _run_debug(jobs: list[tuple[Trial, TrialJob]], echo: Callable[[str], None]
               ) -> dict[str, str]:
    """In-process, one after another; a stop request (e.g. SIGTERM) ends the whole sweep."""
    out: dict[str, str] = {}
    for trial, job in jobs:
        echo(f"[{trial.name}] start")
        try:
            result = job()
        except Exception as exc:
            out[trial.name] = "failed"
            echo(f"[{trial.name}] failed: {type(exc).__name__}: {first_line(exc)}")
            continue
        out[trial.name] = result.status.value
        echo(f"[{trial.name}] {result_line(result)}")
        if result.status == Status.PREEMPTED:
            echo("stop requested: the remaining trials are left for the next submission")
            break
    return out


def _run_local(jobs: list[tuple[Trial, TrialJob]], spec: ExecutorSpec, folder: Path,
               echo: Callable[[str], None]) -> dict[str, str]:
    """submitit local processes, at most ``max_local_parallel`` at a time (with GPUs: as many
    as :func:`gpu_slots` gives, each trial on its own GPUs); waits for all."""
    slots = gpu_slots(spec)
    free: list[tuple[int, ...] | None] = list(slots) if slots is not None else \
        [None] * spec.max_local_parallel
    executor = local_executor(spec, folder)
    queue = list(jobs)
    running: dict[str, tuple[Any, tuple[int, ...] | None]] = {}
    out: dict[str, str] = {}
    try:
        while queue or running:
            while queue and free:
                trial, job = queue.pop(0)
                slot = free.pop(0)
                gpus = {} if slot is None else {"visible_gpus": slot, "gpus_per_node": len(slot)}
                executor.update_parameters(name=trial.name, **gpus)
                handle = executor.submit(job)
                running[trial.name] = (handle, slot)
                out[trial.name] = str(handle.job_id)
                echo(f"[{trial.name}] started as local job {handle.job_id}"
                     + ("" if slot is None else f" on GPU {','.join(map(str, slot))}"))
            time.sleep(_POLL_S)
            for name, (handle, slot) in list(running.items()):
                if handle.done():
                    del running[name]
                    free.append(slot)
                    try:
                        echo(f"[{name}] {result_line(handle.result())}")
                    except Exception as exc:
                        echo(f"[{name}] failed ({first_line(exc)}); log: {handle.paths.stderr}")
    except BaseException:  # Ctrl-C, or a caller's time limit: no trial outlives the submitter
        for handle, _ in running.values():  # (each resumes at the next submission)
            handle.cancel(check=False)
        raise
    return out


def _submit_slurm(jobs: list[tuple[Trial, TrialJob]], spec: ExecutorSpec, folder: Path,
                  echo: Callable[[str], None]) -> dict[str, str]:
    """One job array of all trials; returns at once."""
    from submitit.core.utils import FailedJobError

    executor = slurm_executor(spec, folder)
    executor.update_parameters(name=folder.parent.name)
    size = spec.trials_per_gpu
    groups = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    try:
        with executor.batch():
            handles = [executor.submit(PackedTrials([job for _, job in group]) if spec.packed
                                       else group[0][1]) for group in groups]
    except FailedJobError as exc:
        raise HmamlError(f"sbatch refused the job array: {first_line(exc)}") from None
    out = {trial.name: str(handle.job_id) for group, handle in zip(groups, handles, strict=True)
           for trial, _ in group}
    for name, job_id in out.items():
        echo(f"[{name}] queued as SLURM job {job_id}")
    return out
