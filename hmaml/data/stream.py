"""The training stream: N-way K-shot meta-batches of one split for one rank, from a pack.

:class:`EpisodeStream` is an ``IterableDataset`` meant for a plain ``DataLoader`` with workers
(never ``accelerator.prepare()`` it: Accelerate would re-split a stream that is already per
rank). Every (rank, worker) samples from *all* classes of the split with its own random stream,
seeded from (seed, rank, worker, epoch); classes are not partitioned between workers, which would
shrink the variety of tasks each one can form (CUB's 100 training classes over 16 workers would
leave 6 per worker). Each yielded item is a whole meta-batch (:class:`TaskBatch`), built and
augmented in the worker; worker ``w`` of ``W`` yields batches ``w, w+W, ...`` so a rank gets
exactly ``episodes`` tasks per epoch, in an order fixed by the worker count.

Class records live in a buffer bounded in bytes. When the split fits, the buffer holds every class
and classes are drawn exactly uniformly; otherwise classes stream through it first-in first-out,
one new class per episode, over the shards in a random interleaved order, pass after pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hmaml.data.split import (
    TAG_AUGMENT,
    TAG_SAMPLE,
    TAG_STREAM,
    ShardInfo,
    SplitInfo,
    TaskImages,
    check_episode_shape,
    check_shard_files,
    read_shard,
    sample_images,
    seeded_generator,
    split_info,
)
from hmaml.data.store import PackStore
from hmaml.data.transforms import build_transform
from hmaml.errors import HmamlError
from hmaml.tasks import TaskBatch

MB = 1 << 20
MAX_OPEN_SHARDS = 16  # shards read at once while streaming (each holds one open file)


def stream_classes(shards: list[ShardInfo], info: SplitInfo, generator: torch.Generator,
                   max_open: int = MAX_OPEN_SHARDS) -> Iterator[tuple[int, np.ndarray]]:
    """Endless passes over the split's classes. Each pass takes the shards in a random order and
    reads up to ``max_open`` of them at once, picking the next record from an open shard with
    probability proportional to the records it has left; with all shards open that makes the
    class order a uniformly random interleaving of the shards."""
    while True:
        order = torch.randperm(len(shards), generator=generator).tolist()
        pending = deque(shards[i] for i in order)
        open_: list[tuple[Iterator[tuple[int, np.ndarray]], int]] = []
        while pending or open_:
            while pending and len(open_) < max_open:
                shard = pending.popleft()
                open_.append((read_shard(shard, info), shard.classes))
            left = torch.tensor([n for _, n in open_], dtype=torch.float64)
            pick = int(torch.multinomial(left, 1, generator=generator))
            reader, n = open_[pick]
            yield next(reader)
            if n == 1:
                next(reader, None)  # run the reader to its end: it checks the record count
                del open_[pick]
            else:
                open_[pick] = (reader, n - 1)


# ----------------------------------------------------------------------------- class buffers


class ResidentClasses:
    """The whole split in memory: classes are drawn exactly uniformly."""

    def __init__(self, classes: list[np.ndarray]) -> None:
        self.classes = classes

    def draw(self, n_way: int, generator: torch.Generator) -> list[np.ndarray]:
        picks = torch.randperm(len(self.classes), generator=generator)[:n_way]
        return [self.classes[i] for i in picks.tolist()]

    def advance(self) -> None:
        """Nothing to refresh: every class is resident."""


class StreamBuffer:
    """A first-in first-out buffer of class records bounded by ``budget`` bytes.

    After each episode the oldest class leaves and classes from the stream enter while they fit,
    so every class of a pass enters once and stays for the same number of episodes (for equal
    sizes): draws are uniform over classes in expectation, and every class gets its turn.
    A class met again at the start of the next pass replaces its old copy, so the buffer never
    holds one class twice. With ``budget`` at least the ``n_way`` largest classes, it always holds
    at least ``n_way`` classes.
    """

    def __init__(self, stream: Iterator[tuple[int, np.ndarray]], budget: int) -> None:
        self.stream, self.budget = stream, budget
        self.entries: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.pending = next(stream)
        self._fill()

    def _fill(self) -> None:
        while True:
            label, images = self.pending
            if label in self.entries:
                self.bytes -= self.entries.pop(label).nbytes
            if self.bytes + images.nbytes > self.budget:
                return
            self.entries[label] = images
            self.bytes += images.nbytes
            self.pending = next(self.stream)

    def draw(self, n_way: int, generator: torch.Generator) -> list[np.ndarray]:
        resident = list(self.entries.values())
        picks = torch.randperm(len(resident), generator=generator)[:n_way]
        return [resident[i] for i in picks.tolist()]

    def advance(self) -> None:
        _, oldest = self.entries.popitem(last=False)
        self.bytes -= oldest.nbytes
        self._fill()


class EpisodeStream(IterableDataset):
    """Training episodes of one split for one rank, as meta-batches of tasks.

    Each task is a function of (seed, epoch, its global index in the epoch) alone: its classes,
    images and augmentation come from generators derived from those keys. ``batches`` lists the
    global task indices of each meta-batch this rank trains on (the distributed plan, see
    :mod:`hmaml.train.plan`); by default ``episodes`` tasks in meta-batches of
    ``tasks_per_batch``, numbered after those of the lower ranks. So when the split fits the class
    buffer, the tasks of an epoch do not depend on the number of processes or workers, and k
    processes train on exactly the tasks of one. When it does not fit, classes stream through a
    buffer per (rank, worker), in an order seeded from (seed, rank, worker, epoch), and a task
    draws from what its worker's buffer holds.
    ``buffer_mb`` bounds the class buffer of each worker; memory per rank is about
    workers x (buffer_mb + one meta-batch), except that a split that fits is loaded once in the
    parent process and shared by forked workers. Call :meth:`set_epoch` before each epoch: the
    epoch lives in shared memory, so persistent DataLoader workers read the new one when the
    next epoch's iterator starts them over (no worker is re-created per epoch).
    """

    def __init__(self, pack: str | Path | PackStore, split: str, *, n_way: int, n_shot: int,
                 n_query: int, tasks_per_batch: int, episodes: int, seed: int, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, augment: str | None = None,
                 buffer_mb: float = 512, image_size: int | None = None,
                 batches: list[tuple[int, ...]] | None = None) -> None:
        if not 0 <= rank < world_size:
            raise HmamlError(f"rank={rank} must lie in 0..world_size-1 (world_size={world_size})")
        if tasks_per_batch < 1 or episodes < 1:
            raise HmamlError(f"tasks_per_batch={tasks_per_batch} and episodes={episodes} must be "
                             "at least 1")
        store = PackStore.of(pack)
        manifest = store.read_manifest()
        self.info = split_info(manifest, split)
        check_episode_shape(self.info, n_way, n_shot, n_query)
        self.shards = check_shard_files(store, manifest, self.info)
        self.budget = int(buffer_mb * MB)
        sizes = self.info.class_bytes
        self.fits = int(sizes.sum()) <= self.budget
        need = int(np.sort(sizes)[-n_way:].sum())
        if need > self.budget:
            raise HmamlError(f"buffer_mb={buffer_mb} cannot hold n_way={n_way} classes of split "
                             f"{split!r} (needs at least {math.ceil(need / MB)} MB)")
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        if batches is None:
            first = rank * episodes
            batches = [tuple(range(first + b, first + min(b + tasks_per_batch, episodes)))
                       for b in range(0, episodes, tasks_per_batch)]
        if not batches or not all(batches):
            raise HmamlError("every meta-batch of the stream needs at least one task")
        self.task_batches = batches
        self.seed, self.rank = seed, rank
        self._epoch = torch.tensor([epoch], dtype=torch.int64).share_memory_()
        self.image_size = image_size or self.info.image.size
        self.augment = augment
        self.transform = build_transform(augment, self.image_size, self.info.image.pipeline)
        self._resident: list[np.ndarray] | None = None

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch  # shared memory: persistent workers see it at their next epoch

    def __len__(self) -> int:
        """Meta-batches per epoch for this rank."""
        return len(self.task_batches)

    def preload(self) -> None:
        """Read a split that fits the buffer into memory now (e.g. before workers fork)."""
        if self.fits:
            self._resident_classes()

    def _resident_classes(self) -> list[np.ndarray]:
        """The split's class records in memory, read on first use (a split that fits)."""
        if self._resident is None:
            self._resident = [images for shard in self.shards
                              for _, images in read_shard(shard, self.info)]
        return self._resident

    def __iter__(self) -> Iterator[TaskBatch]:
        worker = get_worker_info()
        return self.batches(worker.id if worker else 0, worker.num_workers if worker else 1)

    def batches(self, worker: int, num_workers: int) -> Iterator[TaskBatch]:
        """The meta-batches ``worker, worker + num_workers, ...`` of this rank's epoch."""
        epoch = self.epoch
        if self.fits:
            source: ResidentClasses | StreamBuffer = ResidentClasses(self._resident_classes())
        else:
            order = seeded_generator(TAG_STREAM, self.seed, self.rank, worker, epoch)
            source = StreamBuffer(stream_classes(self.shards, self.info, order), self.budget)
        per_class = self.n_shot + self.n_query
        for b in range(worker, len(self), num_workers):
            indices = self.task_batches[b]
            images = TaskImages(len(indices), self.n_way, self.n_shot, self.n_query,
                                self.info.image_shape)
            for task, index in enumerate(indices):
                generator = seeded_generator(TAG_SAMPLE, self.seed, epoch, index)
                classes = source.draw(self.n_way, generator)
                counts = np.array([len(c) for c in classes])
                images.put(task, classes, sample_images(counts, per_class, generator))
                source.advance()  # after the copy: an evicted class is never held past its turn
            augment = None if self.augment in (None, "none") else [
                seeded_generator(TAG_AUGMENT, self.seed, epoch, index) for index in indices]
            yield images.to_batch(self.transform, augment)


