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
    """Per-group batch normalisation with a learned affine transform.

    Statistics and the affine map are folded into one per-example scale and shift, applied in a
    single fused pass (``addcmul``); on channels-last tensors the reduction is a plain view.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def _scale_shift(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and shift ``[T, C]`` from ``pixels [T, P, C]`` (P pixels of one group)."""
        if pixels.dtype in (torch.float16, torch.bfloat16):  # statistics in fp32 under autocast
            pixels = pixels.float()
        var, mean = torch.var_mean(pixels, dim=1, correction=0)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return scale, self.bias - mean * scale

    def forward(self, x: Tensor, groups: Groups) -> Tensor:
        n, c, h, w = x.shape
        per_task = n // groups.tasks
        pixels = x.permute(0, 2, 3, 1).reshape(groups.tasks, -1, c)
        split = groups.split
        if split is None or split >= per_task:
            scale, shift = self._scale_shift(pixels)
            scale = scale.unsqueeze(1).expand(-1, per_task, -1)
            shift = shift.unsqueeze(1).expand(-1, per_task, -1)
        else:
            cut = split * h * w
            parts = [self._scale_shift(pixels[:, :cut]), self._scale_shift(pixels[:, cut:])]
            sizes = (split, per_task - split)
            scale, shift = (torch.cat([p[i].unsqueeze(1).expand(-1, k, -1)
                                       for p, k in zip(parts, sizes, strict=True)], dim=1)
                            for i in (0, 1))
        return torch.addcmul(shift.reshape(n, c, 1, 1), x, scale.reshape(n, c, 1, 1))
