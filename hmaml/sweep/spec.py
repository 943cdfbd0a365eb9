"""The sweep file: its schema, loading and checks, and the expansion into resolved trials.

A sweep file names a ``base`` config, ``overrides`` for every trial and the axes to vary:
``grid`` (every combination of its value lists), ``variants`` (an explicit list of named override
sets, for settings that depend on each other), ``random`` (``samples`` draws from a ``space``) and
``seeds``. Trials are the product ``variants x grid x random x seeds``; each is a fully resolved
:class:`~hmaml.config.Config` whose ``run_dir`` is ``<sweep_dir>/<trial name>``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hmaml.config import (
    Config,
    configs_dir,
    load_config,
    override_text,
    parse_yaml,
    resolve_config_path,
    validate,
)
from hmaml.errors import HmamlError, first_line

CLUSTERS = ("slurm", "local", "debug")
SPACE_KINDS = ("choice", "uniform", "loguniform")
#: What a search may optimise: numbers of a trial's test.json.
SEARCH_METRICS = ("best_val_acc", "test_acc", "train_tasks_per_s", "wall_s")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "percentile", "hyperband")
# Keys the sweep sets itself for every trial.
RESERVED_KEYS = ("run_dir", "tracking.run_name")
# sbatch options the executor writes itself -> the executor key that sets them (None: submitit's).
SBATCH_OWN = {"time": "timeout_min", "nodes": "nodes", "ntasks": "tasks_per_node",
              "ntasks-per-node": "tasks_per_node",
              "gpus-per-node": "gpus_per_node", "cpus-per-task": "cpus_per_task",
              "mem": "mem_gb", "partition": "partition", "account": "account", "qos": "qos",
              "signal": "signal_delay_s", "array": "array_parallelism", "job-name": None,
              "output": None, "error": None, "open-mode": None}
# Keys that must be equal for all trials (one parent run holds all children).
COMMON_KEYS = ("tracking.uri", "tracking.experiment", "tracking.enabled")
_TRIAL_NAME_CHARS = re.compile(r"[^A-Za-z0-9.+-]+")


# --- schema ---------------------------------------------------------------------------------


@dataclass
class ExecutorSpec:
    """Where and with what resources trials run (SLURM keys are ignored by ``local``)."""

    cluster: str = "slurm"  # default of --cluster
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # processes per node; default: one per GPU, else 1
    cpus_per_task: int = 4
    mem_gb: float | None = None
    timeout_min: int = 60
    array_parallelism: int = 64  # SLURM: jobs of the array running at once
    max_local_parallel: int = 2  # local, without GPUs: trial processes running at once
    trials_per_gpu: int = 1  # trials sharing one GPU (SLURM without GPUs: one job's CPUs)
    visible_gpus: list[int] | None = None  # local: the GPUs trials run on (default: all)
    signal_delay_s: int = 120  # SLURM: warning signal this long before the time limit
    max_num_timeout: int = 10  # requeues after a timeout (preemptions do not count)
    max_lost_rank_requeues: int = 3  # SLURM: requeues of a trial after one of its ranks died
    setup: list[str] = field(default_factory=list)  # SLURM: shell lines before the trial starts
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # SLURM: more #SBATCH

    def processes_per_node(self) -> int:
        """Processes (SLURM tasks) of a trial on each node."""
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def packed(self) -> bool:
        """Whether several trials share a GPU (or, on SLURM, one job)."""
        return self.trials_per_gpu > 1


@dataclass
class RandomSpec:
    samples: int = 0
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)  # key -> {choice|uniform|loguniform: ..}


@dataclass
class SamplerSpec:
    name: str = "tpe"  # tpe | random (Optuna's TPESampler, RandomSampler)
    seed: int = 0


@dataclass
class PrunerSpec:
    """An Optuna pruner on validation accuracy at the eval epochs: ``median``, ``percentile``
    (keep trials in the best ``percentile`` %) or ``hyperband`` (successive halving in brackets
    from ``min_epochs`` to the config's ``train.epochs``, by ``reduction_factor``)."""

    name: str = "median"
    startup_trials: int = 5  # median, percentile: trials that finish before any is pruned
    warmup_epochs: int = 0  # median, percentile: no pruning at validations before this epoch
    percentile: float = 25.0  # percentile: prune below the best 25 % at the same epoch
    min_epochs: int = 1  # hyperband: epochs every trial trains
    reduction_factor: int = 3  # hyperband: 1 / reduction_factor of a rung goes on


@dataclass
class SearchSpec:
    """An Optuna study over ``space``: ``n_trials`` trials, ``parallel`` at a time, each asked
    for when a running one ends (:mod:`hmaml.sweep.search`)."""

    engine: str = "optuna"
    n_trials: int = 0
    parallel: int = 1
    metric: str = "best_val_acc"  # a number of the trial's test.json (SEARCH_METRICS)
    direction: str = "maximize"
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec | None = None  # off by default
    storage: str | None = None  # an Optuna RDB URL; default sqlite:///<sweep_dir>/optuna.db
    space: dict[str, Any] = field(default_factory=dict)  # key -> {choice|uniform|loguniform: ..}
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # settings to try first


@dataclass
class RegisterSpec:
    """The registered model whose ``alias`` the summary moves to the best trial (by validation
    accuracy) once every trial has finished."""

    name: str = ""
    alias: str = "champion"


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
    register: RegisterSpec | None = None  # move an alias of a registered model to the best trial
    search: SearchSpec | None = None  # an Optuna search instead of grid/variants/random/seeds


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
    trials: list[Trial]  # a search's trials are made as it asks for them (search_trial)
    base_path: Path | None = None
    common: dict[str, Any] = field(default_factory=dict)


# --- loading --------------------------------------------------------------------------------


def resolve_sweep_path(path_or_name: str | Path) -> Path:
    """A path as given; a bare name that is no file (``search_quickstart``, ``.yaml``
    optional) is a shipped sweep of ``configs/sweeps``, so that a wheel's users can run them."""
    given = Path(path_or_name)
    if given.exists() or given.parent != Path("."):
        return given
    shipped = configs_dir() / "sweeps" / (given.name if given.suffix in (".yaml", ".yml")
                                          else f"{given.name}.yaml")
    if shipped.is_file():
        return shipped
    available = sorted(p.stem for p in (configs_dir() / "sweeps").glob("*.yaml"))
    raise HmamlError(f"sweep {str(path_or_name)!r} not found (no such file; configs/sweeps/ "
                     f"has: {', '.join(available)})")


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> Sweep:
    """Read and check a sweep file, apply ``key.sub=value`` ``overrides`` to it, and expand its
    trials (each config validated)."""
    path = resolve_sweep_path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise HmamlError(f"{path}: cannot read sweep file ({exc.strerror})") from None
    raw = apply_overrides(parse_yaml(text, str(path), "a sweep file"), overrides)
    _check_sweep_keys(raw, path)
    try:
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepSpec), raw))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise HmamlError(f"{path}: {key}: {first_line(exc)}") from None
    assert isinstance(spec, SweepSpec)
    _check_spec(spec, path)
    return _expand(spec, path)


