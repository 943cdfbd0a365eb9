"""Typed experiment configuration: dataclass schema, YAML files with ``base:`` inheritance,
``a.b=c`` overrides and validation that names the culprit.

A config is built in layers, each checked on its own so an error can name where it came from:
the schema defaults, then the ``base:`` chain of YAML files (deepest first), then the file itself,
then the command-line overrides. The result is a plain, fully resolved dataclass (no OmegaConf
nodes), cheap to read in the training loop and safe to pickle to worker processes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hmaml.errors import HmamlError, first_line

#: ``train.mixed_precision``: auto picks bf16 where the hardware runs it fast (hmaml.precision).
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
#: ``train.device``: auto takes CUDA, else Apple's MPS, else the CPU (hmaml.train.engine).
DEVICES = ("auto", "cuda", "mps", "cpu")

NONFINITE = ("stop", "skip")

# Keys whose values fix the parameter and optimizer-state shapes: a checkpoint can only be
# resumed by a config that agrees on all of them.
FINGERPRINT_KEYS = (
    "method.name",
    "method.hn_depth",
    "method.hn_width",
    "method.enhance",
    "model.encoder",
    "data.n_way",
)


@dataclass
class DataConfig:
    """Where tasks come from and what they look like."""

    train_pack: str = "shards/glyphs"
    eval_pack: str | None = None  # None: validate/test on train_pack (cross-domain: another pack)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    n_way: int = 5
    n_shot: int = 1
    n_query: int = 16  # per class, training and validation
    test_query: int = 15  # per class, test
    augment: str | None = None  # "natural" for CUB / mini-ImageNet training
    workers: int = 2
    buffer_mb: int = 512
    cache_dir: str | None = None  # remote packs (https://, s3://, pipe:...): keep shards here
    read_retries: int = 3  # remote reads: re-opens in a row before the run stops, naming the URL
    read_timeout_s: float = 60.0  # remote reads: seconds per network operation


@dataclass
class ModelConfig:
    encoder: str = "conv4"
    init: str = "authors"  # encoder weights: "authors" (their code's He fan-out normal) or "torch"
    init_from: str | None = None  # an encoder.pt of launch/pretrain.py: start from its weights


@dataclass
class PretrainConfig:
    """Supervised pre-training of the encoder (launch/pretrain.py): SGD with Nesterov momentum on
    mini-batches of images of all the training classes; lr, epochs, milestones, gamma and weight
    decay are the ``train`` section's."""

    batch_size: int = 128
    momentum: float = 0.9


@dataclass
class MethodConfig:
    """Hyperparameters of the few-shot method; the warm-up weight p(epoch) lives in the method."""

    name: str = "hypermaml"
    inner_steps: int = 1
    inner_lr: float = 0.1
    first_order: bool = False
    adapt: str = "head"  # MAML: adapt the classifier only ("head") or every weight ("all")
    hn_depth: int = 3
    hn_width: int = 512
    enhance: bool = True
    switch: bool = True
    warmup_start: int = 50  # W: epochs of pure MAML updates
    warmup_len: int = 500  # S: epochs of the MAML -> hypernetwork switch


@dataclass
class TrainConfig:
    epochs: int = 30
    episodes_per_epoch: int = 100
    meta_batch: int = 32  # tasks per optimizer step, summed over all processes
    grad_accum: int = 1  # at most this many micro-batches per process and step (less memory)
    lr: float = 1e-2
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.3
    weight_decay: float = 0.0
    mixed_precision: str = "auto"  # the encoder's precision: auto (bf16 where fast), no, bf16, fp16
    compile: bool = False  # torch.compile the method (for GPUs; not with method.adapt=all)
    device: str = "auto"  # auto (cuda, else mps, else cpu), cuda, mps or cpu
    max_grad_norm: float | None = None
    progress: bool = True
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop with an error, or skip the step
    nonfinite_patience: int = 10  # with skip: stop after this many non-finite steps in a row
    # how long a rank waits for the others in one collective before it gives up (several
    # processes): longer than rank 0's lone work between two (a checkpoint, MLflow logging)
    dist_timeout_s: int = 300


