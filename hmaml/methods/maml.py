"""MAML: n inner gradient steps on the support set, first- or second-order, head or whole network.

Adapting the head only uses the closed-form softmax-regression gradient for all tasks at once
(:func:`~hmaml.methods.functional.sgd_head_steps`): no autograd at adaptation time, exact
second-order meta-gradients through it. Adapting the whole network maps a per-task
``torch.func.grad`` over the tasks with ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.func import functional_call, grad, vmap

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

ADAPT_MODES = ("head", "all")


class MAML(Method):
    """Model-agnostic meta-learning with a linear head on the encoder."""

    def __init__(self, encoder: Encoder, n_way: int, inner_steps: int = 1, inner_lr: float = 0.1,
                 first_order: bool = False, adapt: str = "head") -> None:
        super().__init__(encoder, n_way)
        if adapt not in ADAPT_MODES:
            raise HmamlError(f"method.adapt: {adapt!r} is not one of {', '.join(ADAPT_MODES)}")
        if inner_steps < 0:
            raise HmamlError(f"method.inner_steps: must be >= 0, got {inner_steps}")
        self.head = LinearHead(encoder.feat_dim, n_way)
        self.inner_steps, self.inner_lr = inner_steps, inner_lr
        self.first_order, self.adapt = first_order, adapt

    def forward(self, batch: TaskBatch) -> MethodOutput:
        self.check(batch)
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
        params = dict(self.named_parameters())
        task_fn = _whole_network_task(self, self.inner_steps, self.inner_lr, self.first_order)
        logits, w_norm, b_norm = vmap(task_fn, in_dims=(None, 0, 0, 0))(
            params, batch.support_x, batch.support_y, batch.query_x)
        task_loss = task_cross_entropy(logits, batch.query_y)
        return MethodOutput(logits, task_loss.mean(), task_loss, w_norm, b_norm)


def _whole_network_task(model: MAML, steps: int, lr: float, first_order: bool) -> Callable:
    """One task's adaptation of every parameter, written for ``vmap`` over tasks."""

    def logits_fn(params: dict[str, Tensor], x: Tensor) -> Tensor:
        enc = {k.removeprefix("encoder."): v for k, v in params.items()
               if k.startswith("encoder.")}
        emb = functional_call(model.encoder, enc, (x.unsqueeze(0),), {"channels_last": False})
        return linear_logits(emb, params["head.weight"].unsqueeze(0),
                             params["head.bias"].unsqueeze(0)).squeeze(0)

    def support_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return task_cross_entropy(logits_fn(params, x).unsqueeze(0), y.unsqueeze(0)).squeeze(0)

    def run(params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor
            ) -> tuple[Tensor, Tensor, Tensor]:
        adapted = params
        for _ in range(steps):
            grads = grad(support_loss)(adapted, sx, sy)
            adapted = {k: v - lr * (grads[k].detach() if first_order else grads[k])
                       for k, v in adapted.items()}
        w_norm = (adapted["head.weight"] - params["head.weight"]).norm().detach()
        b_norm = (adapted["head.bias"] - params["head.bias"]).norm().detach()
        return logits_fn(adapted, qx), w_norm, b_norm

    return run

