"""BatchNorm that normalises every task with its own batch statistics.

Few-shot encoders run BatchNorm transductively: each task is normalised with the statistics of its
own support set (and, separately, its query set), exactly as if it ran alone. Stacking T tasks in
one tensor must not mix their statistics, so this layer reshapes to ``[groups, examples, C, H, W]``
and normalises over each group. There are no running statistics: train and test behave the same,
which is what makes a trained model's test accuracy equal its validation accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Groups:
    """How a flat batch ``[tasks * examples, ...]`` splits into normalisation groups.

    ``split`` (optional) cuts each task's examples into two groups, ``[:split]`` and ``[split:]``:
    the support and the query pass through the encoder together yet keep separate statistics.
    """

    tasks: int
    split: int | None = None


class TaskBatchNorm2d(nn.Module):
    """Per-group batch normalisation with a learned affine transform."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def _normalise(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=(1, 3, 4), keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: Tensor, groups: Groups) -> Tensor:
        flat_shape = x.shape
        xt = x.reshape(groups.tasks, -1, *flat_shape[1:])
        if groups.split is None or groups.split >= xt.shape[1]:
            xt = self._normalise(xt)
        else:
            xt = torch.cat([self._normalise(xt[:, : groups.split]),
                            self._normalise(xt[:, groups.split:])], dim=1)
        shape = (1, -1, 1, 1)
        return xt.reshape(flat_shape) * self.weight.view(shape) + self.bias.view(shape)
