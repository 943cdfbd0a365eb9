"""Readers of raw few-shot datasets, one module each, and the registry built from their specs.

Each dataset module declares a :class:`DatasetSpec` (its reader, help text and CLI options);
:data:`SPECS` lists them in the order ``hmaml pack`` shows them, so adding a dataset is one new
module plus one line here. The shared types and helpers live in :mod:`.base`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hmaml.data.sources import cub, emnist, folder, glyphs, mini_imagenet, omniglot
from hmaml.data.sources.base import (
    ClassEntry,
    DatasetSpec,
    ImageLoader,
    ImageRef,
    Source,
    SourceInput,
    check_options,
    enforce_min_images,
)
from hmaml.data.sources.folder import split_by_ratio
from hmaml.data.sources.mini_imagenet import read_ravi_csv
from hmaml.errors import HmamlError

__all__ = ["DATASETS", "SPECS", "ClassEntry", "DatasetSpec", "ImageLoader", "ImageRef", "Source",
           "SourceInput", "open_source", "read_ravi_csv", "split_by_ratio"]

SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    folder.SPEC, omniglot.SPEC, omniglot.NOLATIN_SPEC, emnist.SPEC, cub.SPEC, mini_imagenet.SPEC,
    glyphs.SPEC)}
DATASETS = tuple(SPECS)


def open_source(dataset: str, src: str | Path | None, *, workdir: Path | None = None,
                min_images: int = 2, drop_small: bool = False, **options: Any) -> Source:
    """List a dataset's classes per split (no image decoded); ``options`` are per dataset.

    Classes with fewer than ``min_images`` images are refused, or dropped and listed in
    ``Source.dropped`` with ``drop_small``.
    """
    spec = SPECS.get(dataset)
    if spec is None:
        raise HmamlError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
    options = {k: v for k, v in options.items() if v is not None}
    check_options(dataset, options, spec.options)
    if src is not None and not spec.needs_src:
        raise HmamlError(f"dataset {dataset!r} is generated, it takes no --src (got {src})")
    if src is None and spec.needs_src:
        raise HmamlError(f"dataset {dataset!r} needs --src (the raw data)")
    source = spec.open(None if src is None else Path(src).expanduser(), workdir, **options)
    source.splits, source.dropped = enforce_min_images(source.splits, min_images, drop_small)
    source.options.update(min_images=min_images, drop_small=drop_small)
    return source
