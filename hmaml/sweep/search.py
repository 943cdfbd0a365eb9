"""A sweep's ``search:``: an Optuna study that picks each trial from the ones that finished.

The submitting process drives the study (ask and tell, Optuna's own interface): it keeps
``parallel`` trials running through the sweep's executor (in-process, local processes or SLURM
jobs, the same :class:`~hmaml.sweep.job.TrialJob` as a grid's trials: run folder, MLflow child
run, requeue on preemption), asks for the next trial when one ends and tells the study its
``metric`` from the trial's ``test.json``. With a pruner, the trial's own process reports its
validation accuracy to the study after each validation and stops when the pruner says so: the
trial ends ``pruned`` (final; it is not resumed). The study lives in an RDB storage (a SQLite file
in the sweep folder by default); submitting the sweep again continues it: trials told already
count, a trial still running elsewhere is waited for, one whose job died resumes from its run
folder, and no trial is run twice.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

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
from hmaml.sweep.job import TrialJob
from hmaml.sweep.report import SWEEP_JSON, param_text, summarize, trial_state
from hmaml.sweep.signals import still_running
from hmaml.sweep.spec import PrunerSpec, SearchSpec, Sweep, Trial, search_trial
from hmaml.train.plan import make_plan
from hmaml.train.rundir import RunDir, TrainResult
from hmaml.train.tracking import Tracker

STUDY_DB = "optuna.db"
_POLL_S = {"debug": 0.0, "local": 0.5, "slurm": 5.0}


def storage_url(sweep: Sweep) -> str:
    """``search.storage``, else a SQLite file in the sweep folder."""
    assert sweep.spec.search is not None
    return sweep.spec.search.storage or f"sqlite:///{sweep.sweep_dir / STUDY_DB}"


def distributions(search: SearchSpec) -> dict[str, Any]:
    """Optuna's distribution of each key of ``search.space``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out: dict[str, Any] = {}
    for key, dist in search.space.items():
        kind, arg = next(iter(dist.items()))
        out[key] = (CategoricalDistribution(arg) if kind == "choice" else
                    FloatDistribution(float(arg[0]), float(arg[1]), log=kind == "loguniform"))
    return out


def make_pruner(spec: PrunerSpec | None, epochs: int) -> Any:
    """Optuna's pruner of ``search.pruner`` for trials of ``epochs`` epochs (the storage does not
    keep it: the driver, whose sampler reads Hyperband's brackets, and each trial's process
    build it alike)."""
    import optuna

    if spec is None:
        return optuna.pruners.NopPruner()
    if spec.name == "percentile":
        return optuna.pruners.PercentilePruner(spec.percentile,
                                               n_startup_trials=spec.startup_trials,
                                               n_warmup_steps=spec.warmup_epochs)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.min_epochs, max_resource=epochs,
                                              reduction_factor=spec.reduction_factor)
    return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                       n_warmup_steps=spec.warmup_epochs)


def open_study(sweep: Sweep, storage: str, epochs: int) -> Any:
    """The sweep's study (created, with its enqueued trials, or loaded to continue)."""
    import optuna

    search = sweep.spec.search
    assert search is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.TPESampler(seed=search.sampler.seed)
               if search.sampler.name == "tpe" else
               optuna.samplers.RandomSampler(seed=search.sampler.seed))
    pruner = make_pruner(search.pruner, epochs)
    # one of the two: the sweep file's check (spec.py) refuses any other
    direction = cast(Literal["minimize", "maximize"], search.direction)
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(storage=storage, study_name=sweep.name, sampler=sampler,
                                    pruner=pruner, direction=direction,
                                    load_if_exists=True)
    except Exception as exc:  # a bad URL, a server that refuses: one line
        raise HmamlError(f"search.storage={storage}: {type(exc).__name__}: "
                         f"{first_line(exc)}") from None
    if study.direction.name.lower() != search.direction:
        raise HmamlError(f"{sweep.path}: study {sweep.name} in {storage} was made to "
                         f"{study.direction.name.lower()}, not {search.direction}")
    if not study.trials:
        for point in search.enqueue:
            study.enqueue_trial(point)
    return study


