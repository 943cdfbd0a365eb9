"""What every dataset reader shares: the listing types, image decoding, tree walks, checks.

A :class:`Source` lists, for each split, its classes in label order (name + image references) and
holds a picklable ``loader`` that turns one class's references into uint8 ``[n, S, S, C]`` at the
stored size: 28 px grey for the character sets (dark strokes on white, as Omniglot is drawn), the
model's input size; RGB natural images for an 84 px input are stored at 126 px by default
(``store_size``), the whole frame resized to a square as the CloserLook evaluation resize does, so
that training crops come from real pixels rather than upsampled ones. Listing never decodes an
image, so class counts are cheap and every missing file, missing split or too-small class is
reported before any work starts.

Image references are file paths or zip members (:class:`ImageRef`); a ``.tgz`` (CUB) is extracted
safely into a scratch folder first, since a gzip stream has no random access.
"""

from __future__ import annotations

import argparse
import io
import os
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from hmaml.data.format import ImageSpec
from hmaml.errors import HmamlError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CHAR_SIZE, NATURAL_SIZE = 28, 84
#: Natural images are stored at this multiple of the input size by default (126 px for 84):
#: above the evaluation resize (x 1.15), and random crops of a third of the area or more are
#: not upsampled.
NATURAL_STORE_SCALE = 1.5


class ImageRef(NamedTuple):
    """One image: a file (``archive == ""``) or a member of a zip; rotated CCW by ``rotation``."""

    archive: str
    member: str
    rotation: int = 0

    def describe(self) -> str:
        return f"{self.archive} (member {self.member})" if self.archive else self.member


@dataclass(frozen=True)
class ClassEntry:
    """A class: its name (unique within the pack) and its image references, in order."""

    name: str
    refs: tuple[Any, ...]


@dataclass(frozen=True)
class SourceInput:
    """A file or tree whose content identifies the data (hashed into the pack's fingerprint).

    ``files`` lists the files of a tree that the pack reads (``None``: ``path`` is one file).
    """

    name: str
    path: Path
    files: tuple[Path, ...] | None = None


@dataclass
class Source:
    """What a dataset reader yields: classes per split + a loader of one class's images."""

    dataset: str
    image: ImageSpec
    splits: dict[str, list[ClassEntry]]
    loader: Callable[[tuple[Any, ...]], np.ndarray]
    inputs: list[SourceInput]
    options: dict[str, Any]
    dropped: list[str] = field(default_factory=list)


