"""Batched building blocks shared by the methods; every function works on T tasks at once."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half-precision tensors for softmax and losses; leave fp32/fp64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def one_hot(y: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    """``[T, M]`` integer labels -> ``[T, M, N]`` one-hot rows of ``dtype``.

    A comparison, not ``F.one_hot``: that checks the labels' range with a device-to-host copy,
    a stall of the GPU at every step. The streams and predict build labels in range, and
    ``TaskBatch.validate`` checks a batch built by hand.
    """
    return (y.unsqueeze(-1) == torch.arange(n_way, device=y.device)).to(dtype)


def class_means(x: Tensor, onehot: Tensor) -> Tensor:
    """Per-class mean of ``x [T, M, D]`` given ``onehot [T, M, N]`` -> ``[T, N, D]`` (one bmm)."""
    counts = onehot.sum(dim=1).clamp_min(1.0).unsqueeze(-1)
    return torch.bmm(onehot.transpose(1, 2), x) / counts


def linear_logits(emb: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Per-task linear classifier: ``emb [T,M,D]``, ``weight [T,N,D]``, ``bias [T,N]`` -> logits."""
    return torch.baddbmm(bias.unsqueeze(1), emb, weight.transpose(1, 2))


def task_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of each task: ``[T, M, N]``, ``[T, M]`` -> ``[T]`` (at least fp32)."""
    per_example = F.cross_entropy(at_least_fp32(logits).flatten(0, 1), y.flatten().long(),
                                  reduction="none")
    return per_example.view(y.shape).mean(dim=1)


def task_accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct predictions per task -> ``[T]``."""
    return (logits.argmax(dim=-1) == y).float().mean(dim=1)


def head_grads(emb: Tensor, onehot: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Exact gradient of the mean support cross-entropy w.r.t. a linear head, per task.

    For softmax regression the gradient has the closed form ``(softmax - y)^T e / M``: two batched
    matmuls instead of an autograd pass. Autograd through this expression is exact second-order
    MAML; detaching it gives first-order MAML.
    """
    probs = torch.softmax(at_least_fp32(linear_logits(emb, weight, bias)), dim=-1)
    residual = (probs - onehot.to(probs.dtype)).to(emb.dtype) / emb.shape[1]
    return torch.bmm(residual.transpose(1, 2), emb), residual.sum(dim=1)


def sgd_head_steps(emb: Tensor, onehot: Tensor, weight: Tensor, bias: Tensor, steps: int,
                   lr: float, first_order: bool) -> tuple[Tensor, Tensor]:
    """``steps`` gradient steps on the support loss, each taken at the current adapted weights."""
    for _ in range(steps):
        grad_w, grad_b = head_grads(emb, onehot, weight, bias)
        if first_order:
            grad_w, grad_b = grad_w.detach(), grad_b.detach()
        weight, bias = weight - lr * grad_w, bias - lr * grad_b
    return weight, bias


def update_norms(weight: Tensor, bias: Tensor, weight0: Tensor, bias0: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """Per-task Frobenius norms of the weight and bias updates (the paper's Table 3)."""
    return ((weight - weight0).flatten(1).norm(dim=1).detach(),
            (bias - bias0).flatten(1).norm(dim=1).detach())
