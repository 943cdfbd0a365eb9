"""Training speed against the kernel limit of the machine (prints figures, asserts nothing).

Setting (the speed issue's): Omniglot -> EMNIST shapes, 5-way 1-shot, 16 queries per class,
Conv4 at 28 px, meta-batch 32, HyperMAML in its pure-hypernetwork phase (p = 0), Adam.

- ``hypermaml_*``: tasks per second of a whole training step (forward, backward, Adam) through
  hmaml's method, in fp32, under bf16 autocast, and ``torch.compile``'d (or why compiling failed);
- ``encoder_*``: tasks per second of the encoder alone (forward + backward of a mean), hmaml's
  per-task-BatchNorm Conv4 against a plain ``nn.Sequential`` Conv4 with ``nn.BatchNorm2d`` over
  the whole batch: the plain one is what the machine's fused kernels give, the limit to aim at;
- ``evaluate_s`` / ``evaluate_peak_mb``: with ``--run``, the whole ``hmaml evaluate``
  process on that run (``--eval-episodes`` 600 test tasks, one list), wall time and peak memory;
- ``--profile``: the torch.profiler table of one training step at the precision ``auto`` picks
  (operators by self time) and the share of the step spent in convolutions, on stderr; the
  shares go into the JSON (``profile``).

Variants take turns step by step and the median of ``--steps`` timings counts, so a change in
the machine's load falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import nn

from hmaml.bench.common import random_batch
from hmaml.methods import HyperMAML
from hmaml.models import build_encoder
from hmaml.precision import resolve_precision
from hmaml.train.build import compile_method

Step = Callable[[], None]
CPU = torch.device("cpu")


def plain_conv4(channels: int, width: int = 64) -> nn.Sequential:
    """The textbook Conv4: BatchNorm over the whole batch, no per-task statistics."""
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(channels if i == 0 else width, width, 3, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten())


def hypermaml_step(tasks: int, query: int, size: int, dtype: torch.dtype | None,
                   compiled: bool, device: torch.device = CPU, *, encoder: str = "conv4",
                   channels: int = 1, hn_width: int = 512) -> Step:
    """One HyperMAML training step (p = 0, Adam) on a fixed random meta-batch, its encoder in
    ``dtype`` (None: fp32) as training runs it; also the GPU check's training step and the
    loader benchmark's measure of what training consumes."""
    torch.manual_seed(0)
    method = HyperMAML(build_encoder(encoder, channels, size), 5, hn_width=hn_width,
                       switch=False).to(device)
    method.encoder_dtype = dtype
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3, fused=device.type == "cuda")
    batch = random_batch(tasks, 5, 1, query, device, channels=channels, size=size)
    if compiled:
        compile_method(method, device)  # as train.compile does

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = method(batch).loss
        loss.backward()
        optimizer.step()

    return step


def encoder_step(plain: bool, tasks: int, query: int, size: int, autocast: bool,
                 channels_last: bool) -> Step:
    """Forward and backward of an encoder over one meta-batch's images."""
    torch.manual_seed(0)
    images = tasks * 5 * (1 + query)
    x = torch.rand(images, 1, size, size)
    model: nn.Module
    if plain:
        model = plain_conv4(1)
        if channels_last:  # torch's stub of Module.to lacks its memory_format keyword
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            x = x.contiguous(memory_format=torch.channels_last)
        run = lambda: model(x)  # noqa: E731
    else:
        model = build_encoder("conv4", 1, size)
        support = x[: tasks * 5].view(tasks, 5, 1, size, size)
        query_x = x[tasks * 5 :].view(tasks, 5 * query, 1, size, size)
        run = lambda: torch.cat([model(support), model(query_x)], dim=1)  # noqa: E731

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run()
        out.float().mean().backward()

    return step


def time_steps(variants: dict[str, Step], steps: int, tasks: int,
               log: Callable[[str], None]) -> dict[str, float]:
    """Tasks per second of each variant: one warm-up step each (compiling happens there), then
    ``steps`` rounds in which every variant runs once; the median round counts."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, step in variants.items():
        start = time.perf_counter()
        step()
        log(f"{name}: warm-up {time.perf_counter() - start:.1f} s")
    for _ in range(steps):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: round(tasks / statistics.median(t), 2) for name, t in times.items()}


#: Runs a module as ``__main__`` and reports its own peak RSS last on stderr, from VmHWM of
#: /proc (Linux): ``ru_maxrss`` survives exec, so it would count the benchmark process that
#: forked it, compile workers included.
_PEAK_WRAPPER = """import re, resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    try:
        with open("/proc/self/status") as status:
            peak = int(re.search(r"VmHWM:\\s+(\\d+)", status.read()).group(1))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak_kb={peak}", file=sys.stderr)
