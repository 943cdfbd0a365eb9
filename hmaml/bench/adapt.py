"""Adaptation and training speed of the methods (prints figures, asserts nothing).

What it measures, on Conv4 at 28 px, 5-way 1-shot, 15 queries per class (the GPU check,
:mod:`hmaml.bench.gpu`, also runs the adaptation part at 84 px):
- seconds to classify 600 random tasks, in meta-batches, for the encoder alone (the floor),
  MAML adapting the whole network (the paper's baseline) with 1/2/5/10 steps, MAML adapting the
  head only, and HyperMAML — each also as a ratio to the encoder alone;
- training throughput (episodes/s, meta-batch 32) of HyperMAML batched vs one task at a time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from hmaml.bench.common import random_batch, sync
from hmaml.config import MIXED_PRECISION
from hmaml.methods import MAML, HyperMAML, Method
from hmaml.models import build_encoder
from hmaml.precision import resolve_precision
from hmaml.tasks import TaskBatch


def adapt_times(device: torch.device, episodes: int, meta_batch: int, repeats: int,
                dtype: torch.dtype | None, encoder_name: str = "conv4", channels: int = 1,
                size: int = 28, query: int = 15, steps: tuple[int, ...] = (1, 2, 5, 10)
                ) -> dict[str, float]:
    """Seconds to classify ``episodes`` 5-way 1-shot tasks with each method.

    Every encoder runs in ``dtype`` (None: fp32), under ``torch.inference_mode`` where the
    method takes no gradient to adapt, as :func:`hmaml.train.evaluate.evaluate` runs them. The
    methods take turns batch by batch (and the best of ``repeats`` rounds counts), so a change in
    the machine's load during the run affects every method alike and the ratios hold.
    """
    torch.manual_seed(0)
    batches = [random_batch(meta_batch, 5, 1, query, device, channels, size)
               for _ in range(episodes // meta_batch)]
    encoder = build_encoder(encoder_name, channels, size)
    methods: dict[str, Method] = {
        **{f"maml_{s}": MAML(encoder, 5, s, 0.1, first_order=True, adapt="all")
           for s in steps},
        "maml_head_1": MAML(encoder, 5, 1, 0.1),
        "hypermaml": HyperMAML(encoder, 5, switch=False),
    }
    for method in methods.values():
        method.to(device).eval()
        method.encoder_dtype = dtype
    runners: dict[str, tuple[Method, Callable[[TaskBatch], object]]] = {
        "encoder_only": (methods["hypermaml"], methods["hypermaml"].embed),
        **{name: (method, method) for name, method in methods.items()},
    }

    def timed(name: str, batch: TaskBatch) -> float:
        method, run = runners[name]
        sync(device)
        start = time.perf_counter()
        with torch.no_grad() if method.adapts_with_autograd else torch.inference_mode():
            run(batch)
        sync(device)
        return time.perf_counter() - start

    best = dict.fromkeys(runners, float("inf"))
    for name in runners:  # warm-up: allocations, kernel selection
        timed(name, batches[0])
    for _ in range(repeats):
        totals = dict.fromkeys(runners, 0.0)
        for batch in batches:
            for name in runners:
                totals[name] += timed(name, batch)
        best = {name: min(best[name], totals[name]) for name in runners}
    return best


def train_throughput(device: torch.device, meta_batch: int, steps: int,
                     dtype: torch.dtype | None) -> dict[str, float]:
    """HyperMAML training episodes/s: one vectorised step vs a Python loop over the tasks
    (the two alternate step by step, so both see the same machine load)."""
    torch.manual_seed(0)
    method = HyperMAML(build_encoder("conv4", 1, 28), 5, switch=False).to(device)
    method.encoder_dtype = dtype
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    batch = random_batch(meta_batch, 5, 1, 15, device)

    def batched() -> None:
        optimizer.zero_grad()
        method(batch).loss.backward()
        optimizer.step()

    def one_by_one() -> None:
        optimizer.zero_grad()
        for t in range(meta_batch):
            (method(batch.select(slice(t, t + 1))).loss / meta_batch).backward()
        optimizer.step()

    batched()  # warm-up
    seconds = {"train_batched_eps": 0.0, "train_loop_eps": 0.0}
    for _ in range(steps):
        for key, step in (("train_batched_eps", batched), ("train_loop_eps", one_by_one)):
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            seconds[key] += time.perf_counter() - start
    return {key: meta_batch * steps / value for key, value in seconds.items()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="hmaml bench adapt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--meta-batch", type=int, default=50, help="tasks per adaptation batch")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many timings")
    parser.add_argument("--train-steps", type=int, default=3, help="training steps timed")
    parser.add_argument("--precision", default="auto", choices=MIXED_PRECISION,
                        help="the encoder's precision, as train.mixed_precision (default auto: "
                             "bf16 where the hardware runs it fast)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    times = adapt_times(device, args.episodes, args.meta_batch, args.repeats, precision.dtype)
    floor = times["encoder_only"]
    print(f"{args.episodes} tasks, 5-way 1-shot 15 queries, Conv4 28 px on {device}, "
          f"encoder precision {precision}, threads={torch.get_num_threads()}")
    result: dict[str, object] = {"precision": precision.name}
    for name, seconds in times.items():
        ratio = seconds / floor
        print(f"  {name:14s} {seconds:8.2f} s   {ratio:5.2f}x encoder-only")
        result[f"{name}_s"] = round(seconds, 3)
        result[f"{name}_x"] = round(ratio, 3)
    result["maml_1_over_hypermaml"] = round(times["maml_1"] / times["hypermaml"], 3)
    print(f"  MAML-1 / HyperMAML: {result['maml_1_over_hypermaml']:.2f}x")
    throughput = train_throughput(device, 32, args.train_steps, precision.dtype)
    speedup = throughput["train_batched_eps"] / throughput["train_loop_eps"]
    print(f"training, meta-batch 32: batched {throughput['train_batched_eps']:.1f} episodes/s, "
          f"one task at a time {throughput['train_loop_eps']:.1f} episodes/s "
          f"({speedup:.2f}x)")
    result.update({k: round(v, 2) for k, v in throughput.items()})
    result["train_speedup"] = round(speedup, 2)
    print(json.dumps(result))
    return result