class PrunerLink:
    """A trial's line to its study, called by the training loop after each validation (on rank
    0): reports the validation accuracy at the epoch and asks the pruner. Picklable: the study
    is opened in the trial's own process at the first call."""

    def __init__(self, storage: str, study_name: str, trial_id: int, pruner: PrunerSpec,
                 epochs: int) -> None:
        self.storage, self.study_name, self.trial_id = storage, study_name, trial_id
        self.pruner, self.epochs = pruner, epochs
        self._trial: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_trial": None}

    def __call__(self, epoch: int, val_acc: float) -> bool:
        import optuna

        if self._trial is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=self.study_name, storage=self.storage,
                                      pruner=make_pruner(self.pruner, self.epochs))
            self._trial = optuna.trial.Trial(study, self.trial_id)
        self._trial.report(val_acc, epoch)
        return bool(self._trial.should_prune())


# --- the driver -------------------------------------------------------------------------------


def run_search(sweep: Sweep, cluster: str, echo: Callable[[str], None] = print,
               dry_run: bool = False) -> dict[str, Any]:
    """Run (or continue) the sweep's search to ``n_trials`` trials; returns what ran."""
    search = sweep.spec.search
    assert search is not None
    storage = storage_url(sweep)
    first = search_trial(sweep, 0, {k: next(iter(d.values()))[0] for k, d in search.space.items()})
    _check_plan(sweep, first, cluster)
    for warning in (sqlite_warning(sweep, cluster), _storage_warning(sweep, storage, cluster)):
        if warning:
            echo(warning)
    if dry_run:
        echo(describe_search(sweep, storage, cluster, first.cfg.train.epochs))
        return {"submitted": {}, "skipped": [], "dry_run": True}
    study = open_study(sweep, storage, first.cfg.train.epochs)
    old = read_json(sweep.sweep_dir / SWEEP_JSON)
    parent = _parent_run(sweep, old)
    info: dict[str, Any] = {
        "name": sweep.name, "sweep_file": str(sweep.path.resolve()), "base": sweep.spec.base,
        "tracking_uri": sweep.tracking_uri, "experiment": sweep.experiment,
        "parent_run_id": parent, "trials": list((old or {}).get("trials", [])),
        "register": (old or {}).get("register") or (
            dataclasses.asdict(sweep.spec.register) if sweep.spec.register else None),
        "search": {"storage": storage, "study": sweep.name, "n_trials": search.n_trials,
                   "metric": search.metric, "direction": search.direction},
        "submissions": (old or {}).get("submissions", [])}
    driver = _Driver(sweep, study, storage, parent, cluster, info, echo)
    submitted = driver.run()
    info["submissions"].append({"time": time.time(), "cluster": cluster, "jobs": submitted})
    write_json_atomic(sweep.sweep_dir / SWEEP_JSON, info)
    summary = summarize(sweep.sweep_dir, echo=echo)
    return {"submitted": submitted, "skipped": driver.skipped, "parent_run_id": parent,
            "summary": summary}


