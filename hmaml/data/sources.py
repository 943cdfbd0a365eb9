"""Readers of raw few-shot datasets: per split, the ordered classes and their image references.

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

import csv
import io
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from hmaml.data.format import SPLITS, ImageSpec
from hmaml.data.glyphs import GLYPH_SIZE, GLYPH_VERSION, GlyphLoader, glyph_classes
from hmaml.errors import HmamlError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DATASETS = ("folder", "omniglot", "omniglot-nolatin", "emnist", "cub", "mini-imagenet", "glyphs")
CHAR_SIZE, NATURAL_SIZE = 28, 84
#: Natural images are stored at this multiple of the input size by default (126 px for 84):
#: above the evaluation resize (x 1.15), and random crops of a third of the area or more are
#: not upsampled.
NATURAL_STORE_SCALE = 1.5
_ROTATIONS = (0, 90, 180, 270)


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
                return self._convert(img, ref.rotation)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise HmamlError(f"{ref.describe()}: corrupt or unreadable image ({exc})") from exc

    def _convert(self, img: Image.Image, rotation: int) -> np.ndarray:
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


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise HmamlError(f"{path}: {what} not found")
    return path


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p.name))


def _zip_tree(zip_path: Path, depth: int) -> dict[tuple[str, ...], list[str]]:
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


def _dir_tree(root: Path, depth: int) -> dict[tuple[str, ...], list[Path]]:
    """Image files of a folder tree grouped by their ``depth`` parent folders."""
    groups: dict[tuple[str, ...], list[Path]] = {}
    level: list[tuple[tuple[str, ...], Path]] = [((), root)]
    for _ in range(depth):
        level = [((*key, d.name), d) for key, p in level for d in _class_dirs(p)]
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


def _check_options(dataset: str, options: dict[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise HmamlError(f"option {unknown[0]!r} does not apply to dataset {dataset!r} "
                         f"(it takes: {', '.join(sorted(allowed)) or 'no options'})")


# ----------------------------------------------------------------------------- folder of classes

def parse_split_file(path: Path) -> dict[str, list[str]]:
    """``split<TAB or comma>class`` lines -> {split: [class, ...]} in file order."""
    result: dict[str, list[str]] = {}
    seen: set[str] = set()
    for lineno, raw in enumerate(_require(path, "split file").read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\t|,", line, maxsplit=1)
        if len(parts) != 2 or not parts[1].strip():
            raise HmamlError(f"{path}:{lineno}: expected 'split<TAB or comma>class', "
                             f"got {line!r}")
        split, name = parts[0].strip(), parts[1].strip()
        if split not in SPLITS:
            raise HmamlError(f"{path}:{lineno}: unknown split {split!r} (use {', '.join(SPLITS)})")
        if name in seen:
            raise HmamlError(f"{path}:{lineno}: class {name!r} is listed twice")
        seen.add(name)
        result.setdefault(split, []).append(name)
    if not result:
        raise HmamlError(f"{path}: split file lists no class")
    return result


def split_by_ratio(names: Sequence[str], rule: str, seed: int) -> dict[str, list[str]]:
    """``ratio:a,b,c`` -> shuffle the sorted names with ``seed``, cut train/val/test by ratio."""
    match = re.fullmatch(r"ratio:([^,]+),([^,]+),([^,]+)", rule.strip())
    try:
        ratios = np.array([float(x) for x in match.groups()]) if match else None
    except ValueError:
        ratios = None
    if ratios is None or (ratios < 0).any() or abs(ratios.sum() - 1.0) > 1e-6:
        raise HmamlError(f"split rule {rule!r}: expected 'ratio:a,b,c' with a+b+c = 1, "
                         "e.g. ratio:0.6,0.2,0.2")
    order = np.random.default_rng(seed).permutation(len(names))
    ordered = sorted(names)
    shuffled = [ordered[i] for i in order]
    cuts = np.rint(np.cumsum(ratios) * len(names)).astype(int)
    bounds = [0, *cuts[:2].tolist(), len(names)]
    return {split: sorted(shuffled[a:b]) for split, a, b in zip(SPLITS, bounds[:-1], bounds[1:],
                                                                  strict=True)
            if b > a}


def folder_source(src: Path, *, split_file: str | None = None, split_rule: str | None = None,
                  seed: int = 0, size: int = NATURAL_SIZE, channels: int = 3,
                  store_size: int | None = None) -> Source:
    """A folder of class folders; the split comes from a split file or a ratio rule. RGB
    folders get the natural pipeline, grey ones the characters pipeline."""
    root = _require(src, "dataset folder")
    if not root.is_dir():
        raise HmamlError(f"{root}: expected a folder of class folders")
    if (split_file is None) == (split_rule is None):
        raise HmamlError("dataset 'folder' needs exactly one of --split-file or --split-rule")
    if channels not in (1, 3) or size < 1:
        raise HmamlError(f"size={size}, channels={channels}: channels must be 1 or 3, size > 0")
    image = image_spec(size, channels, "natural" if channels == 3 else "characters", store_size)
    tree = {key[0]: files for key, files in _dir_tree(root, 1).items()}
    inputs = []
    if split_file is not None:
        path = Path(split_file)
        assignment = parse_split_file(path)
        inputs.append(SourceInput(path.name, path))
        for names in assignment.values():
            for name in names:
                if name not in tree:
                    raise HmamlError(f"{path}: class {name!r} has no image folder under {root}")
    else:
        if not tree:
            raise HmamlError(f"{root}: no class folder with images")
        assignment = split_by_ratio(list(tree), split_rule or "", seed)
    splits = {s: [ClassEntry(n, tuple(ImageRef("", str(f)) for f in tree[n]))
                  for n in assignment[s]] for s in SPLITS if s in assignment}
    used = tuple(f for classes in splits.values() for c in classes
                 for f in (Path(r.member) for r in c.refs))
    inputs.insert(0, SourceInput(root.name, root, used))
    options = {"split_file": Path(split_file).name if split_file else None,
               "split_rule": split_rule, "seed": seed if split_rule else None,
               "size": size, "channels": channels, "store_size": image.stored_size}
    return Source("folder", image, splits, ImageLoader(image.stored_size, channels), inputs,
                  options)


# ----------------------------------------------------------------------------- Omniglot

_OMNIGLOT_SETS = ("images_background", "images_evaluation")


def _omniglot_set(root: Path, name: str) -> tuple[dict[str, list[ImageRef]], SourceInput]:
    """Characters ``Alphabet/characterNN`` -> refs of one Omniglot set (zip or unpacked)."""
    zip_path, folder = root / f"{name}.zip", root / name
    if zip_path.is_file():
        archive = str(zip_path.resolve())
        chars = {"/".join(k): [ImageRef(archive, m) for m in v]
                 for k, v in _zip_tree(zip_path, 2).items()}
        source_input = SourceInput(zip_path.name, zip_path)
    elif folder.is_dir():
        files = _dir_tree(folder, 2)
        chars = {"/".join(k): [ImageRef("", str(f)) for f in v] for k, v in files.items()}
        source_input = SourceInput(name, folder, tuple(f for v in files.values() for f in v))
    else:
        raise HmamlError(f"{zip_path}: Omniglot set not found (nor an unpacked {folder}); "
                         "run: python launch/pack.py download omniglot --to DIR")
    if not chars:
        raise HmamlError(f"{source_input.path}: no Alphabet/character/*.png images inside")
    return chars, source_input


def _rotated(name: str, refs: list[ImageRef], rotation: int) -> ClassEntry:
    return ClassEntry(f"{name}/rot{rotation:03d}", tuple(r._replace(rotation=rotation)
                                                         for r in refs))


def omniglot_source(src: Path, *, split: str = "background", rotations: bool = False,
                    split_dir: str | None = None, no_latin: bool = False) -> Source:
    """Omniglot from ``images_background``/``images_evaluation`` (zips or folders) in ``src``.

    ``split="background"``: train = the background set (964 characters), test = the evaluation
    set (659); ``rotations`` adds each character rotated by 90/180/270 degrees as new classes.
    ``split="vinyals"``: train/val/test from the ``Alphabet/characterNN/rotDDD`` lists in
    ``split_dir``. ``no_latin``: every character but the Latin alphabet as one train split
    (the Omniglot -> EMNIST base set, 1597 classes).
    """
    if rotations and (split == "vinyals" or no_latin):
        raise HmamlError("--rotations applies to omniglot split 'background' only (the Vinyals "
                         "lists name their rotations; the no-Latin base set has none)")
    root = _require(src, "Omniglot folder")
    sets = [_omniglot_set(root, name) for name in _OMNIGLOT_SETS]
    inputs = [inp for _, inp in sets]
    allchars = {k: v for chars, _ in sets for k, v in chars.items()}
    options: dict[str, Any] = {"split": split, "rotations": rotations}
    if no_latin:
        splits = {"train": [ClassEntry(k, tuple(v)) for k, v in sorted(allchars.items())
                            if k.split("/")[0] != "Latin"]}
        options = {"split": "all-but-latin"}
    elif split == "background":
        rots = _ROTATIONS if rotations else (0,)
        splits = {}
        for name, (chars, _) in zip(("train", "test"), sets, strict=True):
            splits[name] = [_rotated(k, v, r) if rotations else ClassEntry(k, tuple(v))
                            for k, v in sorted(chars.items()) for r in rots]
    elif split == "vinyals":
        if split_dir is None:
            raise HmamlError("omniglot split 'vinyals' needs --split-dir (the folder holding "
                             "train.txt/val.txt/test.txt)")
        splits = {}
        for name in SPLITS:
            path = _require(Path(split_dir) / f"{name}.txt", "Vinyals split file")
            inputs.append(SourceInput(path.name, path))
            splits[name] = [_vinyals_class(path, lineno, line, allchars)
                            for lineno, line in enumerate(path.read_text().splitlines(), 1)
                            if line.strip()]
        options = {"split": split}
    else:
        raise HmamlError(f"omniglot split {split!r}: use 'background' or 'vinyals'")
    return Source("omniglot-nolatin" if no_latin else "omniglot",
                  image_spec(CHAR_SIZE, 1, "characters"), splits,
                  ImageLoader(CHAR_SIZE, 1), inputs, options)


def _vinyals_class(path: Path, lineno: int, line: str, chars: dict[str, list[ImageRef]]
                   ) -> ClassEntry:
    match = re.fullmatch(r"(.+/character\d+)/rot(\d{3})", line.strip())
    if not match or int(match.group(2)) not in _ROTATIONS:
        raise HmamlError(f"{path}:{lineno}: expected 'Alphabet/characterNN/rotDDD', got {line!r}")
    char, rotation = match.group(1), int(match.group(2))
    if char not in chars:
        raise HmamlError(f"{path}:{lineno}: character {char!r} is not in the Omniglot sets")
    return _rotated(char, chars[char], rotation)


# ----------------------------------------------------------------------------- EMNIST

_EMNIST_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def emnist_source(src: Path) -> Source:
    """EMNIST as HyperMAML uses it: ``emnist/<0..61>/<n>.png``, inverted to dark-on-white.

    ``src``: ``emnist.zip``, its unpacked ``emnist`` folder, or a folder holding either.
    Even class ids are the validation split (31 classes), odd ones the test split (31).
    """
    path = _require(src, "EMNIST source")
    if path.is_dir() and (path / "emnist.zip").is_file():
        path = path / "emnist.zip"
    elif path.is_dir() and (path / "emnist").is_dir():
        path = path / "emnist"
    if path.is_file():
        archive = str(path.resolve())
        refs = {k[0]: [ImageRef(archive, m) for m in v] for k, v in _zip_tree(path, 1).items()}
        inputs = [SourceInput(path.name, path)]
    else:
        files = _dir_tree(path, 1)
        refs = {k[0]: [ImageRef("", str(f)) for f in v] for k, v in files.items()}
        inputs = [SourceInput(path.name, path, tuple(f for v in files.values() for f in v))]
    ids = {}
    for key in refs:
        if not key.isdigit() or int(key) >= len(_EMNIST_CHARS):
            raise HmamlError(f"{path}: unexpected EMNIST class folder {key!r} (expected 0..61)")
        ids[int(key)] = key
    if not ids:
        raise HmamlError(f"{path}: no emnist/<class>/<n>.png images inside")

    def entries(parity: int) -> list[ClassEntry]:
        return [ClassEntry(f"{i}_{_EMNIST_CHARS[i]}", tuple(_numeric_order(refs[ids[i]])))
                for i in sorted(ids) if i % 2 == parity]

    splits = {"val": entries(0), "test": entries(1)}
    return Source("emnist", image_spec(CHAR_SIZE, 1, "characters"), splits,
                  ImageLoader(CHAR_SIZE, 1, invert=True), inputs,
                  {"split": "even-val-odd-test", "invert": True})


def _numeric_order(refs: list[ImageRef]) -> list[ImageRef]:
    """Order ``<n>.png`` by n (0, 1, 2, ..., 10) rather than as text."""
    def key(ref: ImageRef) -> tuple[int, str]:
        stem = Path(ref.member).stem
        return (int(stem), "") if stem.isdigit() else (1 << 62, stem)
    return sorted(refs, key=key)


# ----------------------------------------------------------------------------- CUB-200-2011

def _find_cub_images(path: Path, workdir: Path | None) -> tuple[Path, SourceInput | None]:
    """The ``images`` folder of CUB (extracting a ``.tgz`` into ``workdir`` first)."""
    if path.is_file() and path.name.endswith((".tgz", ".tar.gz")):
        from hmaml.data.download import safe_extract

        if workdir is None:
            raise HmamlError(f"{path}: a scratch folder is needed to extract the archive")
        safe_extract(path, workdir, members=lambda name: "/images/" in f"/{name}")
        found = sorted(workdir.glob("**/images"))
        if not found:
            raise HmamlError(f"{path}: no CUB_200_2011/images/ folder inside the archive")
        return found[0], SourceInput(path.name, path)
    for candidate in (path / "CUB_200_2011" / "images", path / "images", path):
        if candidate.is_dir() and any(re.fullmatch(r"\d{3}\..+", d.name)
                                      for d in _class_dirs(candidate)):
            return candidate, None
    for archive in (path / "CUB_200_2011.tgz",):
        if archive.is_file():
            return _find_cub_images(archive, workdir)
    raise HmamlError(f"{path}: no CUB_200_2011/images/<NNN.name>/ folders (nor "
                     "CUB_200_2011.tgz) found")


def cub_source(src: Path, workdir: Path | None = None, *,
               store_size: int | None = None) -> Source:
    """CUB-200-2011: sorted class folders; i%2==0 train, i%4==1 val, i%4==3 test (100/50/50)."""
    images, archive_input = _find_cub_images(_require(src, "CUB source"), workdir)
    tree = _dir_tree(images, 1)
    names = sorted(k[0] for k in tree)
    splits: dict[str, list[ClassEntry]] = {"train": [], "val": [], "test": []}
    for i, name in enumerate(names):
        split = "train" if i % 2 == 0 else ("val" if i % 4 == 1 else "test")
        splits[split].append(ClassEntry(name, tuple(ImageRef("", str(f))
                                                    for f in tree[(name,)])))
    splits = {s: c for s, c in splits.items() if c}
    inputs = [archive_input] if archive_input else [
        SourceInput("CUB_200_2011/images", images, tuple(f for v in tree.values() for f in v))]
    image = image_spec(NATURAL_SIZE, 3, "natural", store_size)
    return Source("cub", image, splits, ImageLoader(image.stored_size, 3), inputs,
                  {"split": "i%2==0 train, i%4==1 val, i%4==3 test",
                   "store_size": image.stored_size})


# ----------------------------------------------------------------------------- mini-ImageNet

def read_ravi_csv(path: Path) -> list[tuple[str, list[str]]]:
    """A Ravi & Larochelle ``filename,label`` csv -> [(label, [filename, ...])] in file order."""
    classes: dict[str, list[str]] = {}
    with open(_require(path, "mini-ImageNet split csv"), newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
            raise HmamlError(f"{path}: expected a 'filename,label' header, got {header!r}")
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != 2:
                raise HmamlError(f"{path}:{lineno}: expected 'filename,label', got {row!r}")
            classes.setdefault(row[1].strip(), []).append(row[0].strip())
    return list(classes.items())


def mini_imagenet_source(src: Path, *, split_dir: str | None = None,
                         store_size: int | None = None) -> Source:
    """mini-ImageNet: Ravi csvs (``split_dir``, default ``src``) + a flat or ``images/`` folder."""
    root = _require(src, "mini-ImageNet folder")
    images = root / "images" if (root / "images").is_dir() else root
    csv_dir = Path(split_dir) if split_dir else root
    splits, inputs, used = {}, [], []
    for split in SPLITS:
        path = csv_dir / f"{split}.csv"
        inputs.append(SourceInput(path.name, path))
        entries = []
        for label, files in read_ravi_csv(path):
            paths = [images / f for f in files]
            for p in paths:
                if not p.is_file():
                    raise HmamlError(f"{p}: image listed in {path} not found")
            used.extend(paths)
            entries.append(ClassEntry(label, tuple(ImageRef("", str(p)) for p in paths)))
        splits[split] = entries
    inputs.insert(0, SourceInput(images.name, images, tuple(used)))
    image = image_spec(NATURAL_SIZE, 3, "natural", store_size)
    return Source("mini-imagenet", image, splits, ImageLoader(image.stored_size, 3), inputs,
                  {"split": "ravi", "store_size": image.stored_size})


# ----------------------------------------------------------------------------- glyphs

def glyph_source(*, classes: Sequence[int] = (1000, 200, 200), per_class: int = 20,
                 seed: int = 0) -> Source:
    """Synthetic Omniglot-like characters (see :mod:`hmaml.data.glyphs`); no files needed."""
    counts = tuple(int(c) for c in classes)
    if len(counts) != 3 or min(counts) < 0 or sum(counts) == 0 or per_class < 1:
        raise HmamlError(f"glyphs: classes={classes!r} per_class={per_class}: need three "
                         "class counts (train, val, test) >= 0 and per_class >= 1")
    splits = {split: [ClassEntry(name, refs) for name, refs in
                      glyph_classes(split, n, per_class, seed)]
              for split, n in zip(SPLITS, counts, strict=True) if n > 0}
    return Source("glyphs", image_spec(GLYPH_SIZE, 1, "characters"), splits, GlyphLoader(), [],
                  {"classes": list(counts), "per_class": per_class, "seed": seed,
                   "generator_version": GLYPH_VERSION})


# ----------------------------------------------------------------------------- registry

_OPTIONS: dict[str, tuple[str, ...]] = {
    "folder": ("split_file", "split_rule", "seed", "size", "channels", "store_size"),
    "omniglot": ("split", "rotations", "split_dir"),
    "omniglot-nolatin": (),
    "emnist": (),
    "cub": ("store_size",),
    "mini-imagenet": ("split_dir", "store_size"),
    "glyphs": ("classes", "per_class", "seed"),
}


def open_source(dataset: str, src: str | Path | None, *, workdir: Path | None = None,
                min_images: int = 2, drop_small: bool = False, **options: Any) -> Source:
    """List a dataset's classes per split (no image decoded); ``options`` are per dataset.

    Classes with fewer than ``min_images`` images are refused, or dropped and listed in
    ``Source.dropped`` with ``drop_small``.
    """
    if dataset not in _OPTIONS:
        raise HmamlError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    options = {k: v for k, v in options.items() if v is not None}
    _check_options(dataset, options, _OPTIONS[dataset])
    if dataset == "glyphs":
        if src is not None:
            raise HmamlError(f"dataset 'glyphs' is generated, it takes no --src (got {src})")
        source = glyph_source(**options)
    else:
        if src is None:
            raise HmamlError(f"dataset {dataset!r} needs --src (the raw data)")
        path = Path(src).expanduser()
        builders: dict[str, Callable[[], Source]] = {
            "folder": lambda: folder_source(path, **options),
            "omniglot": lambda: omniglot_source(path, **options),
            "omniglot-nolatin": lambda: omniglot_source(path, no_latin=True),
            "emnist": lambda: emnist_source(path),
            "cub": lambda: cub_source(path, workdir, **options),
            "mini-imagenet": lambda: mini_imagenet_source(path, **options),
        }
        source = builders[dataset]()
    source.splits, source.dropped = enforce_min_images(source.splits, min_images, drop_small)
    source.options.update(min_images=min_images, drop_small=drop_small)
    return source