def train_loader(pack: str | Path | PackStore, split: str, *, n_way: int, n_shot: int, n_query: int,
                 tasks_per_batch: int, episodes: int, seed: int, rank: int = 0,
                 world_size: int = 1, epoch: int = 0, workers: int = 0,
                 augment: str | None = None, buffer_mb: float = 512,
                 image_size: int | None = None,
                 batches: list[tuple[int, ...]] | None = None) -> DataLoader:
    """A DataLoader over an :class:`EpisodeStream` yielding TaskBatches of ``tasks_per_batch``
    tasks, ``episodes`` tasks per epoch for this rank (or the global task indices ``batches``,
    see :class:`EpisodeStream`). Set the epoch with
    ``loader.dataset.set_epoch(e)``. Do not pass it to ``accelerator.prepare()``."""
    stream = EpisodeStream(pack, split, n_way=n_way, n_shot=n_shot, n_query=n_query,
                           tasks_per_batch=tasks_per_batch, episodes=episodes, seed=seed,
                           rank=rank, world_size=world_size, epoch=epoch, augment=augment,
                           buffer_mb=buffer_mb, image_size=image_size, batches=batches)
    # The first start method listed is the platform default; get_start_method() would fix it.
    method = mp.get_start_method(allow_none=True) or mp.get_all_start_methods()[0]
    if workers > 0 and method == "fork":
        stream.preload()  # forked workers share these pages instead of each reading the split
    return DataLoader(stream, batch_size=None, num_workers=workers,
                      persistent_workers=workers > 0)