#: Sections whose keys are config keys with dots of their own (``grid: {train.lr: [..]}``).
_FLAT_SECTIONS = ("overrides", "grid")


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """The sweep file's mapping with ``key.sub=value`` overrides applied: ``sweep_dir=DIR``,
    ``executor.trials_per_gpu=4``, ``overrides.data.train_pack=PACK`` (a trial override),
    ``seeds=[0,1]``. Values are read as YAML."""
    raw = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise HmamlError(f"sweep override {item!r} must look like key.sub=value")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))
            value = cast(dict[str, Any], parsed)["v"]  # a DictConfig's container: a dict
        except Exception as exc:
            raise HmamlError(f"sweep override {item!r}: {first_line(exc)}") from None
        section, _, rest = key.partition(".")
        if section in _FLAT_SECTIONS and rest:
            merged = _flat(dict(raw.get(section) or {}))
            merged[rest] = value
            raw[section] = merged
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[parts[-1]] = value
    return raw


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
    check(raw.get("register"), RegisterSpec, "register")
    search = raw.get("search")
    check(search, SearchSpec, "search")
    if isinstance(search, dict):
        check(search.get("sampler"), SamplerSpec, "search.sampler")
        check(search.get("pruner"), PrunerSpec, "search.pruner")
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
    if spec.search is not None:
        _check_search(spec, fail)
    if spec.register is not None:
        if not spec.register.name.strip():
            fail("register.name must name a registered model")
        if not spec.register.alias.strip():
            fail("register.alias must not be empty")


def _check_random(rnd: RandomSpec, fail: Callable[[str], None]) -> None:
    if rnd.samples < 1:
        fail(f"random.samples={rnd.samples} must be >= 1")
    _check_space(rnd.space, "random.space", fail)


