"""Sweeps: many trials of one base config, run as a SLURM job array, local processes or in-process.

A sweep file names a ``base`` config, ``overrides`` for every trial and the axes to vary:
``grid`` (every combination of its value lists), ``variants`` (an explicit list of named override
sets, for settings that depend on each other), ``random`` (``samples`` draws from a ``space``) and
``seeds``. Trials are the product ``variants x grid x random x seeds``; each is a fully resolved
:class:`~hmaml.config.Config` whose ``run_dir`` is ``<sweep_dir>/<trial name>``.

Everything about a trial lives in its run directory, so a sweep can be submitted again at any time:
finished trials (``test.json``) are skipped, the others resume from their last checkpoint.
``<sweep_dir>/sweep.json`` keeps the trial list and the MLflow parent run, so every submission of a
sweep reports to the same parent run.

Preemption and timeouts (SLURM, and submitit's local executor): submitit sends the job ``SIGUSR2``
(``signal_delay_s`` before the time limit, or at a preemption when the cluster forwards it) and
calls the callable's ``checkpoint()`` *inside that signal handler*, dumps the submission it returns,
requeues the job and exits the process at once (``sys.exit``), whatever the training was doing.
:class:`TrialJob` puts its own handler in front: the first signal only sets the flag that the
training loop polls at every step boundary, where it writes a checkpoint and returns; the job then
hands the signal to submitit, which requeues it. Should the loop not reach a step boundary within
half of ``signal_delay_s``, the signal is sent again and goes straight to submitit (requeue and
exit); the requeued trial then resumes from the checkpoint of its last finished epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hmaml.config import Config, load_config, override_text, resolve_config_path, validate
from hmaml.errors import HmamlError

CLUSTERS = ("slurm", "local", "debug")
SPACE_KINDS = ("choice", "uniform", "loguniform")
SWEEP_JSON = "sweep.json"
TRIAL_JSON = "trial.json"  # written by the job: running / preempted / failed / finished
STATES = ("pending", "running", "preempted", "finished", "failed")
SUMMARY_FILES = ("summary.md", "summary.csv", "summary.png")
# submitit's LocalExecutor sends the timeout signal this long before its limit (not settable
# through AutoExecutor).
LOCAL_SIGNAL_DELAY_S = 30
# Keys the sweep sets itself for every trial.
RESERVED_KEYS = ("run_dir", "tracking.run_name")
# Keys that must be equal for all trials (one parent run holds all children).
COMMON_KEYS = ("tracking.uri", "tracking.experiment", "tracking.enabled")
_TRIAL_NAME_CHARS = re.compile(r"[^A-Za-z0-9.+-]+")
_POLL_S = 0.5


# --- schema ---------------------------------------------------------------------------------


@dataclass
class ExecutorSpec:
    """Where and with what resources trials run (SLURM keys are ignored by ``local``)."""

    cluster: str = "slurm"  # default of --cluster
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0  # one task (process) per GPU; 0: one CPU task
    cpus_per_task: int = 4
    mem_gb: float | None = None
    timeout_min: int = 60
    array_parallelism: int = 64  # SLURM: trials of the array running at once
    max_local_parallel: int = 2  # local: trial processes running at once
    signal_delay_s: int = 120  # SLURM: warning signal this long before the time limit
    max_num_timeout: int = 10  # requeues after a timeout (preemptions do not count)


@dataclass
class RandomSpec:
    samples: int = 0
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)  # key -> {choice|uniform|loguniform: ..}


@dataclass
class VariantSpec:
    name: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepSpec:
    base: str = ""
    name: str | None = None  # default: the sweep file's stem
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, Any] | None = None
    variants: list[VariantSpec] | None = None
    random: RandomSpec | None = None
    seeds: list[int] | None = None  # default: the base config's seed
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    sweep_dir: str | None = None  # default: runs/sweeps/<name>


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: its name, axis values (``seed`` last) and resolved config."""

    name: str
    axes: dict[str, Any]
    overrides: dict[str, Any]
    cfg: Config


@dataclass
class Sweep:
    """A loaded sweep file: its spec, where it lives and its expanded trials."""

    path: Path
    spec: SweepSpec
    name: str
    sweep_dir: Path
    tracking_uri: str
    experiment: str
    tracking_enabled: bool
    trials: list[Trial]


