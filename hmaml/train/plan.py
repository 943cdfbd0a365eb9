"""The distributed plan: which tasks each process trains on at every optimizer step.

One optimizer step consumes ``train.meta_batch`` tasks of the epoch's global task sequence
(``train.episodes_per_epoch`` tasks; the last step takes the remainder). The step's tasks are
split over the processes as evenly as possible (the first ``M mod W`` ranks take one more), with
no divisibility requirement, and each rank's share is cut into at most ``train.grad_accum``
micro-batches. Every task's loss is weighted ``W / M`` (M the step's task count), so that after
DDP's (or DeepSpeed's) average over ranks each task weighs exactly ``1 / M``: k processes make
the update of one process on the same tasks.

Every rank runs the same number of micro-batches per step (collective operations must match).
A rank with fewer tasks than that runs *padding* micro-batches: one real task of the step
evaluated with weight 0, so that it still joins the gradient all-reduce. The plan is a pure
function of the config and the world size, so the data stream, the training loop, ``--dry-run``
and the sweep's pre-submission check all read the same one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from hmaml.config import Config, parse_yaml, to_yaml
from hmaml.data.format import MANIFEST_NAME
from hmaml.data.store import is_remote
from hmaml.errors import HmamlError

MAX_PROCESSES = 4096


def even_split(total: int, parts: int) -> list[int]:
    """``total`` items in ``parts`` contiguous groups whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class MicroBatch:
    """Global task indices (within the epoch) of one micro-batch; ``padding``: weight 0."""

    tasks: tuple[int, ...]
    padding: bool = False


@dataclass(frozen=True)
class Plan:
    """How one epoch's tasks map onto processes, steps and micro-batches."""

    processes: int
    nodes: int
    episodes: int
    meta_batch: int
    grad_accum: int
    engine: str
    precision: str

    @property
    def step_tasks(self) -> list[int]:
        """Global tasks of each optimizer step of an epoch (the last one: the remainder)."""
        full, rest = divmod(self.episodes, self.meta_batch)
        return [self.meta_batch] * full + ([rest] if rest else [])

    @property
    def steps(self) -> int:
        return len(self.step_tasks)

    def micro_batches_of(self, tasks: int) -> int:
        """Micro-batches every rank runs in a step of ``tasks`` tasks."""
        return min(self.grad_accum, math.ceil(tasks / self.processes))

    def rank_steps(self, rank: int) -> list[list[MicroBatch]]:
        """Rank ``rank``'s micro-batches of each step of an epoch, with global task indices."""
        if not 0 <= rank < self.processes:
            raise HmamlError(f"rank {rank} outside 0..{self.processes - 1}")
        out, start = [], 0
        for tasks in self.step_tasks:
            shares = even_split(tasks, self.processes)
            first = start + sum(shares[:rank])
            mine = range(first, first + shares[rank])
            micro, offset = [], 0
            for size in even_split(len(mine), self.micro_batches_of(tasks)):
                if size:
                    micro.append(MicroBatch(tuple(mine[offset:offset + size])))
                else:  # a real task of this step, weighted 0: the rank still joins the all-reduce
                    micro.append(MicroBatch((start,), padding=True))
                offset += size
            out.append(micro)
            start += tasks
        return out

    def weight(self, step: int) -> float:
        """The loss weight of one task of ``step``: ``W / M`` (DDP then averages over W)."""
        return self.processes / self.step_tasks[step]

    def idle_share(self) -> float:
        """Fraction of micro-batch slots that are padding (work that does not train)."""
        slots = padding = 0
        for tasks in self.step_tasks:
            m = self.micro_batches_of(tasks)
            slots += m * self.processes
            padding += sum(m - min(m, s) for s in even_split(tasks, self.processes))
        return padding / slots if slots else 0.0

    def lines(self) -> list[str]:
        """The plan as a person reads it before launching (``launch/train.py --dry-run``)."""
        tasks = self.step_tasks
        per_rank = sorted({s for t in tasks for s in even_split(t, self.processes)})
        micro = sorted({self.micro_batches_of(t) for t in tasks})
        span = lambda xs: str(xs[0]) if len(xs) == 1 else f"{xs[0]}-{xs[-1]}"  # noqa: E731
        idle = self.idle_share()
        lines = [
            f"processes: {self.processes} ({self.nodes} node{'s' if self.nodes > 1 else ''}), "
            f"engine {self.engine}, precision {self.precision}",
            f"steps per epoch: {self.steps} ({self.episodes} tasks, {self.meta_batch} per step"
            f"{f', last step {tasks[-1]}' if tasks[-1] != self.meta_batch else ''})",
            f"tasks per rank per step: {span(per_rank)}; micro-batches per step: {span(micro)} "
            f"(train.grad_accum={self.grad_accum})",
        ]
        if idle > 0:
            lines.append(f"warning: {100 * idle:.0f}% of micro-batch slots are padding (more "
                         "processes than tasks per step); raise train.meta_batch or use fewer "
                         "processes")
        return lines


def make_plan(cfg: Config, processes: int, *, nodes: int = 1, engine: str = "DDP",
              precision: str | None = None) -> Plan:
    """The plan of ``cfg`` on ``processes`` processes, or a one-line error naming the culprit."""
    if not 1 <= processes <= MAX_PROCESSES:
        raise HmamlError(f"processes={processes} must lie in 1..{MAX_PROCESSES}")
    if nodes < 1 or processes % nodes:
        raise HmamlError(f"{processes} processes cannot be spread evenly over {nodes} nodes")
    t = cfg.train
    return Plan(processes=processes, nodes=nodes, episodes=t.episodes_per_epoch,
                meta_batch=t.meta_batch, grad_accum=t.grad_accum,
                engine=engine if processes > 1 or engine.startswith("DeepSpeed") else "single",
                precision=precision or t.mixed_precision)


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
    import torch

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
    import torch

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
            "missing; pack it with launch/pack.py, see the README's Datasets section"
        packs.append(f"  {key}: {pack} ({state})")
    return "\n".join([
        f"# config {cfg.name} (resolved)", to_yaml(cfg).rstrip(), "",
        f"# plan on {device}", *(f"  {line}" for line in plan.lines()), "", "# data", *packs,
        "", "dry run: nothing was trained"])


__all__ = ["Launch", "MicroBatch", "Plan", "check_engine", "deepspeed_requested", "dry_run",
           "even_split", "is_rank0", "launch_from_env", "launch_from_file", "make_plan"]