"""


def profile_step(step: Step, log: Callable[[str], None], rows: int = 25) -> dict[str, object]:
    """One profiled step: the operator table (self time, descending) on ``log``, and the share
    of the step's self time in convolutions (forward and backward) against everything else."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm, so that the profile shows a step of the timed kind
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    log(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    ops = list(events)  # aten operators and hmaml's fused kernel (an autograd.Function)
    total = sum(e.self_cpu_time_total for e in ops)
    conv = sum(e.self_cpu_time_total for e in ops if "convolution" in e.key)
    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"step_ms": round(total / 1000, 1), "convolution_share": round(conv / total, 3),
            "top_ms": {e.key: round(e.self_cpu_time_total / 1000, 1) for e in top}}


def evaluate_process(run: Path, episodes: int) -> dict[str, float | str]:
    """Wall time and peak memory of a whole ``hmaml evaluate`` process on ``run``."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, "hmaml.cli", "evaluate", "--run",
                           str(run), "--repeats", "1", "--episodes", str(episodes)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines() or ["no output"]
    if proc.returncode != 0:
        return {"evaluate_error": lines[-2] if len(lines) > 1 else lines[-1]}
    peak_kb = int(lines[-1].removeprefix("peak_kb="))
    return {"evaluate_s": round(seconds, 2), "evaluate_peak_mb": round(peak_kb / 1024, 1)}


#: The speed targets on a 2-core CPU (2 threads): training at least 40 tasks/s (twice the
#: first fast path's 19.8, six times the authors' code's 6.6), a 600-task evaluation process
#: within 8 s and 1 GB.
TARGETS = {"train_tasks_per_s": 40.0, "evaluate_s": 8.0, "evaluate_peak_mb": 1024.0}


def targets(result: dict[str, object], train_key: str) -> dict[str, object]:
    """Each target with the figure measured for it and whether it is met (training at the
    precision ``train.mixed_precision: auto`` picks here)."""
    figures = {"train_tasks_per_s": (result.get(train_key), 1),
               "evaluate_s": (result.get("evaluate_s"), -1),
               "evaluate_peak_mb": (result.get("evaluate_peak_mb"), -1)}
    out: dict[str, object] = {}
    for name, (value, sign) in figures.items():
        if value is None:
            continue
        goal = TARGETS[name]
        measured = cast(float, value)  # the figures measured are numbers
        out[name] = {"target": goal, "measured": value,
                     "met": bool(sign * float(measured) >= sign * goal)}
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="hmaml bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (median counts)")
    parser.add_argument("--tasks", type=int, default=32, help="tasks per meta-batch")
    parser.add_argument("--query", type=int, default=16, help="queries per class")
    parser.add_argument("--size", type=int, default=28, help="image size")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--run", type=Path,
                        help="a trained run: time a whole hmaml evaluate process on it")
    parser.add_argument("--eval-episodes", type=int, default=600,
                        help="test episodes of the timed evaluation")
    parser.add_argument("--profile", action="store_true",
                        help="profile one step (torch.profiler): operators by self time")
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    shape = (args.tasks, args.query, args.size)
    variants: dict[str, Step] = {
        "hypermaml_fp32": hypermaml_step(*shape, dtype=None, compiled=False),
        "hypermaml_bf16": hypermaml_step(*shape, dtype=torch.bfloat16, compiled=False),
        "encoder_hmaml_fp32": encoder_step(False, *shape, autocast=False, channels_last=True),
        "encoder_hmaml_bf16": encoder_step(False, *shape, autocast=True, channels_last=True),
        "encoder_plain_fp32": encoder_step(True, *shape, autocast=False, channels_last=False),
        "encoder_plain_bf16": encoder_step(True, *shape, autocast=True, channels_last=False),
        "encoder_plain_bf16_channels_last": encoder_step(True, *shape, autocast=True,
                                                         channels_last=True),
    }
    fast = resolve_precision("auto", CPU)
    result: dict[str, object] = {
        "setting": f"{args.tasks} tasks of 5-way 1-shot {args.query} queries, Conv4 "
                   f"{args.size} px, tasks/s (median of {args.steps})",
        "threads": torch.get_num_threads(), "auto_precision": str(fast)}
    compiled = f"hypermaml_compiled_{fast.label}"
    if not args.no_compile:
        try:
            variants[compiled] = hypermaml_step(*shape, dtype=fast.dtype, compiled=True)
            variants[compiled]()  # compile errors surface here, not mid-round
        except Exception as exc:  # the figure says why compiling failed instead of stopping
            variants.pop(compiled, None)
            result["hypermaml_compiled_error"] = f"{type(exc).__name__}: {exc}"[:300]
    speeds = time_steps(variants, args.steps, args.tasks, log)
    result.update(speeds)
    result["plain_over_hmaml_encoder_bf16"] = round(
        speeds["encoder_plain_bf16_channels_last"] / speeds["encoder_hmaml_bf16"], 2)
    if args.run is not None:
        result.update(evaluate_process(args.run, args.eval_episodes))
    if args.profile:
        result["profile"] = profile_step(variants[f"hypermaml_{fast.label}"], log)
    result["targets"] = targets(result, f"hypermaml_{fast.label}")
    for key, value in result.items():
        log(f"  {key}: {value}")
    print(json.dumps(result))
    return result