# --- loading --------------------------------------------------------------------------------


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file and expand its trials (each config validated)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise HmamlError(f"{path}: cannot read sweep file ({exc.strerror})") from None
    try:
        node = OmegaConf.create(text)
    except Exception as exc:
        raise HmamlError(f"{path}: not valid YAML ({_first_line(exc)})") from None
    if not isinstance(node, DictConfig):
        raise HmamlError(f"{path}: a sweep file must be a mapping of keys to values")
    raw = OmegaConf.to_container(node, resolve=False)
    _check_sweep_keys(raw, path)
    try:
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepSpec), raw))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise HmamlError(f"{path}: {key}: {_first_line(exc)}") from None
    assert isinstance(spec, SweepSpec)
    _check_spec(spec, path)
    return _expand(spec, path)


def _check_sweep_keys(raw: dict[str, Any], path: Path) -> None:
    def check(node: Any, schema: type, where: str) -> None:
        if node is None:
            return
        if not isinstance(node, dict):
            raise HmamlError(f"{path}: '{where}' must be a mapping, got {node!r}")
        names = [f.name for f in dataclasses.fields(schema)]
        for key in node:
            if key not in names:
                at = f"in '{where}'" if where else "at the top level"
                dotted = f"{where}.{key}" if where else key
                raise HmamlError(f"{path}: unknown key '{dotted}'; valid keys {at}: "
                                 f"{', '.join(names)}")

    check(raw, SweepSpec, "")
    check(raw.get("executor"), ExecutorSpec, "executor")
    check(raw.get("random"), RandomSpec, "random")
    variants = raw.get("variants")
    if isinstance(variants, list):
        for i, variant in enumerate(variants):
            check(variant, VariantSpec, f"variants[{i}]")


def _check_spec(spec: SweepSpec, path: Path) -> None:
    def fail(why: str) -> None:
        raise HmamlError(f"{path}: {why}")

    if not spec.base.strip():
        fail("'base' must name a config (name in configs/ or a path)")
    if spec.name is not None and not _TRIAL_NAME_CHARS.sub("", spec.name):
        fail(f"name={spec.name!r} must contain letters or digits")
    if spec.grid is not None:
        if not spec.grid:
            fail("grid is empty (give it 'key: [values]' entries or remove it)")
        for key, values in spec.grid.items():
            if not isinstance(values, list):
                fail(f"grid.{key} must be a list of values, got {values!r}")
            if not values:
                fail(f"grid.{key} is empty")
    if spec.variants is not None:
        if not spec.variants:
            fail("variants is empty (give it entries or remove it)")
        seen: set[str] = set()
        for i, variant in enumerate(spec.variants):
            if not variant.name or _TRIAL_NAME_CHARS.search(variant.name):
                fail(f"variants[{i}].name={variant.name!r} must be a non-empty name of letters, "
                     f"digits, '.', '+' and '-'")
            if variant.name in seen:
                fail(f"variants[{i}].name={variant.name!r} is used twice")
            seen.add(variant.name)
    if spec.random is not None:
        _check_random(spec.random, fail)
    if spec.seeds is not None:
        if not spec.seeds:
            fail("seeds is empty (give it seeds or remove it)")
        if len(set(spec.seeds)) != len(spec.seeds):
            fail(f"seeds={spec.seeds} repeats a seed")
    _check_executor(spec.executor, fail)


def _check_random(rnd: RandomSpec, fail: Callable[[str], None]) -> None:
    if rnd.samples < 1:
        fail(f"random.samples={rnd.samples} must be >= 1")
    if not rnd.space:
        fail("random.space is empty")
    for key, dist in rnd.space.items():
        where = f"random.space.{key}"
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SPACE_KINDS:
            fail(f"{where} must be one of {{choice: [..]}}, {{uniform: [a, b]}}, "
                 f"{{loguniform: [a, b]}}, got {dist!r}")
        kind, arg = next(iter(dist.items()))
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                fail(f"{where}.choice is empty" if arg == [] else
                     f"{where}.choice must be a list of values, got {arg!r}")
            continue
        if (not isinstance(arg, list) or len(arg) != 2
                or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in arg)
                or not arg[0] < arg[1]):
            fail(f"{where}.{kind} must be [low, high] numbers with low < high, got {arg!r}")
        if kind == "loguniform" and arg[0] <= 0:
            fail(f"{where}.loguniform needs low > 0, got {arg!r}")


