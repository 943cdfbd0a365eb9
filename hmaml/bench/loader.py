"""How many training episodes per second the episodic stream delivers.

Measures the real loader (``train_loader``: shard reading, sampling, float conversion,
augmentation, worker transfer) on a given pack and on two synthetic packs it writes itself:
84 px RGB with the "natural" augmentation (the CUB / mini-ImageNet path) and 28 px grey without
(the character path). Steady-state rate: the clock starts once the first meta-batch has arrived,
so worker start-up and buffer filling are reported apart (``*_startup_s``). Beside each synthetic
pack it times what training consumes at those shapes (HyperMAML steps in the precision ``auto``
picks) and prints the ratio, which must stay well above 1 (docs/data.md asks >= 10).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from hmaml.bench.train import hypermaml_step
from hmaml.data.format import (
    MANIFEST_NAME,
    PACK_VERSION,
    ImageSpec,
    encode_class_record,
    sha256_file,
    shard_name,
)
from hmaml.data.store import read_manifest
from hmaml.data.stream import train_loader
from hmaml.errors import HmamlError
from hmaml.precision import resolve_precision

CPU = torch.device("cpu")


def write_synthetic_pack(root: Path, *, classes: int, per_class: int, image: ImageSpec,
                         classes_per_shard: int = 16, seed: int = 0) -> Path:
    """A pack of random-noise classes with only a ``train`` split (for timing, not learning)."""
    side, channels = image.stored_size, image.channels
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries, shards = [], []
    for s, first in enumerate(range(0, classes, classes_per_shard)):
        path = root / shard_name("train", s)
        labels = range(first, min(first + classes_per_shard, classes))
        with wds.TarWriter(str(path)) as sink:
            for label in labels:
                images = rng.integers(0, 256, (per_class, side, side, channels), dtype=np.uint8)
                sink.write(encode_class_record(label, f"noise{label:04d}", images))
                entries.append({"label": label, "name": f"noise{label:04d}", "count": per_class})
        shards.append({"file": path.name, "sha256": sha256_file(path), "classes": len(labels),
                       "images": per_class * len(labels), "bytes": path.stat().st_size})
    manifest = {"pack_version": PACK_VERSION, "dataset": f"synthetic{image.size}",
                "image": image.as_dict(),
                "splits": {"train": {"classes": entries, "shards": shards}}, "sources": [],
                "options": {"classes": classes, "per_class": per_class, "seed": seed},
                "fingerprint": ""}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def measure(pack_dir: str | Path, split: str, *, way: int, shot: int, query: int, workers: int,
            tasks_per_batch: int, seconds: float, augment: str | None) -> tuple[float, float]:
    """(episodes per second after the first batch, seconds until the first batch)."""
    start = time.perf_counter()
    loader = train_loader(pack_dir, split, n_way=way, n_shot=shot, n_query=query,
                          tasks_per_batch=tasks_per_batch, episodes=tasks_per_batch * 100_000,
                          seed=0, workers=workers, augment=augment)
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    tasks = 0
    while (now := time.perf_counter()) - first < seconds or tasks == 0:
        tasks += next(batches).num_tasks
    del batches  # stops the workers
    return tasks / (now - first), first - start


def run(shards: str | None, way: int, shot: int, query: int, workers: int,
        tasks_per_batch: int = 32, seconds: float = 5.0, augment: str | None = None,
        train: bool = True) -> dict[str, Any]:
    """Episodes/s of the training stream on ``shards`` (if given; its ``train`` split, or its
    first split, with ``augment``) and on synthetic packs like the natural-image ones (84 px
    input, stored at the default 126 px) and the character ones (28 px); with ``train``, beside
    each synthetic pack the tasks/s training consumes at its shapes and the ratio of the two."""
    results: dict[str, Any] = {"way": way, "shot": shot, "query": query, "workers": workers,
                               "tasks_per_batch": tasks_per_batch}
    measure_shape = functools.partial(measure, way=way, shot=shot, query=query, workers=workers,
                                      tasks_per_batch=tasks_per_batch, seconds=seconds)
    if shards is not None:
        manifest = read_manifest(shards)
        splits = manifest.splits
        split = "train" if "train" in splits else next(iter(splits), "train")
        results["pack"] = f"{manifest.dataset}/{split}"
        results["pack_eps"], results["pack_startup_s"] = measure_shape(shards, split,
                                                                       augment=augment)
    with tempfile.TemporaryDirectory(prefix="hmaml-loader-bench-") as tmp:
        for name, image, augment_synth, encoder, width in (
                ("synthetic84", ImageSpec(84, 3, 126, "natural"), "natural", "conv4pool", 256),
                ("synthetic28", ImageSpec(28, 1, 28, "characters"), None, "conv4", 512)):
            pack = write_synthetic_pack(Path(tmp) / name, classes=64,
                                        per_class=max(60, shot + query), image=image)
            results[f"{name}_eps"], results[f"{name}_startup_s"] = measure_shape(
                pack, "train", augment=augment_synth)
            if train:
                results[f"{name}_train_tasks_s"] = training_tasks_per_second(
                    image, encoder, width, tasks_per_batch, query, seconds)
                results[f"{name}_ratio"] = results[f"{name}_eps"] / \
                    results[f"{name}_train_tasks_s"]
    return results


def training_tasks_per_second(image: ImageSpec, encoder: str, hn_width: int, tasks: int,
                              query: int, seconds: float) -> float:
    """What training consumes: tasks/s of HyperMAML training steps (forward, backward, Adam) of
    ``tasks`` 5-way 1-shot tasks on ``encoder`` at the image's input size, in the precision
    ``train.mixed_precision: auto`` picks here (the paper's CUB / mini-ImageNet shapes for
    84 px, Omniglot -> EMNIST's for 28 px)."""
    step = hypermaml_step(tasks, query, image.size, resolve_precision("auto", CPU).dtype, False,
                          encoder=encoder, channels=image.channels, hn_width=hn_width)
    step()  # one-time set-up
    start, done = time.perf_counter(), 0
    while (now := time.perf_counter()) - start < seconds or done == 0:
        step()
        done += tasks
    return done / (now - start)


def main(argv: list[str] | None = None) -> int:
    """``--shards DIR --way 5 --shot 1 --query 16 [--workers W]``: human lines, then one JSON
    object as the last line. Bad input raises HmamlError for the calling CLI to report."""
    parser = argparse.ArgumentParser(prog="hmaml bench loader", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", help="a pack folder (manifest.json + shards)")
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--query", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--tasks-per-batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--augment", choices=("none", "natural"), default="none",
                        help="augmentation for --shards (the synthetic packs fix their own)")
    parser.add_argument("--no-train", action="store_true",
                        help="skip timing what training consumes (the ratio)")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.seconds <= 0:
        raise HmamlError(f"--workers {args.workers} / --seconds {args.seconds}: need workers >= 0 "
                         "and seconds > 0")
    results = run(args.shards, args.way, args.shot, args.query, args.workers,
                  args.tasks_per_batch, args.seconds, args.augment, not args.no_train)
    print(f"loader: {args.way}-way {args.shot}-shot {args.query}-query, "
          f"{args.tasks_per_batch} tasks per batch, {args.workers} workers")
    for key in ("pack", "synthetic84", "synthetic28"):
        if f"{key}_eps" in results:
            label = results["pack"] if key == "pack" else key
            print(f"  {label:>24}: {results[f'{key}_eps']:8.1f} episodes/s "
                  f"(first batch after {results[f'{key}_startup_s']:.2f} s)")
        if f"{key}_ratio" in results:
            print(f"  {'training consumes':>24}: {results[f'{key}_train_tasks_s']:8.1f} tasks/s "
                  f"-> the loader is {results[f'{key}_ratio']:.1f}x that")
    print(json.dumps(results))
    return 0
