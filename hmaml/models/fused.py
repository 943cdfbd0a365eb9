"""Per-task BatchNorm, 2x2 max pooling and ReLU fused on the CPU: a small C++ kernel, built on
first use with PyTorch's extension loader (a C++ compiler and ninja), cached per CPU.

Why: on the CPU a Conv4 training step spends more time in the first block's element-wise passes
than in its convolution. Native ops write the normalised full-resolution activation, pool it
with int64 indices, and read both back in the backward pass: about 3 GB of memory traffic for
the first block of 32 tasks (5-way 1-shot, 16 queries; 256 MB per bf16 activation). The kernel
reads the convolution's output twice (statistics, then pooling on sign(weight) * x, which
pools the normalised values whatever the weight's sign) and writes only the pooled output, the
normalised value at each maximum (in float) and a one-byte argmax; its gradient reads the input
once and writes the input's gradient once. Measured on 2 cores (the first block of 32 tasks,
bf16, forward and backward): 120 ms against 260 ms; a whole HyperMAML step 14 % faster.

Results equal the native ops' to rounding (float64: 1e-12, tested) with one difference: the
gradient of a window whose values tie goes to the first maximum of x where the native ops take
the first maximum of the rounded normalised values (in bf16 they can differ); and a weight that
is exactly 0 gets the gradient of x-hat at x's maximum instead of at the window's first
element. Either is a valid subgradient.

Where it runs: :meth:`hmaml.models.norm.TaskBatchNorm2d.pool_relu` uses it on the CPU for
channels-last float32, float64 and bf16 input with parameters shared by the tasks and batch
statistics, outside compiled graphs; elsewhere (CUDA, MAML's per-task weights, support statistics,
``HMAML_FUSED_KERNELS=0``, or a failed build, which warns once) the native ops run. A gradient
that will be differentiated again (``create_graph=True``) is taken through the native ops, so
second derivatives are exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx
from torch.nn import functional as F

SOURCE = Path(__file__).parent / "kernels" / "bn_pool_relu.cpp"
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_lock = threading.Lock()
_module: ModuleType | None = None
_status: str | None = None
_suspended = threading.local()


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    # -march=native: the build is for this CPU, so its name carries the CPU's flags
    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode()
                            + torch.__version__.encode()).hexdigest()[:12]
    # -fopenmp: at::parallel_for runs on torch's own OpenMP threads (the process already has
    # libgomp.so.1 loaded by torch, so the kernel binds to that one; threads of another pool
    # would compete with torch's spinning workers: 20 % slower measured)
    return load(name=f"hmaml_bn_pool_relu_{digest}", sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                verbose=False)


def kernel() -> ModuleType | None:
    """The compiled kernel, built on the first call; None where it is switched off or cannot
    be built (the reason is in :func:`status` and was warned about once)."""
    global _module, _status
    if _status is not None:
        return _module
    with _lock:
        if _status is not None:
            return _module
        if os.environ.get("HMAML_FUSED_KERNELS", "1") == "0":
            _status = "native ops (HMAML_FUSED_KERNELS=0)"
            return None
        try:
            _module = _build()
            _status = "fused CPU kernel (batch norm + max pool + ReLU)"
        except Exception as exc:  # a missing compiler or ninja: native ops, said once
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"
            _status = f"native ops (the fused CPU kernel could not be built: {reason})"
            warnings.warn(f"hmaml: {_status}", RuntimeWarning, stacklevel=2)
    return _module


def status() -> str:
    """What :meth:`~hmaml.models.norm.TaskBatchNorm2d.pool_relu` runs on the CPU (builds the
    kernel if it was not tried yet)."""
    kernel()
    assert _status is not None
    return _status


@contextlib.contextmanager
def native_ops() -> Iterator[None]:
    """Within the block (this thread), the native operators run: a reference computed by the
    operators themselves (the device-equivalence check compares the CPU with CUDA, which has
    no fused kernel, op by op)."""
    previous = getattr(_suspended, "on", False)
    _suspended.on = True
    try:
        yield
    finally:
        _suspended.on = previous


def usable(x: Tensor) -> bool:
    """Whether the fused kernel can take ``x`` (the parameters and statistics are the
    caller's to check)."""
    return (not getattr(_suspended, "on", False)
            and x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 4
            and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling()  # compiled graphs fuse on their own
            and kernel() is not None)


class BatchNormPoolReLU(torch.autograd.Function):
    """``relu(max_pool2d(batch_norm(x, weight, bias), 2))`` with batch statistics."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor, eps: float
                ) -> Tensor:
        module = kernel()
        assert module is not None
        # the attr-defined ignores of forward and backward: torch's FunctionCtx stub lacks what
        # autograd's ctx holds (needs_input_grad, saved_tensors) and what we set on it (eps)
        needs_grad = ctx.needs_input_grad  # type: ignore[attr-defined]
        save = any(needs_grad[:3])  # False under no_grad and inference_mode
        out, xhat, argmax, mean, invstd = module.forward(x, weight, bias, eps, save)
        if save:
            ctx.save_for_backward(x, weight, bias, out, xhat, argmax, mean, invstd)
            ctx.eps = eps  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors  # type: ignore[attr-defined]  # see forward
        x, weight, bias, out, xhat, argmax, mean, invstd = saved
        if torch.is_grad_enabled():  # create_graph: the gradient will be differentiated again
            eps = ctx.eps  # type: ignore[attr-defined]  # see forward
            return (*native_gradient(x, weight, bias, eps, grad), None)
        module = kernel()
        assert module is not None
        dx, dweight, dbias = module.backward(grad, x, out, xhat, argmax, mean, invstd, weight)
        return dx, dweight.to(weight.dtype), dbias.to(weight.dtype), None


def native_gradient(x: Tensor, weight: Tensor, bias: Tensor, eps: float, grad: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient through the native ops, itself differentiable (second-order methods)."""
    out = F.relu(F.max_pool2d(F.batch_norm(x, None, None, weight, bias, training=True,
                                           eps=eps), 2))
    dx, dweight, dbias = torch.autograd.grad(out, (x, weight, bias), grad, create_graph=True)
    return dx, dweight, dbias


def batch_norm_pool_relu(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """The fused op (call :func:`usable` first)."""
    return BatchNormPoolReLU.apply(x, weight, bias, eps)


__all__ = ["SOURCE", "BatchNormPoolReLU", "batch_norm_pool_relu", "kernel", "native_gradient",
           "native_ops", "status", "usable"]
