"""HyperMAML: a hypernetwork, not gradient steps, adapts the universal classifier to a task.

Per class, the hypernetwork reads the mean over the class's K shots of
``[embedding ⊕ softmax(theta-classifier(embedding)) ⊕ one-hot label]`` (the "enhancement"; the
prediction carries no gradient) and emits that class's row of Delta-W and its Delta-b. One MLP is
shared by all classes, so a class's update depends on its own support examples only. The query is
classified by theta' = theta + Delta-theta and never sees the enhancement.

Warm-up (the paper's eq. 7, "switch"): theta' = theta - p·alpha·ΣGrad + (1 - p)·Delta-theta, where
p falls linearly from 1 to 0 over ``warmup_len`` (S) epochs starting at ``warmup_start`` (W), as the
authors' code computes it: p = (S + W - e) / (S + 1) for W <= e < W + S; the gradient steps are
taken at the current adapted weights and Delta-theta is added once. While p = 1 the hypernetwork
rests (its gradient is None at the optimizer step, so Adam's state for it starts at the switch).
When p = 0, adapting to a task computes no gradient at all; the method is always tested so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hmaml.methods.base import LinearHead, Method, MethodOutput
from hmaml.methods.functional import (
    at_least_fp32,
    class_means,
    linear_logits,
    one_hot,
    sgd_head_steps,
    task_cross_entropy,
    update_norms,
)
from hmaml.models import Encoder
from hmaml.tasks import TaskBatch


def maml_weight(epoch: int, start: int, length: int) -> float:
    """p(epoch) of the authors' code: 1 before W = ``start``, then (S + W - e) / (S + 1) for the
    S = ``length`` epochs W..W+S-1 (S/(S+1) down to 1/(S+1)), 0 from W + S (0-based epochs)."""
    if epoch < start:
        return 1.0
    if epoch >= start + length:
        return 0.0
    return (length + start - epoch) / (length + 1)


class HyperNetwork(nn.Module):
    """An MLP of ``depth`` linear layers (ReLU between) applied to each class independently."""

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int) -> None:
        super().__init__()
        dims = [in_dim] + [width] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class HyperMAML(Method):
    """Universal classifier theta, encoder E and hypernetwork H trained end to end."""

    def __init__(self, encoder: Encoder, n_way: int, hn_depth: int = 3, hn_width: int = 512,
                 enhance: bool = True, switch: bool = True, warmup_start: int = 50,
                 warmup_len: int = 500, inner_steps: int = 1, inner_lr: float = 0.1,
                 first_order: bool = False) -> None:
        super().__init__(encoder, n_way)
        feat = encoder.feat_dim
        self.head = LinearHead(feat, n_way)
        self.enhance = enhance
        self.hypernet = HyperNetwork(feat + (2 * n_way if enhance else 0), hn_width, hn_depth,
                                     feat + 1)
        self.switch, self.warmup_start, self.warmup_len = switch, warmup_start, warmup_len
        self.inner_steps, self.inner_lr, self.first_order = inner_steps, inner_lr, first_order
        self.p = 1.0 if switch and warmup_start + warmup_len > 0 else 0.0

    @classmethod
    def from_config(cls, cfg: Any, encoder: Encoder, n_way: int) -> HyperMAML:
        return cls(encoder, n_way, cfg.hn_depth, cfg.hn_width, cfg.enhance, cfg.switch,
                   cfg.warmup_start, cfg.warmup_len, cfg.inner_steps, cfg.inner_lr,
                   cfg.first_order)

    @classmethod
    def milestones(cls, cfg: Any, done: int) -> dict[str, int]:
        if not cfg.switch:
            return {}
        ends = {"milestone.warmup_end": cfg.warmup_start,
                "milestone.switch_end": cfg.warmup_start + cfg.warmup_len}
        return {tag: done for tag, epoch in ends.items() if epoch == done}

    def set_epoch(self, epoch: int) -> None:
        self.p = maml_weight(epoch, self.warmup_start, self.warmup_len) if self.switch else 0.0

    def set_tested(self) -> None:
        self.p = 0.0

    def resting_parameters(self) -> list[nn.Parameter]:
        return list(self.hypernet.parameters()) if self.p == 1.0 else []

    def delta(self, support: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
        """The hypernetwork's update: Delta-W ``[T, N, D]`` and Delta-b ``[T, N]``."""
        inputs = support
        if self.enhance:
            weight, bias = self.head.expand(support.shape[0])
            with torch.no_grad():
                pred = torch.softmax(at_least_fp32(linear_logits(support, weight, bias)), -1)
            inputs = torch.cat([support, pred.to(support.dtype), onehot], dim=-1)
        out = self.hypernet(class_means(inputs, onehot))
        return out[..., :-1], out[..., -1]

    def classify(self, batch: TaskBatch) -> MethodOutput:
        support, query = self.embed(batch)
        onehot = one_hot(batch.support_y, self.n_way, support.dtype)
        weight0, bias0 = self.head.expand(batch.num_tasks)
        delta_w, delta_b = self.delta(support, onehot)
        p = self.p
        # The hypernetwork term stays in the graph even at p = 1 (times zero) so that every
        # parameter receives a gradient and DDP needs no unused-parameter search; the training
        # step then drops the hypernetwork's (zero) gradients: see resting_parameters().
        weight, bias = weight0 + (1 - p) * delta_w, bias0 + (1 - p) * delta_b
        if p > 0:
            maml_w, maml_b = sgd_head_steps(support, onehot, weight0, bias0, self.inner_steps,
                                            self.inner_lr, self.first_order)
            weight, bias = weight + p * (maml_w - weight0), bias + p * (maml_b - bias0)
        logits = linear_logits(query, weight, bias)
        task_loss = task_cross_entropy(logits, batch.query_y)
        return MethodOutput(logits, task_loss.mean(), task_loss,
                            *update_norms(weight, bias, weight0, bias0))