class _Driver:
    """Keeps ``parallel`` trials running until the study holds ``n_trials``."""

    def __init__(self, sweep: Sweep, study: Any, storage: str, parent: str | None,
                 cluster: str, info: dict[str, Any], echo: Callable[[str], None]) -> None:
        self.sweep, self.study, self.storage, self.parent = sweep, study, storage, parent
        self.cluster, self.info, self.echo = cluster, info, echo
        search = sweep.spec.search
        assert search is not None  # a search sweep's driver
        self.search: SearchSpec = search
        self.running: dict[int, tuple[Trial, Any, Any]] = {}  # number -> (trial, handle, slot)
        self.watched: dict[int, Trial] = {}  # running elsewhere (an earlier submission's job)
        self.resume: list[tuple[int, Trial]] = []  # (trial id, trial) whose job died
        self.skipped: list[str] = []
        self.submitted: dict[str, str] = {}
        self.stopped = False  # a preempted trial: this submission starts nothing new
        self.executor, self.free = self._executor()

    # - the study's side

    def _record(self, trial: Trial, number: int) -> None:
        records = self.info["trials"]
        if not any(r["name"] == trial.name for r in records):
            records.append({"name": trial.name, "run_dir": trial.cfg.run_dir,
                            "axes": trial.axes, "overrides": trial.overrides,
                            "optuna_trial": number})
            write_json_atomic(self.sweep.sweep_dir / SWEEP_JSON, self.info)

    def _started(self) -> int:
        from optuna.trial import TrialState

        return sum(t.state != TrialState.WAITING for t in self.study.get_trials(deepcopy=False))

    def _tell(self, number: int, trial: Trial) -> str:
        """Tell the study how trial ``number`` ended, from its run folder; returns its state."""
        from optuna.trial import TrialState

        state = trial_state(trial.cfg.run_dir)
        if state["state"] == "finished":
            test = RunDir(trial.cfg.run_dir).read_test() or {}
            value = test.get(self.search.metric)
            if value is None:
                self.study.tell(number, state=TrialState.FAIL)
                return "failed"
            self.study.tell(number, float(value))
        elif state["state"] == "pruned":
            self.study.tell(number, state=TrialState.PRUNED)
        elif state["state"] in ("preempted", "requeued"):
            return "preempted"  # left running in the study: the next submission resumes it
        else:
            self.study.tell(number, state=TrialState.FAIL)
            return "failed"
        return state["state"]

    def _reconcile(self) -> None:
        """Trials an earlier submission left running: told now if their folder says how they
        ended, watched while their job lives, resumed when it died."""
        from optuna.trial import TrialState

        slurm_jobs = _slurm_jobs(self.info)
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial = search_trial(self.sweep, frozen.number, frozen.params)
            rd = RunDir(trial.cfg.run_dir)
            if still_running(rd.read_trial(), slurm_jobs.get(trial.name)):
                self.watched[frozen.number] = trial
                self.skipped.append(trial.name)
                self.echo(f"[{trial.name}] still running from an earlier submission: waiting")
            elif trial_state(rd.path)["state"] in ("finished", "pruned", "failed"):
                self.echo(f"[{trial.name}] {self._tell(frozen.number, trial)} (told now)")
            else:
                self.resume.append((frozen._trial_id, trial))

    # - the executor's side

    def _executor(self) -> tuple[Any, list[Any]]:
        spec = self.sweep.spec.executor
        folder = self.sweep.sweep_dir / "submitit"
        parallel = self.search.parallel
        if self.cluster == "debug":
            return None, [None]
        if self.cluster == "local":
            slots = gpu_slots(spec)
            return local_executor(spec, folder), (list(slots)[:parallel] if slots is not None
                                                  else [None] * parallel)
        return slurm_executor(spec, folder), [None] * parallel

    def _job(self, trial: Trial, trial_id: int) -> TrialJob:
        spec = self.sweep.spec.executor
        delay = spec.signal_delay_s if self.cluster == "slurm" else LOCAL_SIGNAL_DELAY_S
        tags = {"sweep.name": self.sweep.name, "sweep.trial": trial.name,
                "optuna.study": self.sweep.name, "optuna.trial": str(trial_id),
                **{f"sweep.axis.{k}": json.dumps(v) for k, v in trial.axes.items()}}
        link = PrunerLink(self.storage, self.sweep.name, trial_id, self.search.pruner,
                          trial.cfg.train.epochs) if self.search.pruner is not None else None
        return TrialJob(trial.cfg, self.parent, tags, grace_s=delay / 2, on_validation=link,
                        lost_rank_requeues=spec.max_lost_rank_requeues)

    def _start(self, number: int, trial_id: int, trial: Trial) -> None:
        self._record(trial, number)
        job = self._job(trial, trial_id)
        slot = self.free.pop(0)
        if self.cluster == "debug":
            self.echo(f"[{trial.name}] start: {_params(trial)}")
            try:
                result = job()
                self.echo(f"[{trial.name}] {self._ended(number, trial, result)}")
            except Exception as exc:
                self.echo(f"[{trial.name}] {self._tell(number, trial)}: "
                          f"{type(exc).__name__}: {first_line(exc)}")
            self.submitted[trial.name] = "in-process"
            self.free.append(slot)
            return
        if self.cluster == "local" and slot is not None:
            self.executor.update_parameters(visible_gpus=slot, gpus_per_node=len(slot))
        self.executor.update_parameters(name=trial.name)
        handle = self.executor.submit(job)
        self.running[number] = (trial, handle, slot)
        self.submitted[trial.name] = str(handle.job_id)
        self.echo(f"[{trial.name}] started as {self.cluster} job {handle.job_id}: "
                  f"{_params(trial)}")

    def _ended(self, number: int, trial: Trial, result: TrainResult | None) -> str:
        state = self._tell(number, trial)
        if state == "preempted":
            self.stopped = True
            return "preempted: the next submission resumes it"
        if state == "finished" and result is not None:
            return result_line(result)
        if state == "pruned":
            reported = self.study.get_trials(deepcopy=False)[number].intermediate_values
            if reported:
                epoch = max(reported)
                return f"pruned after epoch {epoch} (val {reported[epoch]:.2f} %)"
        return state

    def _poll(self) -> None:
        for number, (trial, handle, slot) in list(self.running.items()):
            if not handle.done():
                continue
            del self.running[number]
            self.free.append(slot)
            try:
                line = self._ended(number, trial, handle.result())
            except Exception as exc:
                line = (f"{self._tell(number, trial)} ({first_line(exc)}); log: "
                        f"{handle.paths.stderr}")
            self.echo(f"[{trial.name}] {line}")
        slurm_jobs = _slurm_jobs(self.info)
        for number, trial in list(self.watched.items()):
            rd = RunDir(trial.cfg.run_dir)
            if not still_running(rd.read_trial(), slurm_jobs.get(trial.name)):
                del self.watched[number]
                self.echo(f"[{trial.name}] {self._tell(number, trial)}")

    def run(self) -> dict[str, str]:
        self._reconcile()
        try:
            while True:
                while self.free and not self.stopped and (
                        self.resume or self._started() < self.search.n_trials):
                    if self.resume:
                        trial_id, trial = self.resume.pop(0)
                        number = int(trial.name[1:])
                        self.echo(f"[{trial.name}] resuming from its run folder")
                    else:
                        asked = self.study.ask(distributions(self.search))
                        trial_id, number = asked._trial_id, asked.number
                        trial = search_trial(self.sweep, number, asked.params)
                    self._start(number, trial_id, trial)
                if not self.running and not self.watched:
                    break
                time.sleep(_POLL_S[self.cluster])
                self._poll()
        except BaseException:  # Ctrl-C or a caller's limit: no local trial outlives the driver
            if self.cluster == "local":
                for _, handle, _ in self.running.values():
                    handle.cancel(check=False)
            raise
        return self.submitted


