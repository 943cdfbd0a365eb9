"""The fixed evaluation lists: validation and test episodes that depend on nothing but the pack.

:func:`eval_episodes` derives a fixed list of episodes from the manifest and a seed only, so the
test tasks are the same whatever the number of ranks or workers; :class:`EvalLoader` serves one
rank's share of them with their global indices.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from hmaml.data.format import Manifest
from hmaml.data.split import (
    TAG_EVAL,
    TaskImages,
    check_episode_shape,
    derive_seed,
    load_split,
    split_info,
)
from hmaml.data.store import PackStore
from hmaml.data.transforms import build_transform
from hmaml.errors import HmamlError
from hmaml.tasks import TaskBatch


@dataclass(frozen=True)
class EpisodeSpec:
    """One evaluation episode: the split labels of its classes (label i of the task = the i-th)
    and, per class, K+Q distinct image indices (the first K are the support)."""

    index: int
    classes: tuple[int, ...]
    images: tuple[tuple[int, ...], ...]


def split_key(split: str) -> int:
    """A stable integer for a split name: validation and test lists get independent seeds."""
    return zlib.crc32(split.encode())


def eval_episodes(manifest: Manifest, split: str, *, n_way: int, n_shot: int,
                  n_query: int, n_episodes: int, seed: int, repeat: int = 0
                  ) -> list[EpisodeSpec]:
    """The fixed evaluation episodes of a split: a function of the manifest's class counts,
    ``seed``, the split's name and ``repeat`` (the test protocol's independent lists) only.
    Episode ``e`` has its own seed, so any prefix of a longer list is the shorter list and each
    episode can be rebuilt alone."""
    info = split_info(manifest, split)
    check_episode_shape(info, n_way, n_shot, n_query)
    specs = []
    for e in range(n_episodes):
        rng = np.random.Generator(np.random.PCG64(
            derive_seed(TAG_EVAL, seed, split_key(split), repeat, e)))
        classes = rng.choice(len(info.names), n_way, replace=False)
        images = tuple(tuple(int(i) for i in rng.choice(int(info.counts[c]), n_shot + n_query,
                                                        replace=False)) for c in classes)
        specs.append(EpisodeSpec(e, tuple(int(c) for c in classes), images))
    return specs


class EvalBatch(NamedTuple):
    """Evaluation tasks with their global episode indices (to gather and reorder results)."""

    indices: torch.Tensor  # int64 [T]
    tasks: TaskBatch


class EvalLoader:
    """One rank's share of the fixed evaluation episodes, re-iterable: the split's class records
    are read once, at construction. Rank ``r`` of ``W`` gets episodes ``r, r+W, r+2W, ...``
    (balanced to within one episode), in meta-batches of ``tasks_per_batch``."""

    def __init__(self, pack: str | Path | PackStore, split: str, *, n_way: int, n_shot: int,
                 n_query: int, n_episodes: int = 600, seed: int = 0, rank: int = 0,
                 world_size: int = 1, tasks_per_batch: int = 32,
                 image_size: int | None = None, repeat: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise HmamlError(f"rank={rank} must lie in 0..world_size-1 (world_size={world_size})")
        if tasks_per_batch < 1:
            raise HmamlError(f"tasks_per_batch={tasks_per_batch} must be at least 1")
        store = PackStore.of(pack)
        manifest = store.read_manifest()
        self.specs = eval_episodes(manifest, split, n_way=n_way, n_shot=n_shot, n_query=n_query,
                                   n_episodes=n_episodes, seed=seed,
                                   repeat=repeat)[rank::world_size]
        self.info, self.classes = load_split(store, split, manifest)
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.tasks_per_batch = tasks_per_batch
        self.transform = build_transform(None, image_size or self.info.image.size,
                                         self.info.image.pipeline)

    def __len__(self) -> int:
        return math.ceil(len(self.specs) / self.tasks_per_batch)

    def __iter__(self) -> Iterator[EvalBatch]:
        for start in range(0, len(self.specs), self.tasks_per_batch):
            specs = self.specs[start:start + self.tasks_per_batch]
            images = TaskImages(len(specs), self.n_way, self.n_shot, self.n_query,
                                self.info.image_shape)
            for task, spec in enumerate(specs):
                images.put(task, [self.classes[c] for c in spec.classes], np.array(spec.images))
            yield EvalBatch(torch.tensor([s.index for s in specs], dtype=torch.int64),
                            images.to_batch(self.transform))


def eval_loader(pack: str | Path | PackStore, split: str, *, n_way: int, n_shot: int, n_query: int,
                n_episodes: int = 600, seed: int = 0, rank: int = 0, world_size: int = 1,
                tasks_per_batch: int = 32, image_size: int | None = None,
                repeat: int = 0) -> EvalLoader:
    """This rank's :class:`EvalLoader` (see there)."""
    return EvalLoader(pack, split, n_way=n_way, n_shot=n_shot, n_query=n_query,
                      n_episodes=n_episodes, seed=seed, rank=rank, world_size=world_size,
                      tasks_per_batch=tasks_per_batch, image_size=image_size, repeat=repeat)
