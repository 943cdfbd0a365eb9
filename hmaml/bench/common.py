"""What the benchmarks share: random task batches and device synchronisation."""

from __future__ import annotations

import torch

from hmaml.tasks import TaskBatch


def random_batch(tasks: int, n_way: int, shot: int, query: int, device: torch.device,
                 channels: int = 1, size: int = 28) -> TaskBatch:
    """Random images with class-sorted labels: speed does not depend on the content."""
    sy = torch.arange(n_way).repeat_interleave(shot).expand(tasks, -1)
    qy = torch.arange(n_way).repeat_interleave(query).expand(tasks, -1)
    return TaskBatch(torch.rand(tasks, n_way * shot, channels, size, size), sy,
                     torch.rand(tasks, n_way * query, channels, size, size), qy,
                     n_way).to(device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads what ran (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
