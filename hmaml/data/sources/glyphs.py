"""The synthetic glyphs as a dataset: generated (no ``--src``) by :mod:`hmaml.data.glyphs`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hmaml.data.format import SPLITS
from hmaml.data.glyphs import GLYPH_SIZE, GLYPH_VERSION, GlyphLoader, glyph_classes
from hmaml.data.sources.base import ClassEntry, DatasetSpec, Source, image_spec
from hmaml.errors import HmamlError


def glyph_source(src: None = None, workdir: Path | None = None, *,
                 classes: Sequence[int] = (1000, 200, 200), per_class: int = 20,
                 seed: int = 0) -> Source:
    """Synthetic Omniglot-like characters; no files needed."""
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


def _class_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected train,val,test counts, got {text!r}") from exc


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=_class_counts,
                        help="train,val,test class counts (default 1000,200,200)")
    parser.add_argument("--per-class", type=int, help="images per class (default 20)")
    parser.add_argument("--seed", type=int, help="generator seed (default 0)")


SPEC = DatasetSpec(
    "glyphs", "synthetic Omniglot-like characters (no download)", glyph_source,
    options=("classes", "per_class", "seed"), add_options=_add_options, needs_src=False)
