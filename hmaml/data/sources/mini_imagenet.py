"""mini-ImageNet: the Ravi & Larochelle csv splits over a folder of images."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from hmaml.data.format import SPLITS
from hmaml.data.sources.base import (
    NATURAL_SIZE,
    ClassEntry,
    DatasetSpec,
    ImageLoader,
    ImageRef,
    Source,
    SourceInput,
    add_store_size,
    image_spec,
    require,
)
from hmaml.errors import HmamlError


def read_ravi_csv(path: Path) -> list[tuple[str, list[str]]]:
    """A Ravi & Larochelle ``filename,label`` csv -> [(label, [filename, ...])] in file order."""
    classes: dict[str, list[str]] = {}
    with open(require(path, "mini-ImageNet split csv"), newline="") as handle:
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


def mini_imagenet_source(src: Path, workdir: Path | None = None, *, split_dir: str | None = None,
                         store_size: int | None = None) -> Source:
    """mini-ImageNet: Ravi csvs (``split_dir``, default ``src``) + a flat or ``images/`` folder."""
    root = require(src, "mini-ImageNet folder")
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


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split-dir",
                        help="folder with train/val/test.csv, e.g. where `hmaml pack download "
                             "mini-splits` put them (default: --src)")
    add_store_size(parser)


SPEC = DatasetSpec(
    "mini-imagenet", "mini-ImageNet images + Ravi & Larochelle csv splits", mini_imagenet_source,
    options=("split_dir", "store_size"), add_options=_add_options)
