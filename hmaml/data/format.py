"""The on-disk contract between packing and streaming: one WebDataset sample per class.

A pack is a folder holding ``manifest.json`` and ``{split}-{i:06d}.tar`` shards. Each sample in a
shard is one class: ``cls.json`` (split-local label, class name, image count) and ``images.npy``
(uint8 array ``[n, S, S, C]`` at the stored size ``S``: the model's input size for characters,
larger for natural images so that random crops are taken from real pixels). One record per class, as
Meta-Dataset does, because an episode needs K+Q images of each of N classes: a class record is one
sequential read and a zero-cost decode, and the streaming sampler never has to regroup a shuffled
image stream into per-class buffers.

Each record carries a CRC32 of its ``images.npy`` bytes in ``cls.json`` (``crc32``), checked by
every reader of the record (:func:`hmaml.data.split.read_shard`): a damaged byte anywhere in the
images fails the read naming the shard and the class, for about 1 % of the loader's time, while
the shard's sha256 in the manifest is checked only by ``hmaml pack verify --full`` and the cache.
Packs made before the checksum (no ``crc32``) still load.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from hmaml.errors import HmamlError

#: 2: the manifest's ``image`` names the stored size and the pipeline (version 1 stored natural
#: images at the model's input size, so crops were upsampled and nothing was normalised).
PACK_VERSION = 2
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
#: ``characters``: values 0..1, resized to the input size. ``natural``: the CloserLook pipeline
#: (random-resized crop from the stored image in training, resize x 1.15 and centre crop in
#: evaluation) and ImageNet mean/std normalisation.
PIPELINES = ("characters", "natural")


def split_parts(split: str) -> list[str]:
    """The pack splits named by ``split``: one name, or a union such as ``train+val+test``
    (mini-ImageNet -> CUB trains on all 100 mini-ImageNet classes)."""
    return split.split("+")


@dataclass(frozen=True)
class ImageSpec:
    """A pack's images: the model's input side ``size``, ``channels``, the side they are stored
    at (``stored_size`` >= ``size``) and the preprocessing ``pipeline`` they get."""

    size: int
    channels: int
    stored_size: int
    pipeline: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ClassInfo:
    """One class of a split: its split-local label, name and image count."""

    label: int
    name: str
    count: int


@dataclass(frozen=True)
class ShardEntry:
    """One shard file of a split: the classes (records) and images it holds, its size, sha256."""

    file: str
    sha256: str
    classes: int
    images: int
    bytes: int


@dataclass(frozen=True)
class SplitManifest:
    """A split's classes in label order and the shards that hold them in that order."""

    classes: tuple[ClassInfo, ...]
    shards: tuple[ShardEntry, ...]


@dataclass(frozen=True)
class Manifest:
    """A pack's manifest, read once and checked: what every consumer of a pack reads (``data``
    keeps the whole JSON document, e.g. its ``sources`` and ``options``)."""

    dataset: str
    image: ImageSpec
    splits: dict[str, SplitManifest]
    fingerprint: str
    data: dict[str, Any]
    sha256: str = ""  # of the manifest file's bytes as read (recorded with each run)

    @classmethod
    def parse(cls, data: dict[str, Any], where: str = MANIFEST_NAME,
              sha256: str = "") -> Manifest:
        """The typed manifest of a JSON document (version already checked); a missing or
        malformed entry is one line naming ``where`` and the entry."""
        try:
            splits = {name: SplitManifest(
                tuple(ClassInfo(int(c["label"]), str(c["name"]), int(c["count"]))
                      for c in split["classes"]),
                tuple(ShardEntry(str(s["file"]), str(s["sha256"]), int(s["classes"]),
                                 int(s["images"]), int(s["bytes"])) for s in split["shards"]))
                for name, split in data["splits"].items()}
            image = data["image"]
            spec = ImageSpec(int(image["size"]), int(image["channels"]),
                             int(image["stored_size"]), str(image["pipeline"]))
            return cls(str(data["dataset"]), spec, splits, str(data.get("fingerprint", "")),
                       data, sha256)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HmamlError(f"{where}: malformed manifest ({type(exc).__name__}: {exc}); "
                             "re-pack the dataset") from None

    def split_classes(self, split: str) -> int:
        """Classes in ``split`` (a union: the sum of its parts); a missing part is an error."""
        for part in split_parts(split):
            if part not in self.splits:
                raise HmamlError(f"split {part!r} is not in the pack (it has: "
                                 f"{', '.join(sorted(self.splits)) or 'none'})")
        return sum(len(self.splits[part].classes) for part in split_parts(split))


def shard_name(split: str, index: int) -> str:
    """File name of the ``index``-th shard of ``split``."""
    return f"{split}-{index:06d}.tar"


def encode_class_record(label: int, name: str, images: np.ndarray) -> dict[str, Any]:
    """Build the WebDataset sample of one class (``images``: uint8 ``[n, H, W, C]``)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"class {name!r}: images must be uint8 [n, H, W, C], got "
                         f"{images.dtype} {tuple(images.shape)}")
    buf = io.BytesIO()
    np.save(buf, images, allow_pickle=False)
    data = buf.getvalue()
    meta = {"label": int(label), "name": name, "count": int(images.shape[0]),
            "crc32": zlib.crc32(data)}
    return {"__key__": f"{label:06d}", "cls.json": json.dumps(meta).encode(), "images.npy": data}


class DamagedRecord(ValueError):
    """A class record whose images do not match the CRC32 its ``cls.json`` records."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the images of class {name!r} fail their checksum")
        self.name = name


def decode_class_record(sample: dict[str, Any]) -> tuple[int, str, np.ndarray]:
    """Inverse of :func:`encode_class_record` on a raw (undecoded) WebDataset sample; raises
    :class:`DamagedRecord` when the images fail the record's checksum (a record of a pack made
    before checksums, without ``crc32``, is decoded unchecked)."""
    meta = json.loads(sample["cls.json"])
    data = sample["images.npy"]
    stored = meta.get("crc32")
    if stored is not None and zlib.crc32(data) != int(stored):
        raise DamagedRecord(str(meta.get("name")))
    images = np.load(io.BytesIO(data), allow_pickle=False)
    return int(meta["label"]), str(meta["name"]), images


def has_checksum(sample: dict[str, Any]) -> bool:
    """Whether a raw sample's ``cls.json`` records a checksum (packs since record checksums)."""
    return b'"crc32"' in sample["cls.json"]


def sha256_stream(handle: IO[bytes], chunk: int = 1 << 20) -> str:
    """Hex sha256 of what a binary stream holds from where it stands, read in chunks."""
    digest = hashlib.sha256()
    while block := handle.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return sha256_stream(handle, chunk)