def _no_options(parser: argparse.ArgumentParser) -> None:
    """The CLI flags of a dataset that has none of its own."""


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset as the registry and ``hmaml pack`` know it, declared beside its reader.

    ``open(src, workdir, **options)`` lists the dataset: ``src`` is the raw data (``None`` where
    ``needs_src`` is false: the data is generated), ``workdir`` a scratch folder for readers
    that must extract an archive first. ``options`` names the keyword options ``open`` accepts
    (others are refused before it runs); ``add_options`` adds their CLI flags to the dataset's
    ``pack`` sub-command.
    """

    name: str
    help: str
    open: Callable[..., Source]
    options: tuple[str, ...] = ()
    add_options: Callable[[argparse.ArgumentParser], None] = _no_options
    needs_src: bool = True


def add_store_size(parser: argparse.ArgumentParser) -> None:
    """The ``--store-size`` flag of the RGB datasets (one help text for all of them)."""
    parser.add_argument("--store-size", type=int,
                        help="side the RGB images are stored at, >= the input size (default "
                             "1.5 x the input size: 126 px for 84), so training crops come "
                             "from real pixels")


# ----------------------------------------------------------------------------- image decoding

_ZIP_CACHE: dict[tuple[int, str], zipfile.ZipFile] = {}


def _open_zip(path: str) -> zipfile.ZipFile:
    """A zip handle per process (a forked child must not share its parent's file offset)."""
    key = (os.getpid(), path)
    if key not in _ZIP_CACHE:
        _ZIP_CACHE[key] = zipfile.ZipFile(path)
    return _ZIP_CACHE[key]


@dataclass(frozen=True)
class ImageLoader:
    """Decodes a class's :class:`ImageRef` list to uint8 ``[n, size, size, channels]``.

    Grey images are resized with LANCZOS, RGB ones with an antialiased BILINEAR filter after a
    JPEG draft decode (a DCT-domain downscale that keeps at least ``size`` pixels): both are
    deterministic. ``invert`` turns white-on-black characters (EMNIST) into dark-on-white.
    """

    size: int
    channels: int
    invert: bool = False

    def __call__(self, refs: Sequence[ImageRef]) -> np.ndarray:
        return np.stack([self.load(ref) for ref in refs])

    def load(self, ref: ImageRef) -> np.ndarray:
        try:
            if ref.archive:
                with _open_zip(ref.archive).open(ref.member) as handle:
                    data = handle.read()
            else:
                data = Path(ref.member).read_bytes()
        except FileNotFoundError as exc:
            raise HmamlError(f"{ref.describe()}: image file not found") from exc
        except (KeyError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise HmamlError(f"{ref.describe()}: cannot read ({exc})") from exc
        try:
            with Image.open(io.BytesIO(data)) as img:
                return self.convert(img, ref.rotation)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise HmamlError(f"{ref.describe()}: corrupt or unreadable image ({exc})") from exc

    def convert(self, img: Image.Image, rotation: int = 0) -> np.ndarray:
        """One opened (not yet loaded: JPEG draft decoding) image as the pack stores it."""
        mode = "L" if self.channels == 1 else "RGB"
        target = (self.size, self.size)
        if img.format == "JPEG":
            img.draft(mode, target)
        img = img.convert(mode)
        if img.size != target:
            resample = Image.Resampling.LANCZOS if mode == "L" else Image.Resampling.BILINEAR
            img = img.resize(target, resample, reducing_gap=None)
        arr = np.asarray(img, dtype=np.uint8)
        if self.invert:
            arr = 255 - arr
        if rotation:
            arr = np.rot90(arr, k=rotation // 90)
        arr = np.ascontiguousarray(arr)
        return arr[..., None] if arr.ndim == 2 else arr


# ----------------------------------------------------------------------------- helpers

def image_spec(size: int, channels: int, pipeline: str,
               store_size: int | None = None) -> ImageSpec:
    """The pack's image spec: characters are stored at the input size; natural images at
    ``store_size`` (default :data:`NATURAL_STORE_SCALE` x ``size``), never below ``size``."""
    if pipeline == "characters":
        stored = store_size or size
    else:
        stored = store_size or round(size * NATURAL_STORE_SCALE)
    if stored < size:
        raise HmamlError(f"store_size={stored} is below the input size {size}: crops would be "
                         "upsampled; choose at least the input size")
    return ImageSpec(size, channels, stored, pipeline)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def require(path: Path, what: str) -> Path:
    """``path``, or an error naming ``what`` is missing (before any listing starts)."""
    if not path.exists():
        raise HmamlError(f"{path}: {what} not found")
    return path


def class_dirs(root: Path) -> list[Path]:
    """The visible sub-folders of ``root``, sorted by name (the label order)."""
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p.name))


def zip_tree(zip_path: Path, depth: int) -> dict[tuple[str, ...], list[str]]:
    """Image members of a zip grouped by their ``depth`` parent folders (after the top one)."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = sorted(n for n in zf.namelist() if not n.endswith("/") and _is_image(n))
    except (zipfile.BadZipFile, OSError) as exc:
        raise HmamlError(f"{zip_path}: not a readable zip archive ({exc})") from exc
    groups: dict[tuple[str, ...], list[str]] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == depth + 2:
            groups.setdefault(tuple(parts[1:-1]), []).append(name)
    return groups


def dir_tree(root: Path, depth: int) -> dict[tuple[str, ...], list[Path]]:
    """Image files of a folder tree grouped by their ``depth`` parent folders."""
    groups: dict[tuple[str, ...], list[Path]] = {}
    level: list[tuple[tuple[str, ...], Path]] = [((), root)]
    for _ in range(depth):
        level = [((*key, d.name), d) for key, p in level for d in class_dirs(p)]
    for key, folder in level:
        files = _image_files(folder)
        if files:
            groups[key] = files
    return groups


def enforce_min_images(splits: dict[str, list[ClassEntry]], min_images: int, drop_small: bool
                       ) -> tuple[dict[str, list[ClassEntry]], list[str]]:
    """Refuse (or, with ``drop_small``, drop and list) classes with fewer than ``min_images``."""
    if min_images < 1:
        raise HmamlError(f"min_images={min_images}: must be at least 1")
    small = [(split, c) for split, classes in splits.items() for c in classes
             if len(c.refs) < min_images]
    if small and not drop_small:
        split, c = small[0]
        more = f" (and {len(small) - 1} more)" if len(small) > 1 else ""
        raise HmamlError(f"class {c.name!r} ({split}) has {len(c.refs)} images, fewer than "
                         f"min_images={min_images}{more}; pass --drop-small to drop such classes")
    dropped = [c.name for _, c in small]
    kept = {s: [c for c in cl if len(c.refs) >= min_images] for s, cl in splits.items()}
    for split, classes in kept.items():
        if not classes:
            raise HmamlError(f"split {split!r} has no class with at least {min_images} images")
    return kept, dropped


def check_options(dataset: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    """Refuse an option the dataset does not take, naming the ones it does."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise HmamlError(f"option {unknown[0]!r} does not apply to dataset {dataset!r} "
                         f"(it takes: {', '.join(sorted(allowed)) or 'no options'})")