def _check_executor(ex: ExecutorSpec, fail: Callable[[str], None]) -> None:
    if ex.cluster not in CLUSTERS:
        fail(f"executor.cluster={ex.cluster!r} is not one of {', '.join(CLUSTERS)}")
    for key, low in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1),
                     ("timeout_min", 1), ("array_parallelism", 1), ("max_local_parallel", 1),
                     ("signal_delay_s", 1), ("max_num_timeout", 0)):
        value = getattr(ex, key)
        if value < low:
            fail(f"executor.{key}={value} must be >= {low}")
    if ex.mem_gb is not None and not ex.mem_gb > 0:
        fail(f"executor.mem_gb={ex.mem_gb} must be > 0")


def _flat(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{train: {lr: 1}}`` and ``{train.lr: 1}`` alike become ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _expand(spec: SweepSpec, path: Path) -> Sweep:
    name = spec.name or path.stem
    try:
        base_path = resolve_config_path(spec.base, near=path.parent)
    except HmamlError as exc:
        raise HmamlError(f"{path}: base: {exc}") from None
    common = _flat(spec.overrides)
    variants = spec.variants or [None]
    grid = _flat(spec.grid or {})
    grid_points = [dict(zip(grid, combo, strict=True))
                   for combo in itertools.product(*grid.values())] or [{}]
    random_points = _random_points(spec.random) if spec.random else [{}]
    random_keys = list(spec.random.space) if spec.random else []
    axis_sources = {"grid": list(grid), "random": random_keys}
    if spec.variants:
        axis_sources["variants"] = sorted({k for v in spec.variants for k in _flat(v.overrides)})
    _check_axis_keys(axis_sources, common, path)

    base_cfg = _resolve(base_path, common, f"{path}: overrides")
    seeds = spec.seeds if spec.seeds is not None else [base_cfg.seed]
    from hmaml.train.tracking import tracking_uri

    uri = tracking_uri(base_cfg)
    experiment = base_cfg.tracking.experiment or name
    sweep_dir = _absolute(spec.sweep_dir or f"runs/sweeps/{name}")
    short = _short_names([*grid, *random_keys])

    trials: list[Trial] = []
    for variant in variants:
        for point in grid_points:
            for r_index, r_point in enumerate(random_points):
                for seed in seeds:
                    axes: dict[str, Any] = {}
                    parts: list[str] = []
                    overrides = dict(common)
                    if variant is not None:
                        axes["variant"] = variant.name
                        parts.append(variant.name)
                        overrides.update(_flat(variant.overrides))
                    for key, value in point.items():
                        axes[key] = value
                        parts.append(f"{short[key]}={_name_value(value)}")
                    if r_point:
                        parts.append(f"r{r_index:02d}")
                    for key, value in r_point.items():
                        axes[key] = value
                        parts.append(f"{short[key]}={_name_value(value)}")
                    overrides.update(point)
                    overrides.update(r_point)
                    axes["seed"] = seed
                    parts.append(f"seed={seed}")
                    overrides["seed"] = seed
                    trial_name = "_".join(parts)
                    where = f"{path}: trial {trial_name}"
                    fixed = {"run_dir": str(sweep_dir / trial_name),
                             "tracking.run_name": trial_name, "tracking.uri": uri,
                             "tracking.experiment": experiment}
                    cfg = _resolve(base_path, {**overrides, **fixed}, where)
                    trials.append(Trial(trial_name, axes, overrides, cfg))
    names = [t.name for t in trials]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise HmamlError(f"{path}: several trials get the name {duplicates[0]!r} "
                         f"(axis values that print alike); make the values distinct")
    return Sweep(path=path, spec=spec, name=name, sweep_dir=sweep_dir, tracking_uri=uri,
                 experiment=experiment, tracking_enabled=base_cfg.tracking.enabled,
                 trials=trials)


def _check_axis_keys(sources: dict[str, list[str]], common: dict[str, Any], path: Path) -> None:
    for key in common:
        if key in RESERVED_KEYS:
            raise HmamlError(f"{path}: overrides.{key} is set by the sweep for every trial")
    owner: dict[str, str] = {}
    for source, keys in sources.items():
        for key in keys:
            if key in RESERVED_KEYS:
                raise HmamlError(f"{path}: {source} may not vary '{key}' (the sweep sets it)")
            if key == "seed":
                raise HmamlError(f"{path}: {source} may not vary 'seed'; use 'seeds: [..]'")
            if key in COMMON_KEYS:
                raise HmamlError(f"{path}: {source} may not vary '{key}' (all trials report to "
                                 f"one parent run); set it in 'overrides'")
            if key in owner and owner[key] != source:
                raise HmamlError(f"{path}: '{key}' is varied by both {owner[key]} and {source}")
            owner[key] = source


def _random_points(rnd: RandomSpec) -> list[dict[str, Any]]:
    rng = random.Random(rnd.seed)
    points = []
    for _ in range(rnd.samples):
        point: dict[str, Any] = {}
        for key, dist in rnd.space.items():
            kind, arg = next(iter(dist.items()))
            if kind == "choice":
                point[key] = arg[rng.randrange(len(arg))]
            elif kind == "uniform":
                point[key] = float(f"{rng.uniform(arg[0], arg[1]):.6g}")
            else:
                log = rng.uniform(math.log(arg[0]), math.log(arg[1]))
                point[key] = float(f"{math.exp(log):.6g}")
        points.append(point)
    return points


def _resolve(base_path: Path, overrides: dict[str, Any], where: str) -> Config:
    items = [f"{key}={override_text(value)}" for key, value in overrides.items()]
    try:
        return validate(load_config(str(base_path), items))
    except HmamlError as exc:
        raise HmamlError(f"{where}: {exc}") from None


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each dotted key, or the whole key where two keys share that part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _name_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:.3g}"
    elif isinstance(value, list):
        text = "-".join(_name_value(v) for v in value) or "none"
    else:
        text = str(value)
    return _TRIAL_NAME_CHARS.sub("-", text).strip("-") or "none"


