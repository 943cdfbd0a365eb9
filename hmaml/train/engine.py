"""The distributed engine: one recipe for the Accelerator of every entry point (training,
pre-training, the test protocol, ``predict``), the launch it belongs to, and rank agreement.

DDP, or DeepSpeed ZeRO-1/2 when ``accelerate launch`` was given a DeepSpeed config; the device
is ``train.device``'s. Every fallback the libraries would take silently (DeepSpeed becoming
DDP, ranks training alone, another device) is an error here. The launch is read before any
process group exists (from an accelerate config file or from what the launcher exported), so
``--dry-run`` and the sweep's pre-submission check plan for the launch a job will get.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs

from hmaml.config import Config, parse_yaml, to_yaml
from hmaml.data.format import MANIFEST_NAME
from hmaml.data.store import is_remote
from hmaml.errors import HmamlError
from hmaml.train.plan import Plan, make_plan


@dataclass(frozen=True)
class Launch:
    """What a launcher will start: processes, nodes, engine and device kind."""

    processes: int
    nodes: int
    engine: str  # "DDP" or "DeepSpeed ZeRO-<stage>"
    on_cpu: bool


_ENGINES = {"NO": "DDP", "MULTI_GPU": "DDP", "MULTI_CPU": "DDP"}


def is_rank0() -> bool:
    """Rank 0 of the launch, known before any process group exists (torchrun, srun)."""
    return int(os.environ.get("RANK", "0")) == 0


def deepspeed_requested() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it says so in the env)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def pick_device(name: str) -> str:
    """``train.device``: ``auto`` is CUDA where torch sees a GPU, else Apple's MPS, else the
    CPU; a device asked for by name must be there (no silent fallback to the CPU)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        return next(device for device in ("cuda", "mps", "cpu") if available[device])
    if not available.get(name, False):
        raise HmamlError(f"train.device={name}: torch sees no {name.upper()} device here "
                         f"(torch {torch.__version__}); use train.device=auto or cpu")
    return name


def check_engine(engine: str, precision: str, on_cpu: bool) -> None:
    """Refuse an engine/precision/device combination that cannot work, in one line."""
    if engine.startswith("DeepSpeed") and on_cpu and precision == "fp16":
        raise HmamlError("train.mixed_precision=fp16 under DeepSpeed on CPU is not supported "
                         "by DeepSpeed (dtype mismatch); use train.mixed_precision=auto or "
                         "bf16 (autocast inside the model), or plain DDP")


def launch_from_file(path: str | Path) -> Launch:
    """The launch an Accelerate config file describes (``accelerate launch --config_file``)."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text(), str(path), kind="an accelerate config")
    except OSError as exc:
        raise HmamlError(f"{path}: cannot read ({exc.strerror})") from None
    kind = str(raw.get("distributed_type", "NO"))
    if kind == "DEEPSPEED":
        stage = (raw.get("deepspeed_config") or {}).get("zero_stage")
        if stage not in (1, 2):
            raise HmamlError(f"{path}: deepspeed_config.zero_stage={stage!r}: hmaml supports "
                             "ZeRO stages 1 and 2")
        engine = f"DeepSpeed ZeRO-{stage}"
    elif kind in _ENGINES:
        engine = _ENGINES[kind]
    else:
        raise HmamlError(f"{path}: distributed_type={kind!r} is not one of "
                         f"{', '.join([*_ENGINES, 'DEEPSPEED'])}")
    try:
        processes = int(raw.get("num_processes", 1))
        nodes = int(raw.get("num_machines", 1))
    except (TypeError, ValueError):
        raise HmamlError(f"{path}: num_processes and num_machines must be integers") from None
    return Launch(processes, nodes, engine, bool(raw.get("use_cpu", False)))


def launch_from_env() -> Launch:
    """The launch this process belongs to, from what torchrun / accelerate launch export."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    engine = "DDP"
    if deepspeed_requested():
        engine = f"DeepSpeed ZeRO-{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    return Launch(processes, max(processes // max(local, 1), 1), engine,
                  not torch.cuda.is_available())


