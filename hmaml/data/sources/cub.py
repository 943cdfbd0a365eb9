"""CUB-200-2011 with the CloserLook class split, from its ``.tgz`` or its unpacked folder."""

from __future__ import annotations

import re
from pathlib import Path

from hmaml.data.download import safe_extract
from hmaml.data.sources.base import (
    NATURAL_SIZE,
    ClassEntry,
    DatasetSpec,
    ImageLoader,
    ImageRef,
    Source,
    SourceInput,
    add_store_size,
    class_dirs,
    dir_tree,
    image_spec,
    require,
)
from hmaml.errors import HmamlError


def _find_cub_images(path: Path, workdir: Path | None) -> tuple[Path, SourceInput | None]:
    """The ``images`` folder of CUB (extracting a ``.tgz`` into ``workdir`` first)."""
    if path.is_file() and path.name.endswith((".tgz", ".tar.gz")):
        if workdir is None:
            raise HmamlError(f"{path}: a scratch folder is needed to extract the archive")
        safe_extract(path, workdir, members=lambda name: "/images/" in f"/{name}")
        found = sorted(workdir.glob("**/images"))
        if not found:
            raise HmamlError(f"{path}: no CUB_200_2011/images/ folder inside the archive")
        return found[0], SourceInput(path.name, path)
    for candidate in (path / "CUB_200_2011" / "images", path / "images", path):
        if candidate.is_dir() and any(re.fullmatch(r"\d{3}\..+", d.name)
                                      for d in class_dirs(candidate)):
            return candidate, None
    for archive in (path / "CUB_200_2011.tgz",):
        if archive.is_file():
            return _find_cub_images(archive, workdir)
    raise HmamlError(f"{path}: no CUB_200_2011/images/<NNN.name>/ folders (nor "
                     "CUB_200_2011.tgz) found")


def cub_source(src: Path, workdir: Path | None = None, *,
               store_size: int | None = None) -> Source:
    """CUB-200-2011: sorted class folders; i%2==0 train, i%4==1 val, i%4==3 test (100/50/50)."""
    images, archive_input = _find_cub_images(require(src, "CUB source"), workdir)
    tree = dir_tree(images, 1)
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


SPEC = DatasetSpec(
    "cub", "CUB-200-2011 (CUB_200_2011.tgz or its unpacked folder)", cub_source,
    options=("store_size",), add_options=add_store_size)