def _absolute(path: str) -> Path:
    given = Path(path).expanduser()
    return given if given.is_absolute() else Path.cwd() / given


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- the job --------------------------------------------------------------------------------


def _job_environment() -> Any:
    """submitit's environment of the running job, or None outside a submitit job."""
    import submitit

    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


def _usr_signal() -> signal.Signals:
    """The signal submitit uses for preemption and timeouts (``SIGUSR2`` unless configured)."""
    import submitit

    return getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")


def write_trial_state(run_dir: Path, state: str, error: str | None = None) -> None:
    """Record what the job is doing in ``run_dir/trial.json`` (atomically)."""
    env = _job_environment()
    payload = {"state": state, "host": socket.gethostname(), "pid": os.getpid(),
               "job_id": env.job_id if env is not None else None, "time": time.time(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "error": error}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{TRIAL_JSON}.tmp"
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, run_dir / TRIAL_JSON)


class TrialJob:
    """One trial as a checkpointable submitit callable (see the module docstring).

    Calling it trains ``cfg`` (resuming from ``cfg.run_dir``) as a child run of
    ``parent_run_id``; ``checkpoint()`` returns the submission that requeues it, which resumes
    from the run directory. ``request_stop()`` asks the training loop to checkpoint and return at
    its next step boundary.
    """

    def __init__(self, cfg: Config, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, grace_s: float = 45.0) -> None:
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.grace_s = grace_s
        self._reset()

    def _reset(self) -> None:
        self._stop = False
        self._signum: int | None = None
        self._previous: Any = None
        self._timer: threading.Timer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "parent_run_id": self.parent_run_id, "tags": self.tags,
                "grace_s": self.grace_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpoint protocol: requeue a fresh copy; it resumes from ``run_dir``."""
        from submitit.helpers import DelayedSubmission

        fresh = TrialJob(self.cfg, self.parent_run_id, self.tags, self.grace_s)
        return DelayedSubmission(fresh, *args, **kwargs)

    def __call__(self) -> dict[str, Any]:
        from hmaml.train.loop import train

        env = _job_environment()
        if env is not None and env.num_tasks > 1:
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export()
        main = env is None or env.global_rank == 0
        run_dir = Path(self.cfg.run_dir)
        self._reset()
        if main:
            write_trial_state(run_dir, "running")
        state, error = "preempted", None  # unless train returns or raises an error
        self._arm()
        try:
            try:
                result = train(self.cfg, parent_run_id=self.parent_run_id,
                               stop_requested=self.stop_requested, tags=self.tags)
            finally:
                previous = self._disarm()
            state = str(result.get("status", "finished"))
        except Exception as exc:
            state, error = "failed", f"{type(exc).__name__}: {_first_line(exc)}"
            raise
        finally:  # also after submitit's own requeue exit (SystemExit) or Ctrl-C: resumable
            if main:
                write_trial_state(run_dir, state, error)
        if state == "preempted" and self._signum is not None:
            previous(self._signum, None)  # submitit: checkpoint(), requeue, exit
        return result

    def _arm(self) -> None:
        """Put :meth:`_on_signal` in front of submitit's handler of the preemption signal."""
        if threading.current_thread() is not threading.main_thread():
            return
        sig = _usr_signal()
        previous = signal.getsignal(sig)
        if callable(previous):  # only inside a submitit job (or a test standing in for one)
            self._previous = previous
            signal.signal(sig, self._on_signal)

    def _disarm(self) -> Any:
        """Hand the signal back to submitit (a pending one then goes to it), stop the timer."""
        previous, self._previous = self._previous, None
        if previous is not None:
            signal.signal(_usr_signal(), previous)
        if self._timer is not None:
            self._timer.cancel()
        return previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signum is None:  # first signal: checkpoint at the next step boundary
            self._signum = signum
            self._stop = True
            self._timer = threading.Timer(self.grace_s, os.kill, (os.getpid(), signum))
            self._timer.daemon = True
            self._timer.start()
            return
        self._previous(signum, frame)  # no step boundary in time: submitit requeues now