def _check_search(spec: SweepSpec, fail: Callable[[str], None]) -> None:
    search = spec.search
    assert search is not None
    others = [k for k in ("grid", "variants", "random", "seeds") if getattr(spec, k) is not None]
    if others:
        fail(f"search cannot be combined with {', '.join(others)} (the study chooses the "
             "trials; put fixed settings, the seed too, in 'overrides')")
    if search.engine != "optuna":
        fail(f"search.engine={search.engine!r}: only optuna")
    if search.n_trials < 1:
        fail(f"search.n_trials={search.n_trials} must be >= 1")
    if search.parallel < 1:
        fail(f"search.parallel={search.parallel} must be >= 1")
    if search.metric not in SEARCH_METRICS:
        fail(f"search.metric={search.metric!r} is not one of {', '.join(SEARCH_METRICS)}")
    if search.direction not in ("maximize", "minimize"):
        fail(f"search.direction={search.direction!r} is not maximize or minimize")
    if search.sampler.name not in SAMPLERS:
        fail(f"search.sampler.name={search.sampler.name!r} is not one of {', '.join(SAMPLERS)}")
    if search.pruner is not None:
        if search.pruner.name not in PRUNERS:
            fail(f"search.pruner.name={search.pruner.name!r} is not one of {', '.join(PRUNERS)}")
        if search.metric != "best_val_acc":
            fail(f"search.pruner prunes on validation accuracy, so search.metric must be "
                 f"best_val_acc, not {search.metric}")
        pruner = search.pruner
        if pruner.startup_trials < 0 or pruner.warmup_epochs < 0:
            fail("search.pruner.startup_trials and warmup_epochs must be >= 0")
        if not 0.0 < pruner.percentile < 100.0:
            fail(f"search.pruner.percentile={pruner.percentile:g} must be in (0, 100)")
        if pruner.min_epochs < 1 or pruner.reduction_factor < 2:
            fail(f"search.pruner: min_epochs={pruner.min_epochs} must be >= 1 and "
                 f"reduction_factor={pruner.reduction_factor} >= 2")
        if pruner.name == "hyperband" and "train.epochs" in search.space:
            fail("search.pruner hyperband counts its rungs up to train.epochs, so "
                 "search.space may not vary train.epochs")
    _check_space(search.space, "search.space", fail)
    for key, dist in search.space.items():
        if "choice" in dist and not all(v is None or isinstance(v, bool | int | float | str)
                                        for v in dist["choice"]):
            fail(f"search.space.{key}.choice: Optuna chooses among numbers, strings, booleans "
                 f"and null, got {dist['choice']!r}")
    for i, point in enumerate(search.enqueue):
        unknown = sorted(set(point) - set(search.space))
        if unknown:
            fail(f"search.enqueue[{i}]: {unknown[0]!r} is not a key of search.space")


def _check_space(space: dict[str, Any], name: str, fail: Callable[[str], None]) -> None:
    if not space:
        fail(f"{name} is empty")
    for key, dist in space.items():
        where = f"{name}.{key}"
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
                     ("trials_per_gpu", 1), ("signal_delay_s", 1), ("max_num_timeout", 0),
                     ("max_lost_rank_requeues", 0)):
        value = getattr(ex, key)
        if value < low:
            fail(f"executor.{key}={value} must be >= {low}")
    if ex.mem_gb is not None and not ex.mem_gb > 0:
        fail(f"executor.mem_gb={ex.mem_gb} must be > 0")
    if ex.tasks_per_node is not None:
        if ex.tasks_per_node < 1:
            fail(f"executor.tasks_per_node={ex.tasks_per_node} must be >= 1")
        if ex.gpus_per_node and ex.tasks_per_node != ex.gpus_per_node:
            fail(f"executor.tasks_per_node={ex.tasks_per_node} must equal gpus_per_node="
                 f"{ex.gpus_per_node} (one process per GPU)")
    if ex.packed and (ex.gpus_per_node > 1 or ex.processes_per_node() > 1 or ex.nodes > 1):
        fail(f"executor.trials_per_gpu={ex.trials_per_gpu} packs one-process trials: it needs "
             f"gpus_per_node <= 1, one task per node and one node (got gpus_per_node="
             f"{ex.gpus_per_node}, tasks_per_node={ex.processes_per_node()}, nodes={ex.nodes})")
    if ex.visible_gpus is not None:
        if not ex.visible_gpus or len(set(ex.visible_gpus)) != len(ex.visible_gpus) or \
                any(not isinstance(g, int) or g < 0 for g in ex.visible_gpus):
            fail(f"executor.visible_gpus={ex.visible_gpus} must list distinct GPU indices >= 0")
        if ex.gpus_per_node > len(ex.visible_gpus):
            fail(f"executor.gpus_per_node={ex.gpus_per_node} is more than the "
                 f"{len(ex.visible_gpus)} executor.visible_gpus")
    for key, value in ex.additional_parameters.items():
        where = f"executor.additional_parameters.{key}"
        flag = str(key).replace("_", "-")
        if flag in SBATCH_OWN:
            own = SBATCH_OWN[flag]
            fail(f"{where} is written by the sweep itself"
                 + (f"; set executor.{own}" if own else " (submitit needs it)"))
        if value is False or value is None or not isinstance(value, str | int | float | bool):
            fail(f"{where}={value!r} must be a string or number (true: a flag without value)")


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


