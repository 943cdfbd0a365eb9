"""Small random task batches and models shared by the model and method tests."""

from __future__ import annotations

import torch

from hmaml.methods import MAML, HyperMAML, ProtoNet
from hmaml.models import build_encoder
from hmaml.tasks import TaskBatch


def random_tasks(tasks: int = 3, n_way: int = 4, shot: int = 2, query: int = 3, size: int = 16,
                 channels: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32
                 ) -> TaskBatch:
    """T tasks of random images with shuffled (not class-sorted) example order."""
    gen = torch.Generator().manual_seed(seed)

    def labels(per_class: int) -> torch.Tensor:
        base = torch.arange(n_way).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(base.numel(), generator=gen)]
                            for _ in range(tasks)])

    sy, qy = labels(shot), labels(query)
    sx = torch.rand(tasks, n_way * shot, channels, size, size, generator=gen, dtype=dtype)
    qx = torch.rand(tasks, n_way * query, channels, size, size, generator=gen, dtype=dtype)
    # give each class a visible signature so that adaptation matters
    sx = sx + 0.5 * sy[..., None, None, None].to(dtype) / n_way
    qx = qx + 0.5 * qy[..., None, None, None].to(dtype) / n_way
    return TaskBatch(sx, sy, qx, qy, n_way).validate()


def build(name: str, n_way: int = 4, size: int = 16, seed: int = 0, **kwargs):
    """A method with a Conv4 encoder, seeded."""
    torch.manual_seed(seed)
    encoder = build_encoder("conv4", 1, size)
    if name == "protonet":
        return ProtoNet(encoder, n_way)
    if name == "maml":
        return MAML(encoder, n_way, **kwargs)
    return HyperMAML(encoder, n_way, hn_width=32, **kwargs)