def _params(trial: Trial) -> str:
    return " ".join(f"{k}={param_text(v)}" for k, v in trial.axes.items())


def _slurm_jobs(info: dict[str, Any]) -> dict[str, str]:
    jobs: dict[str, str] = {}
    for submission in info.get("submissions", []):
        if submission.get("cluster") == "slurm":
            jobs.update(submission.get("jobs", {}))
    return jobs


def _check_plan(sweep: Sweep, trial: Trial, cluster: str) -> None:
    ex = sweep.spec.executor
    nodes = ex.nodes if cluster == "slurm" else 1
    processes = 1 if cluster == "debug" else nodes * ex.processes_per_node()
    if cluster == "local" and ex.nodes != 1:
        raise HmamlError(f"{sweep.path}: executor.nodes={ex.nodes}: the local cluster has one "
                         "node")
    if ex.packed:
        raise HmamlError(f"{sweep.path}: executor.trials_per_gpu={ex.trials_per_gpu}: a search "
                         "runs each trial as its own job (search.parallel sets how many at once)")
    try:
        make_plan(trial.cfg, processes, nodes=nodes)
    except HmamlError as exc:
        raise HmamlError(f"{sweep.path}: search trials: {exc} ({processes} processes on "
                         f"{nodes} node{'s' if nodes > 1 else ''}, cluster {cluster})") from None


