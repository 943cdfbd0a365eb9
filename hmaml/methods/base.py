"""The one interface every few-shot method implements."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hmaml.errors import HmamlError
from hmaml.methods.functional import at_least_fp32, task_accuracy
from hmaml.models import Encoder
from hmaml.models.norm import support_statistics
from hmaml.tasks import TaskBatch

#: Query normalisation modes: the query set's statistics, or the support set's.
QUERY_NORMS = ("transductive", "support")


@dataclass
class MethodOutput:
    """Query logits ``[T, N*Q, N]``, the meta-loss (mean over tasks) and per-task losses."""

    logits: Tensor
    loss: Tensor
    task_loss: Tensor
    weight_update_norm: Tensor | None = None
    bias_update_norm: Tensor | None = None

    def accuracy(self, query_y: Tensor) -> Tensor:
        """Per-task query accuracy ``[T]``."""
        return task_accuracy(self.logits.detach(), query_y)


class LinearHead(nn.Module):
    """The universal classifier theta = (W, b); b starts at zero as in the paper."""

    def __init__(self, feat_dim: int, n_way: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_way, feat_dim))
        self.bias = nn.Parameter(torch.zeros(n_way))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def expand(self, tasks: int) -> tuple[Tensor, Tensor]:
        """theta broadcast to ``[T, N, D]`` and ``[T, N]`` (a view, no copy)."""
        return (self.weight.unsqueeze(0).expand(tasks, -1, -1),
                self.bias.unsqueeze(0).expand(tasks, -1))


class Method(nn.Module):
    """A few-shot learner: ``forward(batch)`` adapts to all T tasks in one vectorised pass.

    Methods know nothing of data loading or distributed training; the training loop calls
    :meth:`set_epoch` once per epoch for schedules that depend on it. Subclasses implement
    :meth:`classify`; only the encoder runs in the reduced precision (``encoder_dtype``).
    """

    #: The MAML weight p of HyperMAML's warm-up switch at the current epoch; 0 for methods
    #: without one (they always adapt as they are tested).
    p: float = 0.0
    #: How queries are normalised, one of :data:`QUERY_NORMS` (see :meth:`encode_query`).
    query_norm: str = "transductive"

    def __init__(self, encoder: Encoder, n_way: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.n_way = n_way
        #: autocast dtype of the encoder (bf16/fp16), None for fp32: see hmaml.precision
        self.encoder_dtype: torch.dtype | None = None

    @classmethod
    def from_config(cls, cfg: Any, encoder: Encoder, n_way: int) -> Method:
        """The method with the hyperparameters of the ``method`` config section ``cfg``
        (validated by :mod:`hmaml.config`)."""
        return cls(encoder, n_way)

    @classmethod
    def milestones(cls, cfg: Any, done: int) -> dict[str, int]:
        """MLflow milestone tags of the method's own schedule reached after ``done`` epochs
        (HyperMAML: the end of its warm-up and of its switch); the loop adds the LR drops."""
        return {}

    @staticmethod
    def tested_at(p: float) -> bool:
        """Whether a method at MAML weight ``p`` adapts as it is tested (p = 0: the
        hypernetwork alone). Validations in that form are preferred when the best epoch is
        chosen, since the test is of that form."""
        return p == 0.0

    @property
    def in_tested_form(self) -> bool:
        """Whether the method adapts now as it is tested (see :meth:`tested_at`)."""
        return self.tested_at(self.p)

    def set_epoch(self, epoch: int) -> None:
        """Hook for epoch-dependent behaviour (HyperMAML's warm-up switch)."""

    def set_tested(self) -> None:
        """Put the method in the state it is tested in (HyperMAML: the hypernetwork alone)."""

    def resting_parameters(self) -> list[nn.Parameter]:
        """Parameters that must not move this epoch: the optimizer gets their gradient as None,
        so Adam keeps no state for them (HyperMAML's hypernetwork while p = 1)."""
        return []

    @property
    def adapts_with_autograd(self) -> bool:
        """Whether adapting to a task takes autograd gradients (then evaluation cannot run
        under ``torch.inference_mode``)."""
        return False

    def encoder_precision(self, device_type: str) -> AbstractContextManager:
        """Autocast to ``encoder_dtype`` around encoder calls (a no-op context for fp32)."""
        return torch.autocast(device_type, dtype=self.encoder_dtype,
                              enabled=self.encoder_dtype is not None)

    def encode(self, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """fp32 embeddings of images ``[T, B, ...]``: the encoder runs in ``encoder_dtype``,
        with its own parameters or ``params`` (per-task ``[T, ...]``, by ``functional_call``)."""
        with self.encoder_precision(x.device.type):
            emb = self.encoder(x) if params is None else functional_call(self.encoder, params,
                                                                          (x,))
        return at_least_fp32(emb)

    def encode_query(self, support_x: Tensor, query_x: Tensor,
                     params: dict[str, Tensor] | None = None) -> Tensor:
        """Query embeddings, normalised per :attr:`query_norm`: with the query set's own
        statistics (transductive: how every method is trained and tested) or with the support
        set's (``support``: a query's embedding then depends on it alone)."""
        if self.query_norm == "transductive":
            return self.encode(query_x, params)
        rows = support_x.shape[1]
        with support_statistics(self.encoder, rows):
            return self.encode(torch.cat([support_x, query_x], 1), params)[:, rows:]

    def embed(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Support and query embeddings; each set of each task has its own statistics (the
        queries: see :meth:`encode_query`)."""
        return self.encode(batch.support_x), self.encode_query(batch.support_x, batch.query_x)

    def check(self, batch: TaskBatch) -> None:
        """Cheap shape checks (no device sync) that name what is wrong."""
        if batch.n_way != self.n_way:
            raise HmamlError(f"task batch has n_way={batch.n_way} but the model was built for "
                             f"n_way={self.n_way}")
        if batch.support_x.dim() != 5 or batch.query_x.dim() != 5:
            raise HmamlError("support_x/query_x must be [T, examples, C, H, W], got "
                             f"{tuple(batch.support_x.shape)} and {tuple(batch.query_x.shape)}")
        if tuple(batch.support_y.shape) != tuple(batch.support_x.shape[:2]):
            raise HmamlError(f"support_y shape {tuple(batch.support_y.shape)} does not match "
                             f"support_x [T, N*K] = {tuple(batch.support_x.shape[:2])}")
        if tuple(batch.query_y.shape) != tuple(batch.query_x.shape[:2]):
            raise HmamlError(f"query_y shape {tuple(batch.query_y.shape)} does not match "
                             f"query_x [T, N*Q] = {tuple(batch.query_x.shape[:2])}")
        if batch.support_x.shape[1] % self.n_way:
            raise HmamlError(f"support holds {batch.support_x.shape[1]} examples per task, not "
                             f"N*K for n_way={self.n_way}")

    def forward(self, batch: TaskBatch) -> MethodOutput:
        """Check ``batch``, then adapt and classify in fp32 whatever autocast surrounds the call
        (Accelerate's fp16 wraps the whole forward): the encoder alone runs in ``encoder_dtype``."""
        self.check(batch)
        with torch.autocast(batch.support_x.device.type, enabled=False):
            return self.classify(batch)

    def classify(self, batch: TaskBatch) -> MethodOutput:
        """Adapt to every task of ``batch`` and classify its queries."""
        raise NotImplementedError
