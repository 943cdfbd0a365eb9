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
and the sweep's pre-submission check all read the same one. Which launch and engine a process
belongs to is :mod:`hmaml.train.engine`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hmaml.config import Config
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


__all__ = ["MicroBatch", "Plan", "even_split", "make_plan"]
