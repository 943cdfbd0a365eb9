"""Raw dataset -> WebDataset class-record shards + ``manifest.json`` (see :mod:`.format`).

Packing is deterministic (shards in label order, fixed tar metadata: the same input and options
give the same bytes) and atomic (everything is written to a scratch folder beside ``out`` and
renamed into place at the end, so a failure leaves nothing behind). The manifest's fingerprint
covers the pack version, the content of every source file and the options: packing again with an
equal fingerprint is a no-op, and packing over a different pack needs ``force``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from hmaml.data.format import (
    MANIFEST_NAME,
    PACK_VERSION,
    SPLITS,
    Manifest,
    encode_class_record,
    sha256_file,
    shard_name,
)
from hmaml.data.sources import ClassEntry, Source, SourceInput, open_source
from hmaml.data.store import PackStore, read_manifest
from hmaml.errors import HmamlError
from hmaml.files import disk_full, out_of_space
from hmaml.log import show_bars

DEFAULT_SHARD_BYTES = 64 * 2**20
_TAR_OVERHEAD = 3 * 512  # two headers + padding per class record, roughly


def default_workers() -> int:
    """Image decoding processes: at most 2, never more than the CPUs this process may use."""
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


def digest_input(item: SourceInput) -> str:
    """sha256 of a source file, or of a tree: over sorted ``relative path \\0 file sha256``."""
    if item.files is None:
        return sha256_file(item.path)
    digest = hashlib.sha256()
    for path in sorted(item.files):
        rel = path.relative_to(item.path).as_posix()
        digest.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def sources_fingerprint(sources: list[dict[str, str]], options: dict[str, Any]) -> str:
    """What identifies a pack: pack version + source content + options."""
    blob = json.dumps({"pack_version": PACK_VERSION, "sources": [s["sha256"] for s in sources],
                       "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@contextmanager
def _class_images(source: Source, entries: list[ClassEntry], workers: int
                  ) -> Iterator[Iterator[np.ndarray]]:
    """Each entry's images, in order, decoded by ``workers`` processes."""
    refs = (e.refs for e in entries)
    if workers <= 1:
        yield map(source.loader, refs)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield pool.imap(source.loader, refs, chunksize=2)


