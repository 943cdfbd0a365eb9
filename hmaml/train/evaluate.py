"""Classifying a fixed episode list on every rank: validation, test and pre-training's check.

Every rank classifies its share of a fixed list of episodes (see
:func:`hmaml.data.eval_lists.eval_episodes`); the per-episode accuracies are gathered and put
back in global episode order, so the figures do not depend on the number of processes; each
list gives its mean ± 95 % CI. Which checkpoint is tested, on how many lists, and how the lists'
figures combine is the test protocol's (:mod:`hmaml.train.protocol`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from hmaml.data.eval_lists import EvalBatch
from hmaml.methods import Method


@dataclass
class EvalResult:
    """Per-episode accuracies (global episode order) and their summary, in percent."""

    accuracies: np.ndarray
    mean: float
    ci95: float
    weight_update_norm: float | None = None
    bias_update_norm: float | None = None
    seconds: float = math.nan  # wall time of adapting and classifying (Tables 4 and 8)

    @staticmethod
    def of(accuracies: np.ndarray, weight_norm: float | None = None,
           bias_norm: float | None = None, seconds: float = math.nan) -> EvalResult:
        mean, ci = mean_ci95(accuracies)
        return EvalResult(accuracies, mean, ci, weight_norm, bias_norm, seconds)


def mean_ci95(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean accuracy and 1.96·σ/√n, both in percent (the few-shot literature's convention)."""
    acc = 100.0 * np.asarray(accuracies, dtype=np.float64)
    return float(acc.mean()), float(1.96 * acc.std() / math.sqrt(acc.size))


def evaluate(method: Method, batches: Iterable[EvalBatch], accelerator) -> EvalResult:
    """Classify this rank's episodes, gather all ranks' results, return them in episode order.

    ``method`` may be wrapped (DDP). Adaptation builds no autograd graph: it runs under
    ``torch.inference_mode`` where it takes no gradient, else under ``no_grad`` (whole-network
    MAML switches gradients back on for its inner steps only). The encoder runs in the
    method's precision, as in training. ``seconds`` is the wall time from the first batch to
    the gathered accuracies on the host (so a GPU's queued work is included).
    """
    start = time.perf_counter()
    device = accelerator.device
    rows = [torch.empty(0, 4, dtype=torch.float64, device=device)]  # a rank may have none
    # DDP and DeepSpeed keep the method as .module (Accelerate's unwrap_model would import
    # DeepSpeed, seconds of a short evaluation)
    unwrapped: Method = getattr(method, "module", method)
    method.eval()
    with torch.no_grad() if unwrapped.adapts_with_autograd else torch.inference_mode():
        for batch in batches:
            tasks = batch.tasks.to(device, non_blocking=True)
            out = method(tasks)
            no_norm = torch.full((tasks.num_tasks,), math.nan, device=device)
            rows.append(torch.stack([
                batch.indices.to(device).double(), out.accuracy(tasks.query_y).double(),
                (no_norm if out.weight_update_norm is None else out.weight_update_norm).double(),
                (no_norm if out.bias_update_norm is None else out.bias_update_norm).double(),
            ], dim=1))
    method.train()
    gathered = _gather_rows(torch.cat(rows), accelerator)  # one collective on every rank
    gathered = gathered[torch.argsort(gathered[:, 0])]
    gathered = gathered.cpu()
    seconds = time.perf_counter() - start
    weight_norm: float | None = None
    bias_norm: float | None = None
    if not torch.isnan(gathered[:, 2]).any():
        weight_norm, bias_norm = float(gathered[:, 2].mean()), float(gathered[:, 3].mean())
    return EvalResult.of(gathered[:, 1].numpy(), weight_norm, bias_norm, seconds=seconds)


def _gather_rows(rows: torch.Tensor, accelerator) -> torch.Tensor:
    """Concatenate every rank's rows (ranks may hold different counts; the first column of a
    real row is never negative, so padding rows are marked with -1 there and dropped)."""
    if accelerator.num_processes == 1:
        return rows
    gathered = accelerator.gather(accelerator.pad_across_processes(rows, dim=0, pad_index=-1))
    return gathered[gathered[:, 0] >= 0]