def _storage_warning(sweep: Sweep, storage: str, cluster: str) -> str | None:
    search = sweep.spec.search
    if cluster != "slurm" or not storage.startswith("sqlite:") or search is None \
            or search.pruner is None:
        return None
    return (f"warning: search.storage={storage}: pruned SLURM trials report to one SQLite file "
            "from many nodes; on a shared filesystem use the PostgreSQL of docker/compose.yaml "
            "(search.storage=postgresql://...)")


def _describe_pruner(pruner: PrunerSpec, epochs: int) -> str:
    if pruner.name == "hyperband":
        return (f"hyperband ({pruner.min_epochs} to {epochs} epochs, reduction factor "
                f"{pruner.reduction_factor})")
    kept = f"best {pruner.percentile:g} %, " if pruner.name == "percentile" else ""
    return (f"{pruner.name} ({kept}startup {pruner.startup_trials} trials, warm-up "
            f"{pruner.warmup_epochs} epochs)")


def describe_search(sweep: Sweep, storage: str, cluster: str, epochs: int) -> str:
    search = sweep.spec.search
    assert search is not None
    lines = [f"sweep {sweep.name}: an Optuna search of {search.n_trials} trials of "
             f"{sweep.spec.base}, {search.parallel} at a time, in {sweep.sweep_dir}",
             f"  {search.direction} {search.metric}; sampler {search.sampler.name} (seed "
             f"{search.sampler.seed}); pruner "
             + (_describe_pruner(search.pruner, epochs) if search.pruner else "off"),
             f"  study {sweep.name} in {storage}",
             f"MLflow: {sweep.tracking_uri} experiment {sweep.experiment}"
             + ("" if sweep.tracking_enabled else " (tracking disabled)")]
    for key, dist in search.space.items():
        kind, arg = next(iter(dist.items()))
        lines.append(f"  {key}: {kind} {arg}")
    for point in search.enqueue:
        lines.append(f"  first: {point}")
    lines.append(f"executor ({cluster}):")
    for key, value in executor_parameters(sweep.spec.executor, cluster).items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _parent_run(sweep: Sweep, old: dict[str, Any] | None) -> str | None:
    if not sweep.tracking_enabled:
        return None
    search = sweep.spec.search
    assert search is not None
    params: dict[str, Any] = {"sweep.base": sweep.spec.base, "search.n_trials": search.n_trials,
                              "search.metric": search.metric,
                              "search.direction": search.direction,
                              "search.sampler": search.sampler.name,
                              "search.pruner": search.pruner.name if search.pruner else "off",
                              **{f"search.space.{k}": json.dumps(v)
                                 for k, v in search.space.items()}}
    tags = {"sweep.name": sweep.name, "sweep.dir": str(sweep.sweep_dir),
            "sweep.file": str(Path(sweep.path).resolve()), "optuna.study": sweep.name}
    tracker = Tracker(consequence="the search's trials still run, without a parent run")
    tracker.open(sweep.tracking_uri, sweep.experiment, sweep.name, params, tags,
                 run_id=(old or {}).get("parent_run_id"), start_tags={"hmaml.kind": "search"})
    return tracker.run_id if tracker.active else None