class _ShardSink:
    """Writes one split's class records into size-bounded, byte-reproducible tar shards."""

    def __init__(self, folder: Path, split: str, shard_bytes: int) -> None:
        self.folder, self.split, self.shard_bytes = folder, split, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None
        self._bytes = self._classes = self._images = 0

    def write(self, record: dict[str, Any], n_images: int) -> None:
        size = sum(len(v) for k, v in record.items() if k != "__key__") + _TAR_OVERHEAD
        if self._writer is not None and self._bytes + size > self.shard_bytes:
            self._close()
        if self._writer is None:
            path = self.folder / shard_name(self.split, len(self.shards))
            self._writer = wds.TarWriter(str(path), user="hmaml", group="hmaml", mtime=0,
                                         encoder=False)
        self._writer.write(record)
        self._bytes += size
        self._classes += 1
        self._images += n_images

    def _close(self) -> None:
        assert self._writer is not None
        self._writer.close()
        path = self.folder / shard_name(self.split, len(self.shards))
        self.shards.append({"file": path.name, "sha256": sha256_file(path),
                            "classes": self._classes, "images": self._images,
                            "bytes": path.stat().st_size})
        self._writer = None
        self._bytes = self._classes = self._images = 0

    def finish(self) -> list[dict[str, Any]]:
        if self._writer is not None:
            self._close()
        return self.shards

    def abandon(self) -> None:
        """Close an open shard after a failure (its folder is about to be deleted)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _write_shards(source: Source, folder: Path, shard_bytes: int, workers: int,
                  progress: bool) -> dict[str, Any]:
    """Decode every class and write the splits' shards; returns the manifest's ``splits``."""
    order = [(split, label, entry) for split in SPLITS if split in source.splits
             for label, entry in enumerate(source.splits[split])]
    total = sum(len(entry.refs) for _, _, entry in order)
    image = source.image
    shape = (image.stored_size, image.stored_size, image.channels)
    splits: dict[str, Any] = {}
    sinks: dict[str, _ShardSink] = {}
    try:
        with _class_images(source, [e for _, _, e in order], workers) as results, \
                tqdm(total=total, unit="img", desc=f"pack {source.dataset}",
                     disable=not show_bars(progress), file=sys.stderr) as bar:
            for (split, label, entry), images in zip(order, results, strict=True):
                if images.dtype != np.uint8 or images.shape[1:] != shape:
                    raise HmamlError(f"class {entry.name!r}: decoded to {images.dtype} "
                                     f"{images.shape[1:]}, expected uint8 {shape}")
                if split not in sinks:
                    sinks[split] = _ShardSink(folder, split, shard_bytes)
                    splits[split] = {"classes": [], "shards": []}
                sinks[split].write(encode_class_record(label, entry.name, images), len(images))
                splits[split]["classes"].append({"label": label, "name": entry.name,
                                                 "count": len(images)})
                bar.update(len(images))
        for split, sink in sinks.items():
            splits[split]["shards"] = sink.finish()
    finally:
        for sink in sinks.values():
            sink.abandon()
    return splits


def _check_target(out: Path, fp: str, force: bool) -> dict[str, Any] | None:
    """The existing pack at ``out`` when it has fingerprint ``fp`` (a no-op re-pack)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise HmamlError(f"{out}: exists and is not a folder")
    if (out / MANIFEST_NAME).is_file():
        try:
            old = read_manifest(out)
        except HmamlError:
            old = None
        if old is not None and old.fingerprint == fp and not force:
            try:
                verify_pack(out)
            except HmamlError as exc:
                raise HmamlError(f"{exc}; pass --force to pack again") from exc
            return old.data
        if not force:
            what = f"a pack of {old.dataset!r}" if old else "an unreadable pack"
            raise HmamlError(f"{out}: holds {what} made from other sources or options; "
                             "pass --force to replace it")
    elif any(out.iterdir()) and not force:
        raise HmamlError(f"{out}: exists, is not empty and has no {MANIFEST_NAME}; "
                         "pass --force to replace it")
    return None


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` folder to ``out``, replacing (and deleting) an old one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def pack_dataset(dataset: str, src: str | Path | None, out: str | Path, *, force: bool = False,
                 workers: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                 min_images: int = 2, drop_small: bool = False, progress: bool = True,
                 **options: Any) -> dict[str, Any]:
    """Pack ``dataset`` read from ``src`` into the folder ``out``; returns the manifest.

    ``options`` are the dataset's own (see :func:`hmaml.data.sources.open_source`). Classes with
    fewer than ``min_images`` images are refused, or dropped (and listed in the manifest's
    ``dropped``) with ``drop_small``. ``shard_bytes`` is the target shard size; a split always
    has at least one shard and a class record is never split across shards.
    """
    out = Path(out).expanduser()
    workers = default_workers() if workers is None else int(workers)
    if workers < 1 or shard_bytes < 1:
        raise HmamlError(f"workers={workers}, shard_bytes={shard_bytes}: both must be >= 1")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        source = open_source(dataset, src, workdir=scratch / "src", min_images=min_images,
                             drop_small=drop_small, **options)
        sources = [{"path": item.name, "sha256": digest_input(item)} for item in source.inputs]
        pack_options = {"dataset": dataset, **source.options, "shard_bytes": shard_bytes,
                        "record_checksum": "crc32"}
        fp = sources_fingerprint(sources, pack_options)
        existing = _check_target(out, fp, force)
        if existing is not None:
            print(f"{out}: already packed from the same sources and options; nothing to do")
            return existing
        if source.dropped:
            print(f"dropped {len(source.dropped)} classes with fewer than {min_images} images: "
                  + ", ".join(source.dropped))
        folder = scratch / "pack"
        folder.mkdir()
        manifest: dict[str, Any] = {
            "pack_version": PACK_VERSION,
            "dataset": source.dataset,
            "image": source.image.as_dict(),
            "splits": _write_shards(source, folder, shard_bytes, workers, progress),
            "sources": sources,
            "options": pack_options,
            "fingerprint": fp,
        }
        if source.dropped:
            manifest["dropped"] = source.dropped
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        _swap_into_place(folder, out)
    except Exception as exc:  # a shard writer's OSError, or another library's wrapping it
        if out_of_space(exc):  # the scratch folder goes below: nothing half-packed is left
            raise disk_full(out) from None
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def verify_pack(pack: str | Path | PackStore, split: str | None = None, *, full: bool = False
                ) -> Manifest:
    """Check a pack's shards against its manifest (local or remote); returns the manifest.

    Cheap by default (every shard exists with the recorded size: catches a missing or truncated
    shard); ``full`` also compares each shard's sha256 (catches any modification).
    """
    store = PackStore.of(pack)
    manifest = store.read_manifest()
    splits = manifest.splits
    if split is not None and split not in splits:
        raise HmamlError(f"{store.location}: no split {split!r} in this pack "
                         f"(it has: {', '.join(splits) or 'none'})")
    for name in [split] if split is not None else list(splits):
        for shard in splits[name].shards:
            store.check_shard(shard, manifest, full=full)
    return manifest
