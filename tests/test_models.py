"""Encoders: shapes, per-task BatchNorm exactly as if each task ran alone, bad names."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hmaml.errors import HmamlError
from hmaml.models import ENCODERS, build_encoder


@pytest.mark.parametrize(("name", "channels", "size", "dim"), [
    ("conv4", 1, 28, 64), ("conv4", 3, 84, 1600), ("conv4pool", 3, 84, 64),
    ("resnet10", 3, 84, 512), ("resnet12", 3, 84, 640)])
def test_encoder_output_shapes(name: str, channels: int, size: int, dim: int) -> None:
    encoder = build_encoder(name, channels, size)
    out = encoder(torch.rand(2, 3, channels, size, size))
    assert out.shape == (2, 3, dim) and encoder.feat_dim == dim


@pytest.mark.parametrize("name", list(ENCODERS))
def test_stacked_tasks_equal_tasks_run_alone(name: str) -> None:
    torch.manual_seed(0)
    size = 16
    encoder = build_encoder(name, 1, size).double()
    x = torch.rand(3, 7, 1, size, size, dtype=torch.float64)
    x[1] *= 5.0  # very different statistics per task: any mixing would show
    stacked = encoder(x, split=4)
    for t in range(3):
        alone_support = encoder(x[t : t + 1, :4])
        alone_query = encoder(x[t : t + 1, 4:])
        torch.testing.assert_close(stacked[t, :4], alone_support[0])
        torch.testing.assert_close(stacked[t, 4:], alone_query[0])


def test_batchnorm_uses_batch_statistics_of_the_group() -> None:
    from hmaml.models.norm import Groups, TaskBatchNorm2d

    bn = TaskBatchNorm2d(2)
    x = torch.randn(2 * 5, 2, 3, 3) * 4 + 7
    y = bn(x, Groups(tasks=2)).view(2, 5, 2, 3, 3)
    torch.testing.assert_close(y.mean(dim=(1, 3, 4)), torch.zeros(2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(1, 3, 4), correction=0), torch.ones(2, 2),
                               atol=1e-3, rtol=0)


def test_batchnorm_equals_torch_batch_norm_per_group_with_affine_and_split() -> None:
    """Tasks of 7 examples cut 3 + 4 (support / query), non-trivial weight and bias: each
    group equals F.batch_norm run on that group alone (training mode, batch statistics)."""
    from hmaml.models.norm import Groups, TaskBatchNorm2d

    bn = TaskBatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 3.0]))
        bn.bias.copy_(torch.tensor([1.0, 0.0, -4.0]))
    x = (torch.randn(2 * 7, 3, 4, 4, dtype=torch.float64) * 3 + 5).contiguous(
        memory_format=torch.channels_last)
    y = bn(x, Groups(tasks=2, split=3))
    for t in range(2):
        for rows in (slice(7 * t, 7 * t + 3), slice(7 * t + 3, 7 * t + 7)):
            expected = F.batch_norm(x[rows], None, None, bn.weight, bn.bias, training=True,
                                    eps=bn.eps)
            torch.testing.assert_close(y[rows], expected)


def test_unknown_encoder_is_named() -> None:
    with pytest.raises(HmamlError, match=r"model\.encoder: unknown encoder 'vgg'.*conv4"):
        build_encoder("vgg", 1, 28)


def test_conv4_refuses_too_small_images() -> None:
    with pytest.raises(ValueError, match="image_size 8"):
        build_encoder("conv4", 1, 8)