# --- sweep directory ------------------------------------------------------------------------


def read_sweep_json(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_JSON
    try:
        return json.loads(path.read_text())
    except OSError:
        raise HmamlError(f"{sweep_dir}: not a sweep directory (no {SWEEP_JSON})") from None
    except json.JSONDecodeError as exc:
        raise HmamlError(f"{path}: unreadable ({exc.msg})") from None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


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


def trial_state(run_dir: str | Path) -> dict[str, Any]:
    """State, epoch, epochs, best val and test accuracy of one trial, from its run directory."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {"state": "pending", "epoch": None, "epochs": None,
                           "best_val_acc": None, "test_acc": None, "test_ci": None,
                           "error": None}
    progress = _read_json(run_dir / "progress.json")
    if progress:
        out.update(epoch=progress.get("epoch"), epochs=progress.get("epochs"),
                   best_val_acc=progress.get("best_val_acc"))
        if progress.get("status") in STATES:
            out["state"] = progress["status"]
    marker = _read_json(run_dir / TRIAL_JSON)
    if marker and marker.get("state") in STATES:
        out["state"] = marker["state"]
        out["error"] = marker.get("error")
    test = _read_json(run_dir / "test.json")
    if test:
        out.update(state="finished", test_acc=test.get("test_acc"), test_ci=test.get("test_ci"),
                   best_val_acc=test.get("best_val_acc", out["best_val_acc"]))
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _running_elsewhere(run_dir: Path, cluster: str, folder: Path) -> bool:
    """Whether the trial's last job is still alive (so submitting it again would run it twice)."""
    marker = _read_json(run_dir / TRIAL_JSON)
    if not marker or marker.get("state") != "running":
        return False
    if marker.get("host") == socket.gethostname() and marker.get("pid"):
        if int(marker["pid"]) == os.getpid():
            return False
        try:
            os.kill(int(marker["pid"]), 0)
        except (OSError, ValueError):
            return False
        return True
    if cluster == "slurm" and marker.get("job_id"):
        import submitit

        state = submitit.SlurmJob(folder / "%j", str(marker["job_id"])).state
        return state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING",
                         "SUSPENDED", "RESIZING")
    return False


# --- submission -----------------------------------------------------------------------------


