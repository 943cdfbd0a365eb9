"""MAML: n inner gradient steps on the support set, first- or second-order, head or whole network.

Adapting the head only uses the closed-form softmax-regression gradient for all tasks at once
(:func:`~hmaml.methods.functional.sgd_head_steps`): no autograd at adaptation time, exact
second-order meta-gradients through it. Adapting the whole network runs the T tasks' own
weights side by side in one encoder call (grouped convolutions, per-task BatchNorm).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hmaml.errors import HmamlError
from hmaml.methods.base import LinearHead, Method, MethodOutput
from hmaml.methods.functional import (
    linear_logits,
    one_hot,
    sgd_head_steps,
    task_cross_entropy,
    update_norms,
)
from hmaml.models import Encoder
from hmaml.tasks import TaskBatch

#: ``method.adapt``: the classifier only, or every weight.
ADAPT_MODES = ("head", "all")


class MAML(Method):
    """Model-agnostic meta-learning with a linear head on the encoder."""

    def __init__(self, encoder: Encoder, n_way: int, inner_steps: int = 1, inner_lr: float = 0.1,
                 first_order: bool = False, adapt: str = "head") -> None:
        super().__init__(encoder, n_way)
        if adapt not in ADAPT_MODES:  # not a range: another mode would run the head path silently
            raise HmamlError(f"method.adapt: {adapt!r} is not one of {', '.join(ADAPT_MODES)}")
        self.head = LinearHead(encoder.feat_dim, n_way)
        self.inner_steps, self.inner_lr = inner_steps, inner_lr
        self.first_order, self.adapt = first_order, adapt

    @classmethod
    def from_config(cls, cfg: Any, encoder: Encoder, n_way: int) -> MAML:
        return cls(encoder, n_way, cfg.inner_steps, cfg.inner_lr, cfg.first_order, cfg.adapt)

    @property
    def adapts_with_autograd(self) -> bool:
        return self.adapt == "all" and self.inner_steps > 0

    def classify(self, batch: TaskBatch) -> MethodOutput:
        if self.adapt == "all":
            return self._forward_all(batch)
        support, query = self.embed(batch)
        weight0, bias0 = self.head.expand(batch.num_tasks)
        onehot = one_hot(batch.support_y, self.n_way, support.dtype)
        weight, bias = sgd_head_steps(support, onehot, weight0, bias0, self.inner_steps,
                                      self.inner_lr, self.first_order)
        logits = linear_logits(query, weight, bias)
        task_loss = task_cross_entropy(logits, batch.query_y)
        return MethodOutput(logits, task_loss.mean(), task_loss,
                            *update_norms(weight, bias, weight0, bias0))

    def _forward_all(self, batch: TaskBatch) -> MethodOutput:
        """Every parameter adapted per task: the T tasks' weights lie side by side in one
        encoder call (grouped convolutions, see :mod:`hmaml.models.norm`), and one
        ``autograd.grad`` of the summed support losses gives each task its own gradient."""
        tasks = batch.num_tasks
        second_order = not self.first_order and torch.is_grad_enabled()
        with torch.enable_grad():  # adaptation needs gradients, also when evaluating
            start = {name: p.unsqueeze(0).expand(tasks, *p.shape)
                     for name, p in self.named_parameters()}
            adapted = start
            for _ in range(self.inner_steps):
                loss = task_cross_entropy(self._logits_with(adapted, batch.support_x),
                                          batch.support_y).sum()
                grads = torch.autograd.grad(loss, list(adapted.values()),
                                            create_graph=second_order)
                adapted = {name: value - self.inner_lr * g
                           for (name, value), g in zip(adapted.items(), grads, strict=True)}
        logits = self._logits_with(adapted, batch.query_x, batch.support_x)
        task_loss = task_cross_entropy(logits, batch.query_y)
        return MethodOutput(logits, task_loss.mean(), task_loss,
                            *update_norms(adapted["head.weight"], adapted["head.bias"],
                                          start["head.weight"], start["head.bias"]))

    def _logits_with(self, params: dict[str, Tensor], x: Tensor,
                     support_x: Tensor | None = None) -> Tensor:
        """Logits of images ``x [T, B, ...]`` under per-task parameters ``[T, ...]``; queries
        (with their ``support_x``) are normalised per :attr:`query_norm`."""
        encoder = {name.removeprefix("encoder."): value for name, value in params.items()
                   if name.startswith("encoder.")}
        emb = self.encode(x, encoder) if support_x is None else \
            self.encode_query(support_x, x, encoder)
        return linear_logits(emb, params["head.weight"], params["head.bias"])
