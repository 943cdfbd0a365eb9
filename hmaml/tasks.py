"""The task batch: the one structure that data loading produces and every method consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from hmaml.errors import HmamlError


@dataclass
class TaskBatch:
    """T few-shot tasks of the same shape, stacked.

    ``support_x`` is ``[T, N*K, C, H, W]`` (float, 0..1), ``support_y`` ``[T, N*K]`` with labels in
    ``0..N-1``; the query likewise with ``N*Q`` examples. The order of examples inside a task is
    free: methods group by label, never by position.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    n_way: int

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def validate(self) -> TaskBatch:
        """Refuse inconsistent shapes or labels with a message naming the tensor at fault."""
        sx, sy, qx, qy = self.support_x, self.support_y, self.query_x, self.query_y
        for name, x in (("support_x", sx), ("query_x", qx)):
            if x.dim() != 5:
                raise HmamlError(f"{name}: expected [T, examples, C, H, W], got {tuple(x.shape)}")
        for name, y, x in (("support_y", sy, sx), ("query_y", qy, qx)):
            if tuple(y.shape) != tuple(x.shape[:2]):
                raise HmamlError(f"{name}: shape {tuple(y.shape)} does not match "
                                 f"{name[:-1]}x [T, examples] = {tuple(x.shape[:2])}")
            if y.dtype not in (torch.int64, torch.int32):
                raise HmamlError(f"{name}: labels must be integers, got {y.dtype}")
        if sx.shape[0] != qx.shape[0] or sx.shape[2:] != qx.shape[2:]:
            raise HmamlError(f"support_x {tuple(sx.shape)} and query_x {tuple(qx.shape)} disagree "
                             "on the number of tasks or the image shape")
        if sx.shape[1] % self.n_way:
            raise HmamlError(f"support_x holds {sx.shape[1]} examples per task, not a multiple of "
                             f"n_way={self.n_way}")
        counts = torch.nn.functional.one_hot(sy.long(), self.n_way).sum(1) if sy.numel() and \
            int(sy.min()) >= 0 and int(sy.max()) < self.n_way else None
        if counts is None or not bool((counts == sx.shape[1] // self.n_way).all()):
            raise HmamlError(f"support_y: every task needs each label 0..{self.n_way - 1} exactly "
                             f"{sx.shape[1] // self.n_way} times (N*K = {sx.shape[1]})")
        if qy.numel() and (int(qy.min()) < 0 or int(qy.max()) >= self.n_way):
            raise HmamlError(f"query_y: labels must lie in 0..{self.n_way - 1}")
        return self

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TaskBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, Tensor):
                moved[key] = value.to(device, non_blocking=non_blocking)
        return TaskBatch(**moved)

    def chunk(self, parts: int) -> list[TaskBatch]:
        """Split along the task axis into ``parts`` contiguous pieces (ranks, accumulation)."""
        if self.num_tasks % parts:
            raise HmamlError(f"{self.num_tasks} tasks cannot be split evenly into {parts} parts")
        size = self.num_tasks // parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def select(self, index: slice | Tensor) -> TaskBatch:
        """The tasks at ``index`` along the task axis."""
        return TaskBatch(self.support_x[index], self.support_y[index], self.query_x[index],
                         self.query_y[index], self.n_way)

    @staticmethod
    def stack(tasks: list[TaskBatch]) -> TaskBatch:
        """Concatenate task batches along the task axis."""
        return TaskBatch(torch.cat([t.support_x for t in tasks]),
                         torch.cat([t.support_y for t in tasks]),
                         torch.cat([t.query_x for t in tasks]),
                         torch.cat([t.query_y for t in tasks]), n_way=tasks[0].n_way)