def executor_parameters(spec: ExecutorSpec, cluster: str) -> dict[str, Any]:
    """The ``submitit.AutoExecutor.update_parameters`` keywords of a cluster."""
    tasks = max(spec.gpus_per_node, 1)
    if cluster == "slurm":
        params: dict[str, Any] = {
            "timeout_min": spec.timeout_min, "nodes": spec.nodes,
            "gpus_per_node": spec.gpus_per_node, "tasks_per_node": tasks,
            "cpus_per_task": spec.cpus_per_task, "mem_gb": spec.mem_gb,
            "slurm_partition": spec.partition, "slurm_account": spec.account,
            "slurm_qos": spec.qos, "slurm_array_parallelism": spec.array_parallelism,
            "slurm_signal_delay_s": spec.signal_delay_s,
            "slurm_setup": [f"export OMP_NUM_THREADS={spec.cpus_per_task}"]}
        return {k: v for k, v in params.items() if v is not None}
    if cluster == "local":
        if spec.nodes != 1:
            raise HmamlError(f"executor.nodes={spec.nodes}: the local cluster has one node")
        return {"timeout_min": spec.timeout_min, "gpus_per_node": spec.gpus_per_node,
                "tasks_per_node": tasks, "local_setup": ["export OMP_NUM_THREADS=1"]}
    return {}


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
    if cluster == "local":
        lines.append(f"  max_local_parallel: {sweep.spec.executor.max_local_parallel}")
    if cluster != "debug":
        lines.append(f"  max_num_timeout: {sweep.spec.executor.max_num_timeout}")
    if cluster == "slurm":
        lines.append(f"  one job array of {len(sweep.trials)} trials")
    return "\n".join(lines)