def _base(spec: SweepSpec, path: Path) -> tuple[str, Path, dict[str, Any]]:
    """The sweep's name, its base config's file and the overrides of every trial."""
    try:
        base_path = resolve_config_path(spec.base, near=path.parent)
    except HmamlError as exc:
        raise HmamlError(f"{path}: base: {exc}") from None
    return spec.name or path.stem, base_path, _flat(spec.overrides)


def _expand(spec: SweepSpec, path: Path) -> Sweep:
    if spec.search is not None:
        return _expand_search(spec, path)
    name, base_path, common = _base(spec, path)
    variants: Sequence[VariantSpec | None] = spec.variants or [None]
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
    if spec.register is not None and not all(t.cfg.tracking.enabled and t.cfg.tracking.log_model
                                             for t in trials):
        raise HmamlError(f"{path}: register needs tracking.enabled and tracking.log_model in "
                         "every trial (the registered version is a trial's logged model)")
    return Sweep(path=path, spec=spec, name=name, sweep_dir=sweep_dir, tracking_uri=uri,
                 experiment=experiment, tracking_enabled=base_cfg.tracking.enabled,
                 trials=trials)


def _expand_search(spec: SweepSpec, path: Path) -> Sweep:
    """A search's sweep: no trials yet, but every setting the study may pick (each choice, both
    ends of each range, each enqueued point) is checked to make a valid config now."""
    from hmaml.train.tracking import tracking_uri

    assert spec.search is not None
    name, base_path, common = _base(spec, path)
    _check_axis_keys({"search": list(spec.search.space)}, common, path)
    base_cfg = _resolve(base_path, common, f"{path}: overrides")
    sweep = Sweep(path=path, spec=spec, name=name,
                  sweep_dir=_absolute(spec.sweep_dir or f"runs/sweeps/{name}"),
                  tracking_uri=tracking_uri(base_cfg),
                  experiment=base_cfg.tracking.experiment or name,
                  tracking_enabled=base_cfg.tracking.enabled, trials=[], base_path=base_path,
                  common=common)
    if spec.register is not None and not (base_cfg.tracking.enabled
                                          and base_cfg.tracking.log_model):
        raise HmamlError(f"{path}: register needs tracking.enabled and tracking.log_model in "
                         "every trial (the registered version is a trial's logged model)")
    space = spec.search.space
    first = {key: _space_ends(dist)[0] for key, dist in space.items()}
    points = [{**first, key: value} for key, dist in space.items() for value in _space_ends(dist)]
    points += [{**first, **point} for point in spec.search.enqueue]
    for point in points:
        search_trial(sweep, 0, point)
    return sweep


def _space_ends(dist: dict[str, Any]) -> list[Any]:
    """Every choice, or both ends of a range."""
    return list(next(iter(dist.values())))


def search_trial(sweep: Sweep, number: int, params: dict[str, Any]) -> Trial:
    """Trial ``number`` of a search, with the study's ``params`` (its axes)."""
    assert sweep.base_path is not None
    name = f"t{number:03d}"
    fixed = {"run_dir": str(sweep.sweep_dir / name), "tracking.run_name": name,
             "tracking.uri": sweep.tracking_uri, "tracking.experiment": sweep.experiment}
    cfg = _resolve(sweep.base_path, {**sweep.common, **params, **fixed},
                   f"{sweep.path}: search trial {name}")
    return Trial(name, dict(params), dict(params), cfg)


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

