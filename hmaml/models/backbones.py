"""Few-shot encoders: Conv4, Conv4Pool, ResNet-10 and ResNet-12, all with per-task BatchNorm.

Every encoder maps images ``[T, B, C, H, W]`` to embeddings ``[T, B, D]``, each task normalised
with its own statistics. Inside, the tasks lie side by side in the channels, ``[B, T * C, H, W]``
(see :mod:`hmaml.models.norm`): one grouped convolution and one native BatchNorm call serve all
tasks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hmaml.models.norm import TaskBatchNorm2d, TaskConv2d


class Encoder(nn.Module):
    """Base class: subclasses implement :meth:`features` on a flat batch and set ``feat_dim``."""

    feat_dim: int

    @classmethod
    def widest_activation(cls, in_channels: int, image_size: int) -> int:
        """Values per image in the encoder's largest activation (what bounds the memory of an
        evaluation batch): the 64 channels of the first layer at full resolution."""
        del in_channels
        return 64 * image_size * image_size

    def features(self, x: Tensor, tasks: int) -> Tensor:
        """``[B, T * C, H, W]`` -> ``[B, T * D', ...]`` (the tasks still side by side)."""
        raise NotImplementedError

    def forward(self, x: Tensor, channels_last: bool = True) -> Tensor:
        """Embed ``[T, B, C, H, W]``: each task's B examples are normalised together.

        Channels-last layout is what CPU (oneDNN) and CUDA (cuDNN, bf16) convolutions run
        fastest; ``channels_last=False`` keeps the contiguous layout (the results are the same,
        tested).
        """
        tasks, examples = x.shape[:2]
        side_by_side = x.transpose(0, 1).reshape(examples, tasks * x.shape[2], *x.shape[3:])
        if channels_last:
            side_by_side = side_by_side.contiguous(memory_format=torch.channels_last)
        out = self.features(side_by_side, tasks)
        return out.reshape(examples, tasks, -1).transpose(0, 1)


class Pixels(Encoder):
    """No learned features: the flattened input itself (raw-pixel baselines, the 2-D toy)."""

    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.feat_dim = in_channels * image_size * image_size

    @classmethod
    def widest_activation(cls, in_channels: int, image_size: int) -> int:
        return in_channels * image_size * image_size

    def features(self, x: Tensor, tasks: int) -> Tensor:
        return x


class ConvBlock(nn.Module):
    """conv3x3 -> per-task BN -> maxpool 2 -> ReLU (the ReLU commutes with the max, so it runs
    on the pooled quarter of the pixels)."""

    def __init__(self, cin: int, cout: int, pool: bool = True) -> None:
        super().__init__()
        # no bias: the per-task BatchNorm right after it would subtract it again
        self.conv = TaskConv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = TaskBatchNorm2d(cout)
        self.pool = pool

    def forward(self, x: Tensor, tasks: int) -> Tensor:
        if self.pool:
            return self.bn.pool_relu(self.conv(x, tasks), tasks)
        return F.relu(self.bn(self.conv(x, tasks), tasks))


class Conv4(Encoder):
    """4 x [conv3x3 64, BN, ReLU, maxpool 2], flattened: 64-d at 28 px, 1600-d at 84 px."""

    def __init__(self, in_channels: int, image_size: int, width: int = 64,
                 global_pool: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else width, width) for i in range(4))
        self.global_pool = global_pool
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for Conv4 (needs >= 16)")
        self.feat_dim = width if global_pool else width * side * side

    def features(self, x: Tensor, tasks: int) -> Tensor:
        for block in self.blocks:
            x = block(x, tasks)
        return x.mean(dim=(2, 3)) if self.global_pool else x


class Conv4Pool(Conv4):
    """Conv4 with global average pooling: 64-d whatever the image size (the 84 px encoder)."""

    def __init__(self, in_channels: int, image_size: int, width: int = 64) -> None:
        super().__init__(in_channels, image_size, width, global_pool=True)


class BasicBlock(nn.Module):
    """Two conv3x3 with per-task BN and a projected shortcut (ResNet-10/18 style)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = TaskConv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = TaskBatchNorm2d(cout)
        self.conv2 = TaskConv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = TaskBatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = TaskConv2d(cin, cout, 1, stride, bias=False)
            self.shortcut_bn = TaskBatchNorm2d(cout)

    def forward(self, x: Tensor, tasks: int) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x, tasks), tasks))
        out = self.bn2(self.conv2(out, tasks), tasks)
        skip = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x, tasks), tasks)
        return F.relu(out + skip)


class ResNet10(Encoder):
    """ResNet-10 of the few-shot literature: a 7x7 stem, four one-block stages, average pool."""

    def __init__(self, in_channels: int, image_size: int,
                 widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        del image_size  # global pooling makes the embedding size independent of it
        self.stem = TaskConv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.stem_bn = TaskBatchNorm2d(widths[0])
        cins = (widths[0], *widths[:-1])
        self.stages = nn.ModuleList(
            BasicBlock(cin, cout, 1 if i == 0 else 2) for i, (cin, cout) in
            enumerate(zip(cins, widths, strict=True)))
        self.feat_dim = widths[-1]

    @classmethod
    def widest_activation(cls, in_channels: int, image_size: int) -> int:
        side = (image_size + 1) // 2  # the stride-2 stem
        return 64 * side * side

    def features(self, x: Tensor, tasks: int) -> Tensor:
        x = F.relu(self.stem_bn(self.stem(x, tasks), tasks))
        x = F.max_pool2d(x, 3, 2, 1)
        for stage in self.stages:
            x = stage(x, tasks)
        return x.mean(dim=(2, 3))


class ResNet12Block(nn.Module):
    """Three conv3x3 with per-task BN and leaky ReLU, a 1x1 shortcut, then maxpool 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            TaskConv2d(cin if i == 0 else cout, cout, 3, 1, 1, bias=False) for i in range(3))
        self.bns = nn.ModuleList(TaskBatchNorm2d(cout) for _ in range(3))
        self.shortcut = TaskConv2d(cin, cout, 1, bias=False)
        self.shortcut_bn = TaskBatchNorm2d(cout)

    def forward(self, x: Tensor, tasks: int) -> Tensor:
        out = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            out = bn(conv(out, tasks), tasks)
            if i < 2:
                out = F.leaky_relu(out, 0.1)
        out = F.leaky_relu(out + self.shortcut_bn(self.shortcut(x, tasks), tasks), 0.1)
        return F.max_pool2d(out, 2)


class ResNet12(Encoder):
    """ResNet-12 of MetaOptNet/FEAT: four 3-conv residual blocks (64-160-320-640), average pool."""

    def __init__(self, in_channels: int, image_size: int,
                 widths: tuple[int, ...] = (64, 160, 320, 640)) -> None:
        super().__init__()
        del image_size
        cins = (in_channels, *widths[:-1])
        self.blocks = nn.ModuleList(
            ResNet12Block(cin, cout) for cin, cout in zip(cins, widths, strict=True))
        self.feat_dim = widths[-1]

    def features(self, x: Tensor, tasks: int) -> Tensor:
        for block in self.blocks:
            x = block(x, tasks)
        return x.mean(dim=(2, 3))
