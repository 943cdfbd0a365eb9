"""The fused CPU kernel (batch norm + 2x2 max pool + ReLU) against the native ops it replaces:
equal in float64 (second derivatives too), as close to float64 as the native ops in bf16, inside
the encoders, under inference mode; switched off, the native ops run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from hmaml.models import build_encoder, fused
from hmaml.models.norm import TaskBatchNorm2d

pytestmark = pytest.mark.skipif(fused.kernel() is None, reason=fused.status())


def native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.relu(F.max_pool2d(F.batch_norm(x, None, None, weight, bias, training=True), 2))


def run(fn, x, weight, bias, grad):
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    out = fn(x, weight, bias)
    return [out, *torch.autograd.grad(out, (x, weight, bias), grad.to(out.dtype))]


def channels_last(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(5, 12, 8, 8), (3, 7, 7, 9), (4, 6, 2, 3)],
                         ids=["even", "odd sides (floor pooling)", "smallest"])
def test_float64_equals_the_native_ops(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = channels_last(*shape)
    weight = torch.randn(shape[1], dtype=torch.float64)  # both signs
    bias = torch.randn(shape[1], dtype=torch.float64)
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=torch.float64)
    ref = run(native, x, weight, bias, grad)
    got = run(lambda a, w, b: fused.batch_norm_pool_relu(a, w, b, 1e-5), x, weight, bias, grad)
    for name, a, b in zip(("out", "dx", "dweight", "dbias"), got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)


def test_bf16_is_as_close_to_float64_as_the_native_ops() -> None:
    torch.manual_seed(1)
    x = channels_last(6, 16, 14, 14, dtype=torch.bfloat16)
    weight, bias, grad = torch.randn(16), torch.randn(16), torch.randn(6, 16, 7, 7)
    exact = run(native, x.double(), weight.double(), bias.double(), grad.double())
    ours = run(lambda a, w, b: fused.batch_norm_pool_relu(a, w, b, 1e-5), x, weight, bias, grad)
    theirs = run(native, x, weight, bias, grad)
    for a, b, e in zip(ours, theirs, exact, strict=True):
        e = e.detach()
        ours_err = float((a.detach().double() - e).norm() / e.norm())
        theirs_err = float((b.detach().double() - e).norm() / e.norm())
        assert ours_err <= 1.25 * theirs_err + 1e-6 and ours_err < 5e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
def test_a_nan_propagates_as_through_the_native_ops(dtype: torch.dtype) -> None:
    """A NaN pixel must reach the loss (the run's non-finite stop reads it) and its gradient."""
    torch.manual_seed(2)
    x = channels_last(3, 4, 6, 6, dtype=dtype)
    x[1, 2, 3, 3] = float("nan")
    fp = torch.float64 if dtype == torch.float64 else torch.float32  # native bf16 BN: float affine
    weight, bias = torch.randn(4, dtype=fp), torch.randn(4, dtype=fp)
    grad = torch.randn(3, 4, 3, 3, dtype=fp)
    got = run(lambda a, w, b: fused.batch_norm_pool_relu(a, w, b, 1e-5), x, weight, bias, grad)
    ref = run(native, x, weight, bias, grad)
    assert got[0].isnan().any() and got[1].isnan().any()
    for name, a, b in zip(("out", "dx", "dweight", "dbias"), got, ref, strict=True):
        assert torch.equal(a.isnan(), b.isnan()), name


def test_the_encoder_with_the_kernel_equals_it_without(monkeypatch: pytest.MonkeyPatch) -> None:
    """Conv4 over 3 tasks side by side, float64: embeddings and every parameter's gradient."""
    torch.manual_seed(2)
    encoder = build_encoder("conv4", 1, 28).double()
    images = torch.rand(3, 10, 1, 28, 28, dtype=torch.float64)
    results = []
    for use in (True, False):
        if not use:
            monkeypatch.setattr(fused, "usable", lambda x: False)
        encoder.zero_grad()
        out = encoder(images)
        out.pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in encoder.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert all(torch.allclose(x, y, rtol=1e-10, atol=1e-12) for x, y in zip(ga, gb, strict=True))


def test_inference_saves_nothing_and_gives_the_training_output() -> None:
    torch.manual_seed(3)
    layer = TaskBatchNorm2d(4).double()
    x = channels_last(5, 8, 6, 6)  # two tasks of 4 channels
    with torch.inference_mode():
        inferred = layer.pool_relu(x, tasks=2)
    trained = layer.pool_relu(x.clone().requires_grad_(), tasks=2)
    assert torch.equal(inferred, trained.detach())


def test_support_statistics_and_per_task_weights_take_the_native_ops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(fused, "batch_norm_pool_relu",
                        lambda *a: calls.append(1) or native(a[0], a[1], a[2]))
    layer = TaskBatchNorm2d(4).double()
    x = channels_last(5, 8, 6, 6)
    layer.pool_relu(x, tasks=2)
    assert calls == [1]
    layer.stat_rows = 2
    layer.pool_relu(x, tasks=2)
    assert calls == [1]


def test_second_derivatives_equal_the_native_ops() -> None:
    """A gradient taken with create_graph=True (MAML's second order) is differentiated exactly."""
    torch.manual_seed(4)
    x0 = channels_last(3, 6, 6, 6)
    w0, b0 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    results = []
    for fn in (native, lambda a, w, b: fused.batch_norm_pool_relu(a, w, b, 1e-5)):
        x, weight, bias = (t.clone().requires_grad_() for t in (x0, w0, b0))
        (dx,) = torch.autograd.grad(fn(x, weight, bias).pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(dx.pow(2).sum(), (x, weight, bias)))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_switched_off_the_native_ops_run_and_say_so() -> None:
    code = ("from hmaml.models import fused; import torch; "
            "x = torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last); "
            "print(fused.usable(x), fused.status())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "HMAML_FUSED_KERNELS": "0"}).stdout
    assert out.strip() == "False native ops (HMAML_FUSED_KERNELS=0)"


def test_native_ops_within_the_block() -> None:
    x = channels_last(2, 4, 4, 4, dtype=torch.float32)
    assert fused.usable(x)
    with fused.native_ops():
        assert not fused.usable(x)
    assert fused.usable(x)