def submit(sweep_file: str | Path, cluster: str | None = None, dry_run: bool = False,
           echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Submit the unfinished trials of a sweep; returns ``{"submitted": {trial: job id}, ...}``.

    ``debug`` and ``local`` wait for the trials and then write the summary; ``slurm`` returns
    once the job array is queued (``--summarize`` later).
    """
    sweep = load_sweep(sweep_file)
    cluster = cluster or sweep.spec.executor.cluster
    if cluster not in CLUSTERS:
        raise HmamlError(f"cluster {cluster!r} is not one of {', '.join(CLUSTERS)}")
    if dry_run:
        echo(describe(sweep, cluster))
        return {"submitted": {}, "skipped": [], "dry_run": True}
    sweep_dir = sweep.sweep_dir
    folder = sweep_dir / "submitit"
    old = _read_json(sweep_dir / SWEEP_JSON)
    records = _merge_records(sweep, old)
    parent = _parent_run(sweep, old)
    info = {"name": sweep.name, "sweep_file": str(Path(sweep_file).resolve()),
            "base": sweep.spec.base, "tracking_uri": sweep.tracking_uri,
            "experiment": sweep.experiment, "parent_run_id": parent, "trials": records,
            "submissions": (old or {}).get("submissions", [])}
    _write_json(sweep_dir / SWEEP_JSON, info)

    todo, skipped = [], []
    for trial in sweep.trials:
        run_dir = Path(trial.cfg.run_dir)
        if (run_dir / "test.json").is_file() or _running_elsewhere(run_dir, cluster, folder):
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
    jobs = [(t, TrialJob(t.cfg, parent, _trial_tags(sweep, t), grace_s=delay / 2))
            for t in todo]
    if cluster == "debug":
        submitted = _run_debug(jobs, echo)
    elif cluster == "local":
        submitted = _run_local(jobs, sweep.spec.executor, folder, echo)
    else:
        submitted = _submit_slurm(jobs, sweep.spec.executor, folder, echo)
    info["submissions"].append({"time": time.time(), "cluster": cluster, "jobs": submitted})
    _write_json(sweep_dir / SWEEP_JSON, info)
    if cluster != "slurm":
        summarize(sweep_dir, echo=echo)
    return {"submitted": submitted, "skipped": skipped, "parent_run_id": parent}


def _parent_run(sweep: Sweep, old: dict[str, Any] | None) -> str | None:
    if not sweep.tracking_enabled:
        return None
    from hmaml.train.tracking import open_sweep_run

    params: dict[str, Any] = {"sweep.base": sweep.spec.base, "sweep.trials": len(sweep.trials)}
    for key in sweep.trials[0].axes:
        values = list(dict.fromkeys(json.dumps(t.axes[key]) for t in sweep.trials))
        params[f"sweep.axis.{key}"] = ", ".join(values)
    tags = {"sweep.name": sweep.name, "sweep.dir": str(sweep.sweep_dir),
            "sweep.file": str(sweep.path.resolve())}
    return open_sweep_run(sweep.tracking_uri, sweep.experiment, sweep.name,
                          (old or {}).get("parent_run_id"), params, tags)


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
            echo(f"[{trial.name}] failed: {type(exc).__name__}: {_first_line(exc)}")
            continue
        out[trial.name] = str(result.get("status"))
        echo(f"[{trial.name}] {_result_line(result)}")
        if result.get("status") == "preempted":
            echo("stop requested: the remaining trials are left for the next submission")
            break
    return out


def _run_local(jobs: list[tuple[Trial, TrialJob]], spec: ExecutorSpec, folder: Path,
               echo: Callable[[str], None]) -> dict[str, str]:
    """submitit local processes, at most ``max_local_parallel`` at a time; waits for all."""
    import submitit

    parallel = spec.max_local_parallel
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="local",
                                     local_max_num_timeout=spec.max_num_timeout)
    executor.update_parameters(**executor_parameters(spec, "local"))
    queue = list(jobs)
    running: dict[str, Any] = {}
    out: dict[str, str] = {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                trial, job = queue.pop(0)
                executor.update_parameters(name=trial.name)
                running[trial.name] = executor.submit(job)
                out[trial.name] = str(running[trial.name].job_id)
                echo(f"[{trial.name}] started as local job {running[trial.name].job_id}")
            time.sleep(_POLL_S)
            for name, handle in list(running.items()):
                if handle.done():
                    del running[name]
                    try:
                        echo(f"[{name}] {_result_line(handle.result())}")
                    except Exception as exc:
                        echo(f"[{name}] failed ({_first_line(exc)}); log: {handle.paths.stderr}")
    except KeyboardInterrupt:
        for handle in running.values():
            handle.cancel(check=False)
        raise
    return out


def _submit_slurm(jobs: list[tuple[Trial, TrialJob]], spec: ExecutorSpec, folder: Path,
                  echo: Callable[[str], None]) -> dict[str, str]:
    """One job array of all trials; returns at once."""
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm",
                                         slurm_max_num_timeout=spec.max_num_timeout)
    except RuntimeError as exc:
        raise HmamlError(f"cluster slurm: {_first_line(exc)} (use --cluster local or debug)"
                         ) from None
    executor.update_parameters(name=folder.parent.name, **executor_parameters(spec, "slurm"))
    with executor.batch():
        handles = [executor.submit(job) for _, job in jobs]
    out = {trial.name: str(h.job_id) for (trial, _), h in zip(jobs, handles, strict=True)}
    for name, job_id in out.items():
        echo(f"[{name}] queued as SLURM job {job_id}")
    return out


def _result_line(result: dict[str, Any]) -> str:
    if result.get("status") != "finished":
        return f"{result.get('status')} at epoch {result.get('epoch')}"
    return (f"finished: test {result['test_acc']:.2f} ± {result['test_ci']:.2f} %, "
            f"best val {result['best_val_acc']:.2f} %, {result['wall_s'] / 60:.1f} min")


# --- status and summary ---------------------------------------------------------------------


def status_table(sweep_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """The per-trial table printed by ``--status`` and its rows."""
    info = read_sweep_json(sweep_dir)
    rows = []
    for record in info["trials"]:
        state = trial_state(record["run_dir"])
        rows.append({"trial": record["name"], **state})
    table = [["trial", "state", "epoch", "best val", "test acc"]]
    for row in rows:
        epoch = f"{row['epoch']}/{row['epochs']}" if row["epochs"] else "-"
        test = (f"{row['test_acc']:.2f} ± {row['test_ci']:.2f}"
                if row["test_acc"] is not None else "-")
        table.append([row["trial"], row["state"], epoch, _pct(row["best_val_acc"]), test])
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    footer = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"{_text_table(table)}\n{footer}", rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_rows(info: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per axis point (seeds pooled) of the finished trials, and the axis keys.

    With one finished seed the ± is the test's 95 % CI over its episodes; with several it is
    1.96 · sd / sqrt(n) over the seeds' test accuracies.
    """
    trials = info["trials"]
    axis_keys = [k for k in (trials[0]["axes"] if trials else {}) if k != "seed"]
    groups: dict[str, dict[str, Any]] = {}
    for record in trials:
        point = {k: record["axes"][k] for k in axis_keys}
        group = groups.setdefault(json.dumps(point, sort_keys=True),
                                  {"point": point, "total": 0, "results": []})
        group["total"] += 1
        test = _read_json(Path(record["run_dir"]) / "test.json")
        if test and test.get("test_acc") is not None:
            group["results"].append(test)
    rows = []
    for group in groups.values():
        results = group["results"]
        row: dict[str, Any] = {**group["point"], "seeds": f"{len(results)}/{group['total']}"}
        if results:
            accs = [float(r["test_acc"]) for r in results]
            mean = sum(accs) / len(accs)
            if len(accs) > 1:
                sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
                ci, over = 1.96 * sd / math.sqrt(len(accs)), "seeds"
            else:
                ci, over = float(results[0].get("test_ci") or 0.0), "episodes"
            row.update(test_acc=mean, ci95=ci, ci_over=over,
                       best_val_acc=_mean([r.get("best_val_acc") for r in results]),
                       wall_min=_mean([(r.get("wall_s") or 0.0) / 60 for r in results]))
        else:
            row.update(test_acc=None, ci95=None, ci_over=None, best_val_acc=None, wall_min=None)
        rows.append(row)
    return axis_keys, rows


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize(sweep_dir: str | Path, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """(Re)build summary.md/.csv/.png in the sweep dir, print it, log it to the parent run."""
    sweep_dir = Path(sweep_dir)
    info = read_sweep_json(sweep_dir)
    axis_keys, rows = summary_rows(info)
    states = [trial_state(r["run_dir"])["state"] for r in info["trials"]]
    done = sum(s == "finished" for s in states)
    columns = [*axis_keys, "seeds", "test acc (%)", "± 95% CI", "CI over", "best val (%)",
               "wall (min)"]
    table = [columns] + [[*(override_text(r[k]) for k in axis_keys), r["seeds"],
                          _num(r["test_acc"]), _num(r["ci95"]), r["ci_over"] or "-",
                          _num(r["best_val_acc"]), _num(r["wall_min"], 1)] for r in rows]
    head = f"sweep {info['name']}: {done} of {len(states)} trials finished"
    echo(f"{head}\n{_text_table(table)}")

    md = [f"# {head}", "", _markdown(table), "", "## Trials", ""]
    trial_rows = [["trial", "state", "test acc (%)", "± 95% CI", "best val (%)"]]
    for record, state in zip(info["trials"], states, strict=True):
        test = _read_json(Path(record["run_dir"]) / "test.json") or {}
        trial_rows.append([record["name"], state, _num(test.get("test_acc")),
                           _num(test.get("test_ci")), _num(test.get("best_val_acc"))])
    md.append(_markdown(trial_rows))
    (sweep_dir / "summary.md").write_text("\n".join(md) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*axis_keys, "seeds", "test_acc", "ci95", "ci_over", "best_val_acc",
                     "wall_min"])
    for r in rows:
        writer.writerow([*(override_text(r[k]) for k in axis_keys), r["seeds"],
                         *("" if r[k] is None else r[k] for k in
                           ("test_acc", "ci95", "ci_over", "best_val_acc", "wall_min"))])
    (sweep_dir / "summary.csv").write_text(buffer.getvalue())
    _plot(axis_keys, rows, sweep_dir / "summary.png", info["name"])
    paths = [sweep_dir / name for name in SUMMARY_FILES]
    if info.get("parent_run_id"):
        from hmaml.train.tracking import close_sweep_run

        close_sweep_run(info["tracking_uri"], info["parent_run_id"], paths,
                        finished=done == len(states))
    return {"rows": rows, "finished": done, "trials": len(states), "files": paths}


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def _plot(axis_keys: list[str], rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """Test accuracy per axis point with its 95 % CI as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [", ".join(_name_value(r[k]) if k == "variant" else f"{k.rsplit('.', 1)[-1]}="
                        f"{_name_value(r[k])}" for k in axis_keys) or "all" for r in rows]
    heights = [r["test_acc"] or 0.0 for r in rows]
    errors = [r["ci95"] or 0.0 for r in rows]
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(rows)), heights, yerr=errors, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(rows)), labels, rotation=30 if len(rows) > 3 else 0, ha="right"
                  if len(rows) > 3 else "center", fontsize="small")
    ax.set_ylabel("test accuracy (%)")
    finite = [h - e for h, e in zip(heights, errors, strict=True) if h]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(heights) + max(errors) + 5))
    ax.set_title(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


__all__ = ["CLUSTERS", "ExecutorSpec", "RandomSpec", "Sweep", "SweepSpec", "Trial", "TrialJob",
           "VariantSpec", "describe", "executor_parameters", "load_sweep", "read_sweep_json",
           "status_table", "submit", "summarize", "summary_rows", "trial_state",
           "write_trial_state"]