@dataclass
class EvalConfig:
    val_episodes: int = 100
    test_episodes: int = 600
    seed: int = 1234  # seeds the fixed validation and test episode lists
    tasks_per_batch: int | None = None  # None: as many as eval.memory_mb allows
    memory_mb: float = 512  # about the largest activation one evaluation batch may allocate
    every: int = 1  # validate every `every` epochs
    test_repeats: int = 1  # independent test lists: mean ± std of their means (the paper: 5)
    query_norm: str = "transductive"  # queries normalised with their own set's statistics, or
    #                                   "support": with the support set's (one image at a time)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the cwd
    experiment: str | None = None  # None: the config name
    log_checkpoint: bool = True
    log_model: bool = True  # the tested checkpoint as an MLflow pyfunc model (hmaml.mlflow_model)
    register: str | None = None  # a registered model name: the model becomes a new version of it
    run_name: str | None = None
    system_metrics: bool = True  # CPU / memory (and GPU with nvidia-ml-py) every 10 s, as system/*
    ui_url: str | None = None  # where the store's UI is served (None: an http store itself, else
    #                            mlflow ui's http://127.0.0.1:5000); used in the links printed


@dataclass
class Config:
    name: str = "quickstart"
    seed: int = 0
    run_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def configs_dir() -> Path:
    """The shipped configs: ``hmaml/configs`` inside the package (so a wheel has them; a
    checkout's top-level ``configs/`` points there)."""
    return Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, str]:
    """Every shipped experiment config: name -> the first sentence of its header comment."""
    out = {}
    for path in sorted(configs_dir().glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("# ").strip())
        text = " ".join(header)
        first = text.split(". ")[0].rstrip(".")
        out[path.stem] = first if len(first) <= 90 else first[:87].rstrip() + "..."
    return out


def config_keys() -> dict[str, list[str]]:
    """Section -> its keys (``data`` -> ``["train_pack", ...]``; top-level keys under ``""``)."""
    sections: dict[str, list[str]] = {}
    for key in flatten(Config()):
        section, _, name = key.rpartition(".")
        sections.setdefault(section, []).append(name)
    return sections


def resolve_config_path(path_or_name: str, near: Path | None = None) -> Path:
    """An existing path (``.yaml`` optional), else a name in ``configs/``.

    With ``near`` (the folder of a file naming it as ``base:``), a bare name is looked up in
    that folder first and the working directory is not searched.
    """
    given = Path(path_or_name)
    file_name = given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml"
    bare = given.parent == Path(".")
    if near is not None and bare:
        candidates = [near / file_name]
    else:
        candidates = [given, given.with_name(file_name)]
    if bare:
        candidates.append(configs_dir() / file_name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in configs_dir().glob("*.yaml"))
    raise HmamlError(f"config {path_or_name!r} not found (no such file; configs/ has: "
                     f"{', '.join(available) or 'nothing'})")


def load_config(path_or_name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The validated config of a YAML file (path, or name in ``configs/``) plus overrides."""
    path = resolve_config_path(path_or_name)
    layers = _file_layers(path, chain=())
    layers += _override_layers(overrides)
    return _build(layers)


def config_from_yaml(text: str, source: str = "<yaml>",
                     overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config from YAML text (e.g. the one stored in a checkpoint); ``base:`` is not allowed."""
    raw = parse_yaml(text, source)
    if "base" in raw:
        raise HmamlError(f"{source}: 'base' is only allowed in config files")
    return _build([(source, raw), *_override_layers(overrides)])


def validate(cfg: Config) -> Config:
    """Refuse values outside their allowed range; the message names the key."""
    _check(cfg, lambda key: "config")
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict of the resolved config."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text that :func:`config_from_yaml` reads back."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def flatten(cfg: Config) -> dict[str, str]:
    """Dotted keys to YAML-style strings: ``f"{k}={v}"`` is an override that sets the same value."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{dotted}.", value)
            else:
                out[dotted] = override_text(value)

    walk("", to_dict(cfg))
    return out


def fingerprint(cfg: Config) -> str:
    """Readable, canonical JSON of the :data:`FINGERPRINT_KEYS` (so a mismatch can be named)."""
    flat = to_dict(cfg)
    values = {}
    for key in FINGERPRINT_KEYS:
        section, name = key.split(".")
        values[key] = flat[section][name]
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


def fingerprint_diff(expected: str, found: str) -> list[str]:
    """``key: found -> expected`` for every fingerprint key on which two fingerprints differ."""
    try:
        a, b = json.loads(expected), json.loads(found)
    except (json.JSONDecodeError, TypeError):
        return ["<fingerprint unreadable>"]
    if not isinstance(a, dict) or not isinstance(b, dict):
        return ["<fingerprint unreadable>"]
    keys = sorted(set(a) | set(b))
    return [f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


# --- building -------------------------------------------------------------------------------

Layer = tuple[str, dict[str, Any]]


def override_text(value: Any) -> str:
    """A value as ``key=value`` override text that reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def parse_yaml(text: str, source: str, kind: str = "a config") -> dict[str, Any]:
    """YAML text -> a plain mapping, or a one-line error naming ``source``."""
    try:
        node = OmegaConf.create(text)
    except Exception as exc:
        raise HmamlError(f"{source}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(node, DictConfig):
        raise HmamlError(f"{source}: {kind} must be a mapping of keys to values")
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=False))  # a DictConfig: a dict


