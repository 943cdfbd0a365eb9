"""Your own data: a folder of class folders, split by a split file or a ratio rule."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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
    dir_tree,
    image_spec,
    require,
)
from hmaml.errors import HmamlError


def parse_split_file(path: Path) -> dict[str, list[str]]:
    """``split<TAB or comma>class`` lines -> {split: [class, ...]} in file order."""
    result: dict[str, list[str]] = {}
    seen: set[str] = set()
    for lineno, raw in enumerate(require(path, "split file").read_text().splitlines(), 1):
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


def folder_source(src: Path, workdir: Path | None = None, *, split_file: str | None = None,
                  split_rule: str | None = None, seed: int = 0, size: int = NATURAL_SIZE,
                  channels: int = 3, store_size: int | None = None) -> Source:
    """A folder of class folders; the split comes from a split file or a ratio rule. RGB
    folders get the natural pipeline, grey ones the characters pipeline."""
    root = require(src, "dataset folder")
    if not root.is_dir():
        raise HmamlError(f"{root}: expected a folder of class folders")
    if (split_file is None) == (split_rule is None):
        raise HmamlError("dataset 'folder' needs exactly one of --split-file or --split-rule")
    if channels not in (1, 3) or size < 1:
        raise HmamlError(f"size={size}, channels={channels}: channels must be 1 or 3, size > 0")
    image = image_spec(size, channels, "natural" if channels == 3 else "characters", store_size)
    tree = {key[0]: files for key, files in dir_tree(root, 1).items()}
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


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split-file", help="lines 'split<TAB or comma>class'")
    parser.add_argument("--split-rule", help="e.g. ratio:0.6,0.2,0.2 over sorted classes")
    parser.add_argument("--seed", type=int, help="shuffle seed of --split-rule (default 0)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 84)")
    parser.add_argument("--channels", type=int, choices=(1, 3),
                        help="1 grey (characters pipeline) or 3 RGB (natural pipeline)")
    add_store_size(parser)


SPEC = DatasetSpec(
    "folder", "a folder of class folders (your own data)", folder_source,
    options=("split_file", "split_rule", "seed", "size", "channels", "store_size"),
    add_options=_add_options)
