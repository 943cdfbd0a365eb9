"""Encoders: shapes, per-task BatchNorm exactly as if each task ran alone, bad names."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from hmaml.errors import HmamlError
from hmaml.models import ENCODERS, build_encoder
from hmaml.models.norm import TaskBatchNorm2d, TaskConv2d


@pytest.mark.parametrize(("name", "channels", "size", "dim"), [
    ("conv4", 1, 28, 64), ("conv4", 3, 84, 1600), ("conv4pool", 3, 84, 64),
    ("resnet10", 3, 84, 512), ("resnet12", 3, 84, 640)])
def test_encoder_output_shapes(name: str, channels: int, size: int, dim: int) -> None:
    encoder = build_encoder(name, channels, size)
    out = encoder(torch.rand(2, 3, channels, size, size))
    assert out.shape == (2, 3, dim) and encoder.feat_dim == dim


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("name", list(ENCODERS))
def test_stacked_tasks_equal_tasks_run_alone(name: str, channels_last: bool) -> None:
    """Embeddings and parameter gradients of 3 stacked tasks equal those of each task run
    alone (float64): per-task statistics, shared weights, nothing mixed between tasks."""
    torch.manual_seed(0)
    size = 16
    encoder = build_encoder(name, 1, size).double()
    x = torch.rand(3, 7, 1, size, size, dtype=torch.float64)
    x[1] *= 5.0  # very different statistics per task: any mixing would show
    params = list(encoder.parameters()) or [x.requires_grad_()]  # Pixels: the input's grad
    probe = torch.randn(3, 7, encoder.feat_dim, dtype=torch.float64)
    stacked = encoder(x, channels_last=channels_last)
    stacked_grads = torch.autograd.grad((stacked * probe).sum(), params)
    alone_grads = [torch.zeros_like(p) for p in params]
    for t in range(3):
        alone = encoder(x[t : t + 1], channels_last=channels_last)
        torch.testing.assert_close(stacked[t], alone[0])
        grads = torch.autograd.grad((alone * probe[t]).sum(), params)
        for total, g in zip(alone_grads, grads, strict=True):
            total += g
    for got, want in zip(stacked_grads, alone_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_batchnorm_normalises_each_task_with_its_own_statistics() -> None:
    """Tasks side by side in the channels ``[B, T * C, H, W]``: each task's slice equals
    F.batch_norm run on that slice alone, with the shared weight and bias (training mode)."""
    from hmaml.models.norm import TaskBatchNorm2d

    bn = TaskBatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 3.0]))
        bn.bias.copy_(torch.tensor([1.0, 0.0, -4.0]))
    x = torch.randn(7, 2 * 3, 4, 4, dtype=torch.float64) * 3 + 5
    x[:, 3:] = x[:, 3:] * 10 - 20
    for layout in (torch.contiguous_format, torch.channels_last):
        y = bn(x.contiguous(memory_format=layout), tasks=2)
        for t in range(2):
            expected = F.batch_norm(x[:, 3 * t : 3 * t + 3], None, None, bn.weight, bn.bias,
                                    training=True, eps=bn.eps)
            torch.testing.assert_close(y[:, 3 * t : 3 * t + 3], expected)
        per_task = y.view(7, 2, 3, 4, 4)
        torch.testing.assert_close(per_task.mean(dim=(0, 3, 4)),
                                   bn.bias.expand(2, 3), atol=1e-9, rtol=0)


def test_conv_shares_its_weights_across_tasks() -> None:
    from hmaml.models.norm import TaskConv2d

    conv = TaskConv2d(2, 4, 3, stride=2, padding=1).double()
    x = torch.randn(5, 3 * 2, 9, 9, dtype=torch.float64)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = conv(x.contiguous(memory_format=layout), tasks=3)
        for t in range(3):
            torch.testing.assert_close(y[:, 4 * t : 4 * t + 4],
                                       F.conv2d(x[:, 2 * t : 2 * t + 2], conv.weight, conv.bias,
                                                stride=2, padding=1))


def test_unknown_encoder_is_named() -> None:
    with pytest.raises(HmamlError, match=r"model\.encoder: unknown encoder 'vgg'.*conv4"):
        build_encoder("vgg", 1, 28)


def test_conv4_refuses_too_small_images() -> None:
    with pytest.raises(ValueError, match="image_size 8"):
        build_encoder("conv4", 1, 8)


def test_a_compiled_method_keeps_its_parameter_names_and_results() -> None:
    """train.compile compiles the method in place: checkpoints and DDP see the same names,
    and logits and gradients match eager mode (fp32, to the rounding of fused kernels)."""
    from tests.method_fixtures import build, random_tasks

    batch = random_tasks()
    eager, compiled = build("hypermaml", switch=False), build("hypermaml", switch=False)
    names = list(compiled.state_dict())
    compiled.compile()
    assert list(compiled.state_dict()) == names
    outs = [model(batch) for model in (eager, compiled)]
    grads = [torch.autograd.grad(out.loss, list(model.parameters()))
             for out, model in zip(outs, (eager, compiled), strict=True)]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["conv4", "resnet10", "resnet12"])
def test_authors_init_draws_he_fan_out_normal_weights(name: str) -> None:
    """model.init=authors: every convolution ~ normal(0, sqrt(2 / (k*k*C_out))) (the authors'
    std 0.059 for 64 -> 64 3x3, against torch's default 0.024), BatchNorm weight 1, bias 0."""
    torch.manual_seed(0)
    authors = build_encoder(name, 3, 32, "authors")
    torch.manual_seed(0)
    default = build_encoder(name, 3, 32, "torch")
    convs = [m for m in authors.modules() if isinstance(m, TaskConv2d)]
    assert convs
    for conv in convs:
        kh, kw = conv.kernel_size
        expected = math.sqrt(2 / (kh * kw * conv.out_channels))
        w = conv.weight.detach()
        assert abs(w.mean().item()) < 4 * expected / math.sqrt(w.numel())
        assert w.std().item() == pytest.approx(expected, rel=0.1 if w.numel() > 1000 else 0.3)
    wide = next(m for m in convs if m.in_channels == 64 and m.out_channels == 64
                and m.kernel_size == (3, 3))
    assert wide.weight.std().item() == pytest.approx(0.059, abs=0.002)
    torch_wide = dict(default.named_modules())[next(
        n for n, m in authors.named_modules() if m is wide)]
    assert torch_wide.weight.std().item() == pytest.approx(0.024, abs=0.002)
    for bn in (m for m in authors.modules() if isinstance(m, TaskBatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_unknown_init_is_refused_by_the_config() -> None:
    from hmaml.config import load_config

    with pytest.raises(HmamlError, match=r"model\.init='xavier' is not one of authors, torch"):
        load_config("quickstart", ["model.init=xavier"])


def test_resnet12_is_the_usual_few_shot_resnet12() -> None:
    """64-160-320-640, three 3x3 convs and a 1x1 shortcut per block, leaky ReLU 0.1, max-pool per
    block: the 12,424,320 parameters of MetaOptNet's / FEAT's ResNet-12 without DropBlock."""
    encoder = build_encoder("resnet12", 3, 84)
    assert sum(p.numel() for p in encoder.parameters()) == 12_424_320
    assert [b.convs[0].out_channels for b in encoder.blocks] == [64, 160, 320, 640]
    assert encoder.feat_dim == 640
    sides = []
    handle = encoder.blocks[-1].register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
    encoder(torch.rand(1, 2, 3, 84, 84))
    handle.remove()
    assert sides == [5]  # 84 -> 42 -> 21 -> 10 -> 5 before the average pool