def dry_run(cfg: Config, launch: Launch) -> str:
    """The resolved config, the distributed plan and the state of the packs, as text: what a
    person checks before queueing a job. Raises the error the launch itself would raise."""
    check_engine(launch.engine, cfg.train.mixed_precision, launch.on_cpu)
    plan = make_plan(cfg, launch.processes, nodes=launch.nodes, engine=launch.engine)
    device = "CPU" if launch.on_cpu else "GPU"
    packs = []
    for key, pack in (("data.train_pack", cfg.data.train_pack),
                      ("data.eval_pack", cfg.data.eval_pack or cfg.data.train_pack)):
        state = "remote: read when the run starts" if is_remote(pack) else \
            "ok" if (Path(pack) / MANIFEST_NAME).is_file() else \
            "missing; pack it with launch/pack.py, see the Datasets section of docs/data.md"
        packs.append(f"  {key}: {pack} ({state})")
    return "\n".join([
        f"# config {cfg.name} (resolved)", to_yaml(cfg).rstrip(), "",
        f"# plan on {device}", *(f"  {line}" for line in plan.lines()), "", "# data", *packs,
        "", "dry run: nothing was trained"])


def make_accelerator(cfg: Config, *, training: bool = True) -> Accelerator:
    """The Accelerator for this process, checked against what the launcher intended: one
    recipe for training, pre-training, the test protocol and ``predict``.

    On CPU, Accelerate needs ``cpu=True`` for DDP ranks to form a (gloo) process group; without
    it every rank silently trains alone. But ``cpu=True`` silently turns DeepSpeed into DDP, so
    DeepSpeed on CPU gets ``cpu=False`` with gloo named explicitly. The checks against
    ``WORLD_SIZE`` and the engine asked for make every such fallback loud. ``training=False``
    (evaluation: no optimizer to partition, no loss to scale) forms the plain process group
    whatever engine the launch names.
    """
    device = pick_device(cfg.train.device)
    on_cpu = device == "cpu"
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = training and deepspeed_requested()
    if deepspeed:
        check_engine("DeepSpeed", cfg.train.mixed_precision, on_cpu)
    # an explicit timeout: a rank that stops answering ends the others' wait in
    # train.dist_timeout_s, not in torch's default (10 min over NCCL, 30 over gloo)
    handlers = [InitProcessGroupKwargs(
        timeout=timedelta(seconds=cfg.train.dist_timeout_s),
        **({"backend": "gloo"} if on_cpu else {}))] if expected > 1 else []
    # bf16 is autocast inside the method, around the encoder only (hmaml.precision);
    # Accelerate's own mixed precision is needed for fp16 alone, for its loss scaler
    fp16 = training and cfg.train.mixed_precision == "fp16"
    accelerator = Accelerator(cpu=on_cpu and not deepspeed,
                              mixed_precision="fp16" if fp16 else "no", kwargs_handlers=handlers)
    if accelerator.num_processes != expected:
        raise HmamlError(f"launched as {expected} processes (WORLD_SIZE) but Accelerate formed "
                         f"a group of {accelerator.num_processes}: on CPU use "
                         "configs/accelerate/cpu2.yaml or torchrun")
    if accelerator.device.type != device:
        raise HmamlError(f"train.device={cfg.train.device} means {device}, but Accelerate "
                         f"chose {accelerator.device}")
    if deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise HmamlError(f"DeepSpeed was asked for but Accelerate set up "
                         f"{accelerator.distributed_type}; is the deepspeed extra installed?")
    return accelerator


def engine_name(accelerator: Accelerator) -> str:
    """'single', 'DDP' or 'DeepSpeed ZeRO-<stage>' for the header, the plan and MLflow."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "DDP" if accelerator.num_processes > 1 else "single"


def configure_deepspeed(accelerator: Accelerator, plan: Plan, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config from hmaml's own keys, before ``prepare``.

    hmaml runs its micro-batches itself and marks the last one as the accumulation boundary,
    so DeepSpeed accumulates nothing of its own (one hmaml step is one DeepSpeed step);
    clipping comes from ``train.max_grad_norm`` alone (0 disables it in DeepSpeed), never from
    Accelerate's default of 1.0; the micro-batch size is the largest one of the plan.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    micro = max(len(mb.tasks) for mb in plan.rank_steps(0)[0])
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro * plan.processes
    ds["gradient_clipping"] = float(max_grad_norm or 0.0)
    accelerator.gradient_accumulation_steps = 1


def agree(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (one tiny all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() == 0)


__all__ = ["Launch", "agree", "check_engine", "configure_deepspeed", "deepspeed_requested",
           "dry_run", "engine_name", "is_rank0", "launch_from_env", "launch_from_file",
           "make_accelerator", "pick_device"]
