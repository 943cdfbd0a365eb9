"""EMNIST as HyperMAML evaluates on it: the Omniglot -> EMNIST cross-domain target set."""

from __future__ import annotations

from pathlib import Path

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

_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def emnist_source(src: Path, workdir: Path | None = None) -> Source:
    """EMNIST as HyperMAML uses it: ``emnist/<0..61>/<n>.png``, inverted to dark-on-white.

    ``src``: ``emnist.zip``, its unpacked ``emnist`` folder, or a folder holding either.
    Even class ids are the validation split (31 classes), odd ones the test split (31).
    """
    path = require(src, "EMNIST source")
    if path.is_dir() and (path / "emnist.zip").is_file():
        path = path / "emnist.zip"
    elif path.is_dir() and (path / "emnist").is_dir():
        path = path / "emnist"
    if path.is_file():
        archive = str(path.resolve())
        refs = {k[0]: [ImageRef(archive, m) for m in v] for k, v in zip_tree(path, 1).items()}
        inputs = [SourceInput(path.name, path)]
    else:
        files = dir_tree(path, 1)
        refs = {k[0]: [ImageRef("", str(f)) for f in v] for k, v in files.items()}
        inputs = [SourceInput(path.name, path, tuple(f for v in files.values() for f in v))]
    ids = {}
    for key in refs:
        if not key.isdigit() or int(key) >= len(_CHARS):
            raise HmamlError(f"{path}: unexpected EMNIST class folder {key!r} (expected 0..61)")
        ids[int(key)] = key
    if not ids:
        raise HmamlError(f"{path}: no emnist/<class>/<n>.png images inside")

    def entries(parity: int) -> list[ClassEntry]:
        return [ClassEntry(f"{i}_{_CHARS[i]}", tuple(_numeric_order(refs[ids[i]])))
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


SPEC = DatasetSpec(
    "emnist", "EMNIST as HyperMAML uses it (emnist.zip): even ids val, odd ids test",
    emnist_source)
