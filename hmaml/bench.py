"""Adaptation and training speed of the methods (prints figures, asserts nothing).

What it measures, on Conv4 at 28 px, 5-way 1-shot, 15 queries per class:
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

from hmaml.methods import MAML, HyperMAML, Method
from hmaml.models import build_encoder
from hmaml.tasks import TaskBatch


def random_batch(tasks: int, n_way: int, shot: int, query: int, device: torch.device
                 ) -> TaskBatch:
    sy = torch.arange(n_way).repeat_interleave(shot).expand(tasks, -1)
    qy = torch.arange(n_way).repeat_interleave(query).expand(tasks, -1)
    return TaskBatch(torch.rand(tasks, n_way * shot, 1, 28, 28), sy,
                     torch.rand(tasks, n_way * query, 1, 28, 28), qy, n_way).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: torch.device, repeats: int,
           warmup: Callable[[], object] | None = None) -> float:
    (warmup or fn)()  # allocations, kernel selection
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def adapt_times(device: torch.device, episodes: int, meta_batch: int, repeats: int,
                autocast: torch.dtype | None) -> dict[str, float]:
    """Seconds to classify ``episodes`` tasks with each method (best of ``repeats``)."""
    torch.manual_seed(0)
    batches = [random_batch(meta_batch, 5, 1, 15, device) for _ in range(episodes // meta_batch)]
    encoder = build_encoder("conv4", 1, 28)
    methods: dict[str, Method] = {
        **{f"maml_{s}": MAML(encoder, 5, s, 0.1, first_order=True, adapt="all")
           for s in (1, 2, 5, 10)},
        "maml_head_1": MAML(encoder, 5, 1, 0.1),
        "hypermaml": HyperMAML(encoder, 5, switch=False),
    }
    for method in methods.values():
        method.to(device).eval()
    amp = (torch.autocast(device.type, dtype=autocast) if autocast is not None
           else torch.autocast(device.type, enabled=False))

    def run(method: Method | None, count: int = len(batches)) -> None:
        with torch.no_grad(), amp:
            for batch in batches[:count]:
                if method is None:
                    encoder(torch.cat([batch.support_x, batch.query_x], 1), split=5)
                else:
                    method(batch)

    times = {"encoder_only": _timed(lambda: run(None), device, repeats, lambda: run(None, 1))}
    for name, method in methods.items():
        times[name] = _timed(lambda m=method: run(m), device, repeats, lambda m=method: run(m, 1))
    return times


def train_throughput(device: torch.device, meta_batch: int, steps: int) -> dict[str, float]:
    """HyperMAML training episodes/s: one vectorised step vs a Python loop over the tasks."""
    torch.manual_seed(0)
    method = HyperMAML(build_encoder("conv4", 1, 28), 5, switch=False).to(device)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    batch = random_batch(meta_batch, 5, 1, 15, device)

    def batched() -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            method(batch).loss.backward()
            optimizer.step()

    def one_by_one() -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            for t in range(meta_batch):
                (method(batch.select(slice(t, t + 1))).loss / meta_batch).backward()
            optimizer.step()

    return {"train_batched_eps": meta_batch * steps / _timed(batched, device, 1),
            "train_loop_eps": meta_batch * steps / _timed(one_by_one, device, 1)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="bench.py adapt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--meta-batch", type=int, default=50, help="tasks per adaptation batch")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many timings")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="time under bf16 autocast")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    times = adapt_times(device, args.episodes, args.meta_batch, args.repeats,
                        torch.bfloat16 if args.bf16 else None)
    floor = times["encoder_only"]
    print(f"{args.episodes} tasks, 5-way 1-shot 15 queries, Conv4 28 px on {device}"
          f"{' (bf16)' if args.bf16 else ''}, threads={torch.get_num_threads()}")
    result: dict[str, float] = {}
    for name, seconds in times.items():
        ratio = seconds / floor
        print(f"  {name:14s} {seconds:8.2f} s   {ratio:5.2f}x encoder-only")
        result[f"{name}_s"] = round(seconds, 3)
        result[f"{name}_x"] = round(ratio, 3)
    result["maml_1_over_hypermaml"] = round(times["maml_1"] / times["hypermaml"], 3)
    print(f"  MAML-1 / HyperMAML: {result['maml_1_over_hypermaml']:.2f}x")
    throughput = train_throughput(device, 32, args.train_steps)
    speedup = throughput["train_batched_eps"] / throughput["train_loop_eps"]
    print(f"training, meta-batch 32: batched {throughput['train_batched_eps']:.1f} episodes/s, "
          f"one task at a time {throughput['train_loop_eps']:.1f} episodes/s "
          f"({speedup:.2f}x)")
    result.update({k: round(v, 2) for k, v in throughput.items()})
    result["train_speedup"] = round(speedup, 2)
    print(json.dumps(result))
    return result
