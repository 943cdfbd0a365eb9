"""Tiny packs written straight to the pack contract (format.py), for the episode-stream tests.

Every image carries its identity in its first pixels: channel 0 of row 0 holds
(label % 256, label // 256, image index), so a test can tell which class and which image of it
ended up where in a task.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from hmaml.data.format import (
    MANIFEST_NAME,
    PACK_VERSION,
    encode_class_record,
    sha256_file,
    shard_name,
)


def coded_images(label: int, count: int, size: int, channels: int) -> np.ndarray:
    """``count`` uint8 images ``[count, size, size, channels]`` identified by their first pixels."""
    rng = np.random.default_rng(label)
    images = rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)
    images[:, 0, 0, 0] = label % 256
    images[:, 0, 1, 0] = label // 256
    images[:, 0, 2, 0] = np.arange(count)
    return images


def decode_ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class label, image index) of float images ``[..., C, H, W]`` made by coded_images."""
    codes = (x[..., 0, 0, :3] * 255).round().long()
    return codes[..., 0] + 256 * codes[..., 1], codes[..., 2]


def write_pack(root: Path, counts: dict[str, list[int]], *, size: int = 8, channels: int = 1,
               classes_per_shard: int = 4) -> Path:
    """A pack at ``root`` with ``counts[split][label]`` images per class; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, split_counts in counts.items():
        classes, shards = [], []
        for s, first in enumerate(range(0, len(split_counts), classes_per_shard)):
            path = root / shard_name(split, s)
            labels = range(first, min(first + classes_per_shard, len(split_counts)))
            with wds.TarWriter(str(path)) as sink:
                for label in labels:
                    name = f"{split}/class{label:03d}"
                    images = coded_images(label, split_counts[label], size, channels)
                    sink.write(encode_class_record(label, name, images))
                    classes.append({"label": label, "name": name, "count": split_counts[label]})
            shards.append({"file": path.name, "sha256": sha256_file(path), "classes": len(labels),
                           "images": sum(split_counts[i] for i in labels),
                           "bytes": path.stat().st_size})
        splits[split] = {"classes": classes, "shards": shards}
    manifest = {"pack_version": PACK_VERSION, "dataset": "coded",
                "image": {"size": size, "channels": channels, "stored_size": size,
                          "pipeline": "characters"}, "splits": splits,
                "sources": [], "options": {}, "fingerprint": "0" * 64}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return root