def _file_layers(path: Path, chain: tuple[Path, ...]) -> list[Layer]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise HmamlError(f"{path}: 'base' chain loops ({cycle})")
    try:
        text = path.read_text()
    except OSError as exc:
        raise HmamlError(f"{path}: cannot read ({exc.strerror})") from None
    raw = parse_yaml(text, str(path))
    base = raw.pop("base", None)
    layers: list[Layer] = []
    if base is not None:
        if not isinstance(base, str):
            raise HmamlError(f"{path}: 'base' must be a config name, got {base!r}")
        try:
            base_path = resolve_config_path(base, near=path.parent)
        except HmamlError as exc:
            raise HmamlError(f"{path}: base: {exc}") from None
        layers = _file_layers(base_path, (*chain, resolved))
    return [*layers, (str(path), raw)]


def _override_layers(overrides: list[str] | tuple[str, ...]) -> list[Layer]:
    layers: list[Layer] = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise HmamlError(f"override {item!r} must look like key.sub=value")
        try:
            node = OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise HmamlError(f"override {item!r}: {first_line(exc)}") from None
        raw = cast(dict[str, Any], OmegaConf.to_container(node, resolve=False))  # a dict
        layers.append((f"override {item!r}", raw))
    return layers


def _build(layers: list[Layer]) -> Config:
    merged = OmegaConf.structured(Config)
    for source, raw in layers:
        _check_keys(raw, Config, "", source)
        try:
            merged = OmegaConf.merge(merged, raw)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            raise HmamlError(f"{source}: {key}: {first_line(exc)}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise HmamlError(f"{_source_of(layers, key)}: {key}: {first_line(exc)}") from None
    assert isinstance(cfg, Config)
    _check(cfg, lambda key: _source_of(layers, key))
    return cfg


def _check_keys(raw: dict[str, Any], schema: type, prefix: str, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in list(raw.items()):
        dotted = f"{prefix}{key}"
        if key not in fields:
            where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
            raise HmamlError(f"{source}: unknown key '{dotted}'; valid keys {where}: "
                             f"{', '.join(fields)}")
        if dotted == "train.mixed_precision" and value is False:
            raw[key] = "no"  # YAML 1.1 reads a bare `no` as false
        sub = fields[key].default_factory  # sections are the only fields built by a factory
        if dataclasses.is_dataclass(sub):
            if value is None:  # a section whose keys are all commented out
                del raw[key]
                continue
            if not isinstance(value, dict):
                names = ", ".join(f.name for f in dataclasses.fields(sub))
                raise HmamlError(f"{source}: '{dotted}' is a section (keys: {names}), "
                                 f"not a value ({value!r})")
            _check_keys(value, sub, f"{dotted}.", source)


def _source_of(layers: list[Layer], dotted: str) -> str:
    """The last layer that set ``dotted`` (or the top file when none did, i.e. a default)."""
    parts = dotted.split(".")
    for source, raw in reversed(layers):
        node: Any = raw
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return source
    return layers[-1][0] if layers else "config"


def _check(cfg: Config, source_of: Any) -> None:
    """Value checks that types alone cannot express."""
    # The valid names are those of the code that builds them (imported here: it needs torch).
    from hmaml.data.transforms import PRESETS as AUGMENTS
    from hmaml.methods import METHODS
    from hmaml.methods.base import QUERY_NORMS
    from hmaml.methods.maml import ADAPT_MODES
    from hmaml.models import ENCODERS, INITS

    def fail(key: str, why: str) -> None:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name) if name else getattr(cfg, section)
        raise HmamlError(f"{source_of(key)}: {key}={value!r} {why}")

    def one_of(key: str, value: Any, choices: tuple[Any, ...]) -> None:
        if value not in choices:
            fail(key, f"is not one of {', '.join(str(c) for c in choices)}")

    def at_least(key: str, value: float, low: float) -> None:
        if value < low:
            fail(key, f"must be >= {low}")

    def positive(key: str, value: float) -> None:
        if not value > 0:
            fail(key, "must be > 0")

    if not cfg.name.strip():
        fail("name", "must not be empty")
    if not cfg.run_dir.strip():
        fail("run_dir", "must not be empty")
    d, m, t, e = cfg.data, cfg.method, cfg.train, cfg.eval
    if not d.train_pack.strip():
        fail("data.train_pack", "must not be empty")
    at_least("data.n_way", d.n_way, 2)
    at_least("data.n_shot", d.n_shot, 1)
    at_least("data.n_query", d.n_query, 1)
    at_least("data.test_query", d.test_query, 1)
    if d.augment is not None:
        one_of("data.augment", d.augment, AUGMENTS)
    at_least("data.workers", d.workers, 0)
    at_least("data.buffer_mb", d.buffer_mb, 1)
    one_of("eval.query_norm", e.query_norm, QUERY_NORMS)
    at_least("data.read_retries", d.read_retries, 0)
    positive("data.read_timeout_s", d.read_timeout_s)
    one_of("model.encoder", cfg.model.encoder, tuple(ENCODERS))
    one_of("model.init", cfg.model.init, INITS)
    at_least("pretrain.batch_size", cfg.pretrain.batch_size, 2)
    if not 0 <= cfg.pretrain.momentum < 1:
        fail("pretrain.momentum", "must be in [0, 1)")
    one_of("method.name", m.name, tuple(METHODS))
    at_least("method.inner_steps", m.inner_steps, 0)
    at_least("method.inner_lr", m.inner_lr, 0)
    one_of("method.adapt", m.adapt, ADAPT_MODES)
    at_least("method.hn_depth", m.hn_depth, 1)
    at_least("method.hn_width", m.hn_width, 1)
    at_least("method.warmup_start", m.warmup_start, 0)
    at_least("method.warmup_len", m.warmup_len, 0)
    at_least("train.epochs", t.epochs, 1)
    at_least("train.episodes_per_epoch", t.episodes_per_epoch, 1)
    at_least("train.meta_batch", t.meta_batch, 1)
    at_least("train.grad_accum", t.grad_accum, 1)
    positive("train.lr", t.lr)
    milestones = t.lr_milestones
    if milestones != sorted(set(milestones)) or any(x < 1 for x in milestones):
        fail("train.lr_milestones", "must be increasing epochs >= 1")
    if not 0 < t.lr_gamma <= 1:
        fail("train.lr_gamma", "must be in (0, 1]")
    at_least("train.weight_decay", t.weight_decay, 0)
    one_of("train.mixed_precision", t.mixed_precision, MIXED_PRECISION)
    one_of("train.device", t.device, DEVICES)
    if t.compile and m.name == "maml" and m.adapt == "all":
        fail("train.compile", "cannot run with method.adapt=all: MAML's inner steps "
             "differentiate through the encoder, which compiled graphs do not support (double "
             "backward); use train.compile=false")
    if t.max_grad_norm is not None:
        positive("train.max_grad_norm", t.max_grad_norm)
    one_of("train.nonfinite", t.nonfinite, NONFINITE)
    at_least("train.nonfinite_patience", t.nonfinite_patience, 1)
    at_least("train.dist_timeout_s", t.dist_timeout_s, 1)
    at_least("eval.val_episodes", e.val_episodes, 1)
    at_least("eval.test_episodes", e.test_episodes, 1)
    if e.tasks_per_batch is not None:
        at_least("eval.tasks_per_batch", e.tasks_per_batch, 1)
    positive("eval.memory_mb", e.memory_mb)
    at_least("eval.every", e.every, 1)
    at_least("eval.test_repeats", e.test_repeats, 1)
    if cfg.tracking.register is not None:
        if not cfg.tracking.register.strip():
            fail("tracking.register", "must be a model name (or null)")
        if not cfg.tracking.log_model:
            fail("tracking.register", "needs tracking.log_model=true (the registered version "
                 "is the run's logged model)")
    if d.val_split == d.test_split:  # both are read from the evaluation pack
        fail("data.test_split", f"is also data.val_split in {d.eval_pack or d.train_pack}: "
             "validation would select on the test set")
