"""Layers that run T tasks side by side in the channels: ``[examples, T * C, H, W]``.

Few-shot encoders run BatchNorm transductively: each task is normalised with the statistics of
its own support set (and, separately, its query set), exactly as if it ran alone. Laying the T
tasks next to each other in the channel dimension makes every (task, channel) pair one channel of
the native ``batch_norm`` kernel, so per-task statistics come from the fused kernel (fp32 or
bf16, channels-last) with no reshuffling; the convolution shares its weights across tasks as a
grouped convolution of ``T`` groups, which oneDNN and cuDNN run as one kernel. There are no
running statistics: train and test behave the same, which is what makes a trained model's test
accuracy equal its validation accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import overload

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hmaml.models import fused


@overload
def _tiled(param: Tensor, tasks: int, dims: int) -> Tensor: ...


@overload
def _tiled(param: Tensor | None, tasks: int, dims: int) -> Tensor | None: ...


def _tiled(param: Tensor | None, tasks: int, dims: int) -> Tensor | None:
    """``param`` laid out for ``tasks`` tasks side by side along its first dimension.

    A shared parameter (``dims`` dimensions) is repeated; a per-task one (``dims + 1``
    dimensions, ``[T, ...]``: MAML's adapted weights, passed by ``functional_call``) is
    flattened, so every task runs with its own weights in the same single kernel. One task
    repeats too (a copy of a few kB): handing the parameter itself to the kernels of both
    encoder passes made DeepSpeed ZeRO's updates drift from DDP's (4.5e-2 relative after 6
    steps, against 3.5e-3; ``tests/test_distributed.py``).
    """
    if param is None:
        return None
    if param.dim() == dims + 1:
        return param.flatten(0, 1)
    return param.repeat(tasks, *([1] * (dims - 1)))


def stacked(x: Tensor, tasks: int) -> Tensor:
    """``[B, T * C, H, W]`` channels-last -> ``[T * B, C, H, W]`` channels-last: each task's
    examples one after another, one image per row of a plain convolution."""
    examples, channels, height, width = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(examples, height, width, tasks, channels // tasks)
    rows = rows.permute(3, 0, 1, 2, 4).contiguous()
    return rows.view(tasks * examples, height, width, -1).permute(0, 3, 1, 2)


def side_by_side(y: Tensor, tasks: int) -> Tensor:
    """The inverse of :func:`stacked`: ``[T * B, C, H, W]`` -> ``[B, T * C, H, W]``."""
    images, channels, height, width = y.shape
    rows = y.permute(0, 2, 3, 1).reshape(tasks, images // tasks, height, width, channels)
    rows = rows.permute(1, 2, 3, 0, 4).contiguous()
    return rows.view(images // tasks, height, width, -1).permute(0, 3, 1, 2)


class TaskConv2d(nn.Conv2d):
    """A convolution of ``[B, T * C_in, H, W]``, its weights shared by the tasks or per task.

    Shared weights over several input channels run as one plain convolution of the T * B
    images (:func:`stacked`, and back): oneDNN runs that 10-20 % faster than the grouped
    convolution of T groups, the two transposes included (Conv4's layers 2-4, 32 tasks, bf16,
    2 cores). Per-task weights (MAML's adapted ones) and single-channel inputs (the first
    layer, whose output is the largest to transpose) stay grouped, and so do compiled graphs
    (``train.compile``: the grouped form is what they were measured and tested with).
    """

    def forward(self, x: Tensor, tasks: int = 1) -> Tensor:
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        if tasks > 1 and channels_last and self.weight.dim() == 4 and \
                x.shape[1] > tasks * self.groups and not torch.compiler.is_compiling():
            weight = self.weight.view_as(self.weight)  # not the leaf itself: see _tiled
            out = F.conv2d(stacked(x, tasks), weight.contiguous(memory_format=torch.channels_last),
                           self.bias, self.stride, self.padding, self.dilation, self.groups)
            return side_by_side(out, tasks)
        weight = _tiled(self.weight, tasks, 4)
        if channels_last:  # else oneDNN reorders per call
            weight = weight.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, weight, _tiled(self.bias, tasks, 1), self.stride, self.padding,
                        self.dilation, self.groups * tasks)


class TaskBatchNorm2d(nn.Module):
    """Batch normalisation with statistics per (task, channel) and one learned affine map.

    ``stat_rows`` (set by :func:`support_statistics`): the statistics come from the first
    ``stat_rows`` examples alone and normalise every example, so images placed after a task's
    support set are normalised as the support set is (one image can then be classified)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.stat_rows: int | None = None

    def forward(self, x: Tensor, tasks: int = 1) -> Tensor:
        weight, bias = _tiled(self.weight, tasks, 1), _tiled(self.bias, tasks, 1)
        if self.stat_rows is None:
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)
        # written out (not the kernel's eval mode): the statistics stay differentiable, as the
        # batch statistics are, for MAML's adaptation under autograd
        var, mean = torch.var_mean(x[:self.stat_rows].float(), dim=(0, 2, 3), correction=0)
        scale = weight * torch.rsqrt(var + self.eps)
        shift = bias - mean * scale
        return (x.float() * scale[:, None, None] + shift[:, None, None]).to(x.dtype)


    def pool_relu(self, x: Tensor, tasks: int = 1) -> Tensor:
        """``relu(max_pool2d(self(x), 2))``: fused on the CPU where :mod:`hmaml.models.fused`
        can take it (batch statistics, parameters shared by the tasks), else native ops."""
        if self.stat_rows is None and self.weight.dim() == 1 and fused.usable(x):
            return fused.batch_norm_pool_relu(x, _tiled(self.weight, tasks, 1),
                                              _tiled(self.bias, tasks, 1), self.eps)
        return F.relu(F.max_pool2d(self(x, tasks), 2))


@contextmanager
def support_statistics(module: nn.Module, rows: int) -> Iterator[None]:
    """Within the block, every :class:`TaskBatchNorm2d` of ``module`` normalises with the
    statistics of the first ``rows`` examples of each task (its support set)."""
    layers = [m for m in module.modules() if isinstance(m, TaskBatchNorm2d)]
    for layer in layers:
        layer.stat_rows = rows
    try:
        yield
    finally:
        for layer in layers:
            layer.stat_rows = None
