"""Omniglot (background/evaluation or Vinyals splits) and its no-Latin base set for EMNIST."""

from __future__ import annotations

import argparse
import re
from functools import partial
from pathlib import Path
from typing import Any

from hmaml.data.format import SPLITS
from hmaml.data.sources.base import (
    CHAR_SIZE,
    ClassEntry,
    DatasetSpec,
    ImageLoader,
    ImageRef,
    Source,
    SourceInput,
    dir_tree,
    image_spec,
    require,
    zip_tree,
)
from hmaml.errors import HmamlError

_SETS = ("images_background", "images_evaluation")
_ROTATIONS = (0, 90, 180, 270)


def _omniglot_set(root: Path, name: str) -> tuple[dict[str, list[ImageRef]], SourceInput]:
    """Characters ``Alphabet/characterNN`` -> refs of one Omniglot set (zip or unpacked)."""
    zip_path, folder = root / f"{name}.zip", root / name
    if zip_path.is_file():
        archive = str(zip_path.resolve())
        chars = {"/".join(k): [ImageRef(archive, m) for m in v]
                 for k, v in zip_tree(zip_path, 2).items()}
        source_input = SourceInput(zip_path.name, zip_path)
    elif folder.is_dir():
        files = dir_tree(folder, 2)
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


def omniglot_source(src: Path, workdir: Path | None = None, *, split: str = "background",
                    rotations: bool = False, split_dir: str | None = None,
                    no_latin: bool = False) -> Source:
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
    root = require(src, "Omniglot folder")
    sets = [_omniglot_set(root, name) for name in _SETS]
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
            path = require(Path(split_dir) / f"{name}.txt", "Vinyals split file")
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


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", choices=("background", "vinyals"),
                        help="background: train=background set, test=evaluation set "
                             "(default); vinyals: train/val/test lists of --split-dir")
    parser.add_argument("--rotations", action="store_true",
                        help="add 90/180/270-degree rotations as new classes (background)")
    parser.add_argument("--split-dir", help="folder with Vinyals train/val/test.txt")


SPEC = DatasetSpec(
    "omniglot", "Omniglot, images_background + images_evaluation (zips or folders)",
    omniglot_source, options=("split", "rotations", "split_dir"), add_options=_add_options)
NOLATIN_SPEC = DatasetSpec(
    "omniglot-nolatin", "Omniglot without the Latin alphabet, one train split (1597 classes)",
    partial(omniglot_source, no_latin=True))
