"""A split of a pack as the episode samplers read it: its classes and shards checked against the
manifest, its class records read shard by shard, and tasks' images gathered into one batch.

Both samplers build on this: the training stream (:mod:`hmaml.data.stream`) and the fixed
evaluation lists (:mod:`hmaml.data.eval_lists`). Every random choice either makes comes from a
generator derived from integer keys led by a tag (:data:`TAG_SAMPLE`, ...), one per purpose, so
that no two purposes ever share a stream.

Shards are read with WebDataset's tar iterators under our own shard ordering rather than through
``wds.WebDataset``'s node and worker splitters: those split *shards* between workers (the class
partitioning the stream avoids) and fail when workers outnumber shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander

from hmaml.data.format import (
    DamagedRecord,
    ImageSpec,
    Manifest,
    ShardEntry,
    decode_class_record,
    has_checksum,
    split_parts,
)
from hmaml.data.store import PackStore, RemotePolicy, open_location
from hmaml.data.transforms import Transform
from hmaml.errors import HmamlError
from hmaml.log import LOGGER
from hmaml.tasks import TaskBatch

# seed-sequence tags: a random stream per purpose (pre-training's augmentation takes 5)
TAG_SAMPLE, TAG_AUGMENT, TAG_EVAL, TAG_STREAM = 1, 2, 3, 4


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys; distinct keys give statistically independent streams."""
    words = [int(k) & (2**64 - 1) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``keys``."""
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
    checked = []
    for shard in info.shards:
        assert shard.entry is not None  # split_info gives every shard its manifest entry
        checked.append(dataclasses.replace(shard, path=store.check_shard(shard.entry, manifest),
                                           policy=store.policy))
    return checked


# ----------------------------------------------------------------------------- shard reading


_NOTED: set[str] = set()  # packs without record checksums, noted once per process


def pack_of(shard: ShardInfo) -> str:
    """The pack a shard belongs to (its folder or URL)."""
    return str(shard.path).rsplit("/", 1)[0]


def note_unchecked(pack: str) -> None:
    """Say once per process that ``pack`` predates record checksums (it still loads)."""
    if pack not in _NOTED:
        _NOTED.add(pack)
        LOGGER.info(f"note: {pack} was packed without record checksums (an earlier hmaml): a "
                    "damaged byte in it is caught only by `hmaml pack verify --full`; re-pack it "
                    "(--force) to have every read checked")


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
                try:
                    own, name, images = decode_class_record(sample)
                except DamagedRecord as exc:
                    raise HmamlError(f"{shard.path}: the images of class {exc.name!r} (record "
                                     f"{sample['__key__']!r}) fail their checksum: this shard "
                                     f"of the pack {pack_of(shard)} is damaged; fetch or re-pack "
                                     "it (hmaml pack verify --full checks the whole pack)"
                                     ) from None
                if not has_checksum(sample):
                    note_unchecked(pack_of(shard))
                label = shard.base + own
                if label != expected or expected >= end:
                    want = expected - shard.base if expected < end else "none"
                    raise HmamlError(f"{shard.path}: record {sample['__key__']!r} has label "
                                     f"{own}, expected {want} per the manifest")
                shape = (int(info.counts[label]), *info.image_shape)
                if images.dtype != np.uint8 or images.shape != shape or name != info.names[label]:
                    raise HmamlError(f"{shard.path}: class {name!r} holds {images.dtype} "
                                     f"{tuple(images.shape)}, the manifest says "
                                     f"{info.names[label]!r} uint8 {shape}")
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
