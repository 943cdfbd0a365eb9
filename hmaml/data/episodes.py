"""N-way K-shot episodes from a pack: a streaming training sampler and fixed evaluation lists.

Training: :class:`EpisodeStream` is an ``IterableDataset`` meant for a plain ``DataLoader`` with
workers (never ``accelerator.prepare()`` it: Accelerate would re-split a stream that is already
per rank). Every (rank, worker) samples from *all* classes of the split with its own random
stream, seeded from (seed, rank, worker, epoch); classes are not partitioned between workers,
which would shrink the variety of tasks each one can form (CUB's 100 training classes over 16
workers would leave 6 per worker). Each yielded item is a whole meta-batch (:class:`TaskBatch`),
built and augmented in the worker; worker ``w`` of ``W`` yields batches ``w, w+W, ...`` so a rank
gets exactly ``episodes`` tasks per epoch, in an order fixed by the worker count.

Class records live in a buffer bounded in bytes. When the split fits, the buffer holds every class
and classes are drawn exactly uniformly; otherwise classes stream through it first-in first-out,
one new class per episode, over the shards in a random interleaved order, pass after pass.

Evaluation: :func:`eval_episodes` derives a fixed list of episodes from the manifest and a seed
only, so the test tasks are the same whatever the number of ranks or workers; :class:`EvalLoader`
serves one rank's share of them with their global indices.

Shards are read with WebDataset's tar iterators under our own shard ordering rather than through
``wds.WebDataset``'s node and worker splitters: those split *shards* between workers (exactly the
class partitioning avoided here) and fail when workers outnumber shards.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from hmaml.data.format import ImageSpec, Manifest, ShardEntry, decode_class_record, split_parts
from hmaml.data.store import PackStore, RemotePolicy, open_location
from hmaml.data.transforms import Transform, build_transform
from hmaml.errors import HmamlError
from hmaml.tasks import TaskBatch

MB = 1 << 20
MAX_OPEN_SHARDS = 16  # shards read at once while streaming (each holds one open file)
_SAMPLE, _AUGMENT, _EVAL, _STREAM = 1, 2, 3, 4  # seed-sequence tags: a stream per purpose


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys; distinct keys give statistically independent streams."""
    words = [int(k) & (2**64 - 1) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


# ----------------------------------------------------------------------------- manifest checks


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a split as the sampler reads it: its manifest entry, where it is read from
    (after :func:`check_shard_files`: a local path or a URL), the labels ``first .. first +
    classes - 1`` it holds, ``base``: what its split's labels are offset by in a split union
    (label ``l`` of the shard's own split is label ``base + l`` of the union), and how a remote
    shard is read."""

    path: Path | str
    first: int
    classes: int
    bytes: int = -1
    base: int = 0
    entry: ShardEntry | None = None
    policy: RemotePolicy = dataclasses.field(default_factory=RemotePolicy)


@dataclass(frozen=True)
class SplitInfo:
    """What the sampler needs from a manifest about one split, checked."""

    split: str
    names: list[str]
    counts: np.ndarray  # int64 [classes]
    image: ImageSpec
    shards: list[ShardInfo]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the stored images."""
        return (self.image.stored_size, self.image.stored_size, self.image.channels)

    @property
    def class_bytes(self) -> np.ndarray:
        """Bytes of each class's decoded images."""
        return self.counts * int(np.prod(self.image_shape))


def split_info(manifest: Manifest, split: str) -> SplitInfo:
    """The classes and shards of ``split`` (or of a union ``a+b``, labels numbered part after
    part) from a manifest; refuse a split it lacks."""
    manifest.split_classes(split)  # every part exists
    names: list[str] = []
    counts: list[int] = []
    infos = []
    for part in split_parts(split):
        entry = manifest.splits[part]
        base = first = len(names)
        for shard in entry.shards:
            infos.append(ShardInfo(shard.file, first, shard.classes, shard.bytes, base, shard))
            first += shard.classes
        if first - base != len(entry.classes):
            raise HmamlError(f"manifest split {part!r}: shards hold {first - base} classes but "
                             f"the class list has {len(entry.classes)}")
        names += [c.name for c in entry.classes]
        counts += [c.count for c in entry.classes]
    return SplitInfo(split, names, np.array(counts, dtype=np.int64), manifest.image, infos)


def check_episode_shape(info: SplitInfo, n_way: int, n_shot: int, n_query: int) -> None:
    """Refuse an episode shape the split cannot supply, naming the split or the class at fault."""
    for name, value in (("n_way", n_way), ("n_shot", n_shot), ("n_query", n_query)):
        if value < 1:
            raise HmamlError(f"{name}={value}: must be at least 1")
    if n_way > len(info.names):
        raise HmamlError(f"split {info.split!r} has {len(info.names)} classes, fewer than "
                         f"n_way={n_way}")
    short = np.flatnonzero(info.counts < n_shot + n_query)
    if short.size:
        c = int(short[0])
        raise HmamlError(f"split {info.split!r}: class {info.names[c]!r} has {info.counts[c]} "
                         f"images, fewer than n_shot + n_query = {n_shot} + {n_query}"
                         + (f" ({short.size} such classes)" if short.size > 1 else ""))


def check_shard_files(store: PackStore, manifest: Manifest,
                      info: SplitInfo) -> list[ShardInfo]:
    """Every shard of the split passes the pack's shard check (local: exists with the manifest's
    size; remote and cached: fetched, size and sha256; remote: its size is checked as it is
    read). Returns the shards with where to read them."""
    return [dataclasses.replace(shard, path=store.check_shard(shard.entry, manifest),
                                policy=store.policy)
            for shard in info.shards]


# ----------------------------------------------------------------------------- shard reading


def read_shard(shard: ShardInfo, info: SplitInfo) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(label, images [n, H, W, C] uint8)`` of each class record in a shard, in order,
    checking each against the manifest; any read or decode error is an HmamlError naming the shard.
    Labels are those of ``info`` (a union's, for a shard of one of its parts).
    """
    expected = shard.first
    end = shard.first + shard.classes
    try:
        with open_location(shard.path, shard.bytes if shard.bytes >= 0 else None,
                           shard.policy) as handle:
            for sample in group_by_keys(tar_file_expander([{"url": str(shard.path),
                                                               "stream": handle}])):
                own, name, images = decode_class_record(sample)
                label = shard.base + own
                if label != expected or expected >= end:
                    want = expected - shard.base if expected < end else "none"
                    raise HmamlError(f"{shard.path}: record {sample['__key__']!r} has label "
                                     f"{own}, expected {want} per the manifest")
                want = (int(info.counts[label]), *info.image_shape)
                if images.dtype != np.uint8 or images.shape != want or name != info.names[label]:
                    raise HmamlError(f"{shard.path}: class {name!r} holds {images.dtype} "
                                     f"{tuple(images.shape)}, the manifest says "
                                     f"{info.names[label]!r} uint8 {want}")
                expected += 1
                yield label, images
    except HmamlError as exc:  # WebDataset appends " @ <stream>", the stream and the url
        raise HmamlError(str(exc.args[0]).split(" @ <", 1)[0]) from None
    except Exception as exc:  # tarfile, numpy and json errors alike: a damaged shard
        # args[0] alone: WebDataset appends the stream and url to an exception's args
        detail = str(exc.args[0]).splitlines()[0] if exc.args else "no detail"
        raise HmamlError(f"{shard.path}: unreadable shard ({type(exc).__name__}: {detail}); "
                         "re-pack the dataset") from exc
    if expected != end:
        raise HmamlError(f"{shard.path}: holds {expected - shard.first} class records, the "
                         f"manifest says {shard.classes}")


def load_split(pack: str | Path | PackStore, split: str, manifest: Manifest | None = None
               ) -> tuple[SplitInfo, list[np.ndarray]]:
    """Read every class record of a split into memory (label order); ``manifest``: the pack's,
    when the caller has read it already."""
    store = PackStore.of(pack)
    manifest = manifest or store.read_manifest()
    info = split_info(manifest, split)
    shards = check_shard_files(store, manifest, info)
    return info, [images for shard in shards for _, images in read_shard(shard, info)]


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


# ----------------------------------------------------------------------------- batches


def sample_images(counts: np.ndarray, per_class: int, generator: torch.Generator) -> np.ndarray:
    """For each class (``counts[i]`` images), ``per_class`` distinct image indices, uniformly:
    ``[len(counts), per_class]``. One sort of random keys for all classes at once."""
    keys = torch.rand(len(counts), int(counts.max()), generator=generator)
    keys.masked_fill_(torch.arange(keys.shape[1]) >= torch.as_tensor(counts)[:, None], 2.0)
    return keys.argsort(1)[:, :per_class].numpy()


class TaskImages:
    """The uint8 images of ``tasks`` tasks, gathered straight into one array that holds every
    support image (task-major, then class, then shot) and then every query image, so that after
    one float conversion and one vectorised transform, support and query are views of one tensor.
    """

    def __init__(self, tasks: int, n_way: int, n_shot: int, n_query: int,
                 image_shape: tuple[int, int, int]) -> None:
        self.tasks, self.n_way, self.n_shot, self.n_query = tasks, n_way, n_shot, n_query
        rows = tasks * n_way
        self.images = np.empty((rows * (n_shot + n_query), *image_shape), dtype=np.uint8)
        self.support = self.images[:rows * n_shot].reshape(rows, n_shot, *image_shape)
        self.query = self.images[rows * n_shot:].reshape(rows, n_query, *image_shape)

    def put(self, task: int, classes: list[np.ndarray], picks: np.ndarray) -> None:
        """Task ``task``: label i = ``classes[i]``, its images ``picks[i]`` (first K support)."""
        for i, (images, pick) in enumerate(zip(classes, picks, strict=True)):
            row = task * self.n_way + i
            np.take(images, pick[:self.n_shot], axis=0, out=self.support[row])
            np.take(images, pick[self.n_shot:], axis=0, out=self.query[row])

    def to_batch(self, transform: Transform,
                 generators: list[torch.Generator] | None = None) -> TaskBatch:
        """Float 0..1, transformed, as a TaskBatch (label i = the i-th class of each task).

        ``generators``: one per task, so that a task's augmentation depends on that task alone;
        None for a transform that draws nothing (one call for the whole batch).
        """
        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)
        t, n, k, q = self.tasks, self.n_way, self.n_shot, self.n_query
        if generators is None:
            x = transform(x, torch.Generator())
        else:
            support, query = x[:t * n * k], x[t * n * k:]
            parts = [transform(torch.cat([support[i * n * k:(i + 1) * n * k],
                                          query[i * n * q:(i + 1) * n * q]]), generators[i])
                     for i in range(t)]
            x = torch.cat([p[:n * k] for p in parts] + [p[n * k:] for p in parts])
        labels = torch.arange(n)
        return TaskBatch(support_x=x[:t * n * k].view(t, n * k, *x.shape[1:]),
                         support_y=labels.repeat_interleave(k).expand(t, -1).contiguous(),
                         query_x=x[t * n * k:].view(t, n * q, *x.shape[1:]),
                         query_y=labels.repeat_interleave(q).expand(t, -1).contiguous(),
                         n_way=n)


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
        if self.fits and self._resident is None:
            self._resident = [images for shard in self.shards
                              for _, images in read_shard(shard, self.info)]

    def __iter__(self) -> Iterator[TaskBatch]:
        worker = get_worker_info()
        return self.batches(worker.id if worker else 0, worker.num_workers if worker else 1)

    def batches(self, worker: int, num_workers: int) -> Iterator[TaskBatch]:
        """The meta-batches ``worker, worker + num_workers, ...`` of this rank's epoch."""
        epoch = self.epoch
        if self.fits:
            self.preload()
            source: ResidentClasses | StreamBuffer = ResidentClasses(self._resident)
        else:
            order = _generator(_STREAM, self.seed, self.rank, worker, epoch)
            source = StreamBuffer(stream_classes(self.shards, self.info, order), self.budget)
        per_class = self.n_shot + self.n_query
        for b in range(worker, len(self), num_workers):
            indices = self.task_batches[b]
            images = TaskImages(len(indices), self.n_way, self.n_shot, self.n_query,
                                self.info.image_shape)
            for task, index in enumerate(indices):
                generator = _generator(_SAMPLE, self.seed, epoch, index)
                classes = source.draw(self.n_way, generator)
                counts = np.array([len(c) for c in classes])
                images.put(task, classes, sample_images(counts, per_class, generator))
                source.advance()  # after the copy: an evicted class is never held past its turn
            augment = None if self.augment in (None, "none") else [
                _generator(_AUGMENT, self.seed, epoch, index) for index in indices]
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


# ----------------------------------------------------------------------------- evaluation


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
            derive_seed(_EVAL, seed, split_key(split), repeat, e)))
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
