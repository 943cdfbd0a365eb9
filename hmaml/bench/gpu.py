"""The GPU check: one command that measures, on a lent GPU, what the CPU tests cannot show.

Sections, in the order they run:

- ``env``: device, torch, CUDA and cuDNN versions, the TF32 defaults the fp32 timings run under;
- ``numerics``: every method's query logits and parameter gradients, fp32 against a bf16 encoder
  on the same random tasks, with the tolerance expected of bf16 and a pass flag;
- ``ddp``: a method wrapped in DDP on a 1-process NCCL group makes the same updates as the plain
  method (the k-process equivalence itself is tested on CPU, with gloo);
- ``adapt``: :func:`hmaml.bench.adapt.adapt_times` at 28 px (Conv4, grey) and 84 px (Conv4Pool,
  RGB), fp32 and bf16, timed with ``torch.cuda.synchronize``;
- ``train_speed``: HyperMAML training tasks/s and peak memory, fp32 and bf16 encoder;
- ``train_run``: a few epochs of Omniglot -> EMNIST through the real training loop (on the
  device the loop chooses: CUDA when there is one);
- ``train_speed_compiled``: the training step with the method under ``torch.compile``, bf16
  and fp32, last because it is the slowest to start and the likeliest to fail.

Each section catches its own exception and reports it as a string, so one failure loses nothing
else; a section that would not fit in what is left of ``--budget-s`` is skipped (and says so),
and one that overruns its share is interrupted. ``--device cpu --smoke`` runs every section tiny
on CPU (gloo for NCCL, no compile): the check is tested without a GPU. Progress goes to stderr;
the last line on stdout is the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hmaml.bench import equivalence, runs, sweeps
from hmaml.bench.adapt import adapt_times
from hmaml.bench.common import sync
from hmaml.bench.train import hypermaml_step
from hmaml.errors import HmamlError
from hmaml.methods import MAML, HyperMAML, Method, ProtoNet
from hmaml.models import Encoder, build_encoder
from hmaml.precision import resolve_precision
from hmaml.tasks import TaskBatch

#: In the order they run: what the GPU issue needs first (equivalence, speed, the seeds and
#: the old code side by side, the paper's rows), then the measurements that can wait.
SECTIONS = ("env", "equivalence", "numerics", "ddp", "train_speed", "train_run", "paper",
            "trials", "paper_maml", "adapt", "train_speed_compiled")

#: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4 %). With fp32 accumulation and the
#: BN statistics, softmax and losses in fp32, the logits of a randomly initialised Conv4 differ
#: from fp32 by 1-3 % of their largest value and the gradients by 5-20 % in L2 norm (measured
#: on CPU). MAML adapting every weight amplifies the rounding of its inner gradient (one step
#: moves the logits by more than their own size at initialisation, and fp32 itself is ~1 % off
#: fp64 there): 10-15 % and 15-50 % measured, hence its wider tolerance.
TOLERANCE = {"logits_rel": 0.05, "grad_rel": 0.3}
WHOLE_NETWORK_TOLERANCE = {"logits_rel": 0.3, "grad_rel": 0.6}
#: DDP on one process only copies gradients through a bucket: the parameters should agree to
#: rounding (exactly, with deterministic cuDNN).
DDP_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Sizes:
    """Each section's workload: full on a GPU, tiny for ``--smoke``."""

    tasks: int  # numerics and DDP: random tasks of `way`-way `shot`-shot, `query` per class
    way: int
    shot: int
    query: int
    size: int
    hn_width: int
    ddp_steps: int
    adapt_episodes: int
    adapt_meta_batch: int
    adapt_query: int
    adapt_steps: tuple[int, ...]  # MAML inner steps timed
    speed_tasks: int
    speed_query: int
    speed_steps: int
    compile: bool
    run_overrides: tuple[str, ...]
    equivalence: equivalence.EquivalenceSizes
    seeds: tuple[int, ...]  # train_run: the seeds of each variant
    run_parallel: int  # train_run: runs at once (all of them share the device)
    trial_counts: tuple[int, ...]  # trials: how many trials share the device, in turn
    trial_overrides: tuple[str, ...]  # trials: each trial's config (omni_emnist1 +)
    paper_overrides: tuple[str, ...]  # paper: changes to the paper sweep (smoke: tiny)
    needs: dict[str, float]  # seconds of budget a section needs to start
    caps: dict[str, float]  # seconds after which a section is interrupted


FULL = Sizes(
    tasks=16, way=5, shot=1, query=16, size=28, hn_width=512, ddp_steps=5,
    adapt_episodes=600, adapt_meta_batch=50, adapt_query=15, adapt_steps=(1, 2, 5, 10),
    speed_tasks=32, speed_query=16, speed_steps=30, compile=True,
    # 10 epochs of 1,280 tasks: the recipe's warm-up (W = 50) and switch (S = 500) of 2048
    # epochs scaled down, the LR milestones at W + 1 and W + S as in the full recipe
    # (one data worker each: nine runs share the GPU machine's 16 cores)
    run_overrides=("data.workers=1", "train.epochs=10", "train.episodes_per_epoch=1280",
                   "method.warmup_start=1", "method.warmup_len=3", "train.lr_milestones=[2,4]",
                   "eval.every=5"),
    equivalence=equivalence.FULL, seeds=(0, 1, 2), run_parallel=9,
    trial_counts=(1, 2, 4, 8),
    # 60 epochs of 100 episodes, the recipe's schedule scaled by 60 / 2048
    trial_overrides=("train.epochs=60", "method.warmup_start=2", "method.warmup_len=15",
                     "train.lr_milestones=[3,17]", "eval.every=60", "eval.test_repeats=1",
                     "eval.test_episodes=100", "data.workers=1"),
    paper_overrides=(),
    needs={"env": 0, "equivalence": 40, "numerics": 10, "ddp": 10, "train_speed": 15,
           "train_run": 60, "paper": 200, "trials": 60, "paper_maml": 200, "adapt": 40,
           "train_speed_compiled": 60},
    caps={"env": 30, "equivalence": 180, "numerics": 60, "ddp": 30, "train_speed": 60,
          "train_run": 150, "paper": 420, "trials": 150, "paper_maml": 330, "adapt": 150,
          "train_speed_compiled": 150},
)
SMOKE = Sizes(
    tasks=3, way=4, shot=2, query=3, size=16, hn_width=32, ddp_steps=3,
    adapt_episodes=2, adapt_meta_batch=1, adapt_query=1, adapt_steps=(1, 2),
    speed_tasks=4, speed_query=2, speed_steps=2, compile=False,
    run_overrides=("data.workers=0", "train.epochs=2", "train.episodes_per_epoch=8",
                   "train.meta_batch=4", "method.warmup_start=0", "method.warmup_len=1",
                   "train.lr_milestones=[]", "method.hn_width=32", "eval.val_episodes=4",
                   "eval.test_episodes=8", "eval.tasks_per_batch=4"),
    equivalence=equivalence.SMOKE, seeds=(0, 1), run_parallel=2, trial_counts=(1, 2),
    trial_overrides=("train.epochs=2", "train.episodes_per_epoch=8", "train.meta_batch=4",
                     "method.hn_width=32", "eval.val_episodes=4", "eval.test_episodes=8",
                     "eval.test_repeats=1", "data.workers=0"),
    paper_overrides=("seeds=[0]", "overrides.train.epochs=2",
                     "overrides.train.episodes_per_epoch=8", "overrides.train.meta_batch=4",
                     "overrides.method.hn_width=32", "overrides.eval.val_episodes=4",
                     "overrides.eval.test_episodes=8", "overrides.eval.test_repeats=2",
                     "overrides.eval.every=1", "overrides.data.workers=0",
                     "overrides.data.n_query=2", "overrides.data.test_query=2"),
    needs=dict.fromkeys(SECTIONS, 0.0),
    caps={"env": 30, "equivalence": 90, "numerics": 60, "ddp": 30, "adapt": 60,
          "train_speed": 30, "train_run": 120, "paper": 120, "trials": 120, "paper_maml": 120,
          "train_speed_compiled": 30},
)


class SectionTimeout(Exception):
    """A section ran past its share of the budget."""


def log(message: str) -> None:
    print(f"[bench gpu] {message}", file=sys.stderr, flush=True)


def error_text(exc: BaseException) -> str:
    """The exception's type and first line: enough to act on, short enough for the JSON."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (SIGALRM)."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise SectionTimeout(f"over its {seconds:.0f} s share of the budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout, by Python or by native code (file descriptor 1), to
    stderr: the training loop prints its header and summary, and stdout is kept for the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def deterministic_cudnn() -> Iterator[None]:
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def signed_tasks(sizes: Sizes, seed: int, device: torch.device) -> TaskBatch:
    """Random tasks like the method tests' (``tests/method_fixtures.random_tasks``): shuffled
    labels and a per-class brightness, so that adapting to the support changes the logits."""
    gen = torch.Generator().manual_seed(seed)

    def labels(per_class: int) -> torch.Tensor:
        base = torch.arange(sizes.way).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(base.numel(), generator=gen)]
                            for _ in range(sizes.tasks)])

    sy, qy = labels(sizes.shot), labels(sizes.query)
    shape = (sizes.tasks, -1, 1, sizes.size, sizes.size)
    sx = torch.rand(sy.numel(), sizes.size, sizes.size, generator=gen).view(shape)
    qx = torch.rand(qy.numel(), sizes.size, sizes.size, generator=gen).view(shape)
    sx = sx + 0.5 * sy[..., None, None, None] / sizes.way
    qx = qx + 0.5 * qy[..., None, None, None] / sizes.way
    return TaskBatch(sx, sy, qx, qy, sizes.way).validate().to(device)


def hypermaml_at(p_epoch: int, sizes: Sizes) -> HyperMAML:
    """HyperMAML with a 2-epoch warm-up from epoch 0: epoch 1 gives p = 0.5 (MAML step and
    hypernetwork blended), epoch 2 gives p = 0 (hypernetwork only)."""
    method = HyperMAML(build_encoder("conv4", 1, sizes.size), sizes.way,
                       hn_width=sizes.hn_width, warmup_start=0, warmup_len=2)
    method.set_epoch(p_epoch)
    return method


def numerics_cases(sizes: Sizes) -> dict[str, Callable[[], Method]]:
    """Every method as trained: MAML head and whole network (second order), HyperMAML at
    p = 0 and p = 0.5, ProtoNet."""

    def encoder() -> Encoder:
        return build_encoder("conv4", 1, sizes.size)

    return {
        "maml_head": lambda: MAML(encoder(), sizes.way, 1, 0.1, first_order=False),
        "maml_all": lambda: MAML(encoder(), sizes.way, 1, 0.1, first_order=False, adapt="all"),
        "hypermaml_p0": lambda: hypermaml_at(2, sizes),
        "hypermaml_p0.5": lambda: hypermaml_at(1, sizes),
        "protonet": lambda: ProtoNet(encoder(), sizes.way),
    }


def logits_and_grads(method: Method, batch: TaskBatch, dtype: torch.dtype | None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """Query logits, parameter gradients and loss with the encoder in ``dtype`` (None: fp32)."""
    method.zero_grad(set_to_none=True)
    method.encoder_dtype = dtype
    out = method(batch)
    out.loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in method.named_parameters()
             if p.grad is not None}
    return out.logits.detach().float(), grads, float(out.loss.detach())


def compare_precisions(method: Method, batch: TaskBatch, tolerance: dict[str, float]
                       ) -> dict[str, Any]:
    """fp32 against a bf16 encoder, same weights and tasks: max abs and relative differences."""
    ref_logits, ref_grads, ref_loss = logits_and_grads(method, batch, None)
    low_logits, low_grads, low_loss = logits_and_grads(method, batch, torch.bfloat16)
    logits_abs = float((low_logits - ref_logits).abs().max())
    diff_sq = sum(float((low_grads[k] - g).pow(2).sum()) for k, g in ref_grads.items())
    ref_sq = sum(float(g.pow(2).sum()) for g in ref_grads.values())
    result = {
        "loss_fp32": round(ref_loss, 5),
        "loss_bf16": round(low_loss, 5),
        "logits_max_abs": logits_abs,
        "logits_rel": logits_abs / float(ref_logits.abs().max()),
        "grad_max_abs": max(float((low_grads[k] - g).abs().max()) for k, g in ref_grads.items()),
        "grad_rel": math.sqrt(diff_sq / ref_sq),
        "argmax_agreement": float((low_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()),
        "finite": bool(torch.isfinite(low_logits).all())
        and all(bool(torch.isfinite(g).all()) for g in low_grads.values()),
    }
    result["pass"] = (result["finite"] and result["logits_rel"] <= tolerance["logits_rel"]
                      and result["grad_rel"] <= tolerance["grad_rel"])
    return result


def section_env(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                out: dict[str, Any]) -> None:
    out.update(python=platform.python_version(), torch=torch.__version__,
               cuda=torch.version.cuda, cpu_count=os.cpu_count())
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["accelerate"] = metadata.version("accelerate")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version(),
                   bf16_supported=torch.cuda.is_bf16_supported(),
                   fp32_timings_tf32={"cudnn_conv": torch.backends.cudnn.allow_tf32,
                                      "matmul": torch.backends.cuda.matmul.allow_tf32})
    else:
        out["device_name"] = platform.processor() or platform.machine()


def section_numerics(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                     out: dict[str, Any]) -> None:
    out["tolerance"] = {"default": TOLERANCE, "maml_all": WHOLE_NETWORK_TOLERANCE,
                        "logits_rel": "max |bf16 - fp32| / max |fp32| over the query logits",
                        "grad_rel": "||g_bf16 - g_fp32|| / ||g_fp32||, all parameters"}
    out["tasks"] = (f"{sizes.tasks} tasks, {sizes.way}-way {sizes.shot}-shot {sizes.query} "
                    f"queries, Conv4 {sizes.size} px")
    out["fp32_reference"] = "TF32 off"
    batch = signed_tasks(sizes, seed=0, device=device)
    methods: dict[str, Any] = {}
    out["methods"] = methods
    with equivalence.no_tf32():  # fp32 as the reference for bf16
        for name, build in numerics_cases(sizes).items():
            torch.manual_seed(0)
            tolerance = WHOLE_NETWORK_TOLERANCE if name == "maml_all" else TOLERANCE
            methods[name] = compare_precisions(build().to(device), batch, tolerance)
            log(f"numerics {name}: {methods[name]}")
    out["pass"] = all(m["pass"] for m in methods.values())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_parameters(model: torch.nn.Module, params: Iterator[torch.nn.Parameter], sizes: Sizes,
                   device: torch.device) -> list[torch.Tensor]:
    """Parameters after ``sizes.ddp_steps`` SGD steps on fixed task batches.

    SGD, not Adam: some HyperMAML parameters have an exactly-zero gradient in exact arithmetic,
    and Adam would turn their rounding noise into full-size steps (see tests/ddp_step.py).
    """
    param_list = list(params)
    optimizer = torch.optim.SGD(param_list, lr=0.05, momentum=0.9)
    for step in range(sizes.ddp_steps):
        optimizer.zero_grad(set_to_none=True)
        model(signed_tasks(sizes, seed=step, device=device)).loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in param_list]


def section_ddp(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                out: dict[str, Any]) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    port = free_port()
    out.update(backend=backend, init=f"tcp://127.0.0.1:{port}", world_size=1,
               method="hypermaml p=0.5", steps=sizes.ddp_steps, tolerance=DDP_TOLERANCE)
    # tcp:// rather than MASTER_ADDR/MASTER_PORT in the environment: the training loop run later
    # in this process must not mistake those variables for a launch of its own
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        with deterministic_cudnn():
            torch.manual_seed(0)
            plain = hypermaml_at(1, sizes).to(device)
            start = [p.detach().clone() for p in plain.parameters()]
            plain_after = ddp_parameters(plain, plain.parameters(), sizes, device)
            torch.manual_seed(0)
            inner = hypermaml_at(1, sizes).to(device)
            wrapped = DistributedDataParallel(inner)
            ddp_after = ddp_parameters(wrapped, inner.parameters(), sizes, device)
    finally:
        dist.destroy_process_group()
    diff = max(float((a - b).abs().max()) for a, b in zip(plain_after, ddp_after, strict=True))
    out.update(max_abs_diff=diff,
               bitwise_equal=all(torch.equal(a, b) for a, b in
                                 zip(plain_after, ddp_after, strict=True)),
               max_abs_update=max(float((a - b).abs().max()) for a, b in
                                  zip(plain_after, start, strict=True)))
    out["pass"] = diff <= DDP_TOLERANCE
    log(f"ddp: {out}")


def section_adapt(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                  out: dict[str, Any]) -> None:
    out["what"] = (f"seconds for {sizes.adapt_episodes} 5-way 1-shot tasks, "
                   f"{sizes.adapt_query} queries per class, meta-batches of "
                   f"{sizes.adapt_meta_batch}; _x: ratio to encoder_only; maml_N: whole "
                   "network, first order; maml_head_1: head only")
    for label, encoder, channels, size in (("28px_conv4", "conv4", 1, 28),
                                           ("84px_conv4pool", "conv4pool", 3, 84)):
        out[label] = {}
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            times = adapt_times(device, sizes.adapt_episodes, sizes.adapt_meta_batch, 1, dtype,
                                encoder, channels, size, sizes.adapt_query, sizes.adapt_steps)
            floor = times["encoder_only"]
            row: dict[str, float] = {}
            for name, seconds in times.items():
                row[f"{name}_s"] = round(seconds, 4)
                row[f"{name}_x"] = round(seconds / floor, 2)
            row["maml_1_over_hypermaml"] = round(times["maml_1"] / times["hypermaml"], 2)
            out[label][precision] = row
            log(f"adapt {label} {precision}: {row}")


def train_rate(device: torch.device, sizes: Sizes, dtype: torch.dtype | None, compiled: bool
               ) -> dict[str, Any]:
    """HyperMAML (p = 0) training steps: forward, backward and Adam on one meta-batch."""
    step = hypermaml_step(sizes.speed_tasks, sizes.speed_query, 28, dtype, compiled, device)
    start = time.perf_counter()
    for _ in range(3):  # allocations, kernel selection, compilation
        step()
    sync(device)
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(sizes.speed_steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    return {"tasks_per_s": round(sizes.speed_tasks * sizes.speed_steps / seconds, 1),
            "step_ms": round(1000 * seconds / sizes.speed_steps, 2),
            "warmup_3_steps_s": round(warmup, 2),
            "peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda" else None}


def speed_header(sizes: Sizes) -> str:
    return (f"HyperMAML p=0, Conv4 28 px, meta-batch {sizes.speed_tasks} of 5-way 1-shot "
            f"{sizes.speed_query} queries, Adam; mean of {sizes.speed_steps} steps")


def section_train_speed(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                        out: dict[str, Any]) -> None:
    out["what"] = speed_header(sizes)
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        out[precision] = train_rate(device, sizes, dtype, compiled=False)
        log(f"train_speed {precision}: {out[precision]}")
    ratio = out["bf16"]["tasks_per_s"] / out["fp32"]["tasks_per_s"]
    out["bf16_over_fp32"] = round(ratio, 3)
    out["auto"] = str(resolve_precision("auto", device))  # what training picks here, eager


def section_train_speed_compiled(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                                 out: dict[str, Any]) -> None:
    out["what"] = f"{speed_header(sizes)}; the method compiled as train.compile does"
    if not sizes.compile:
        out["skipped"] = "--smoke: compiling takes minutes"
        return
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
        out[precision] = train_rate(device, sizes, dtype, compiled=True)
        log(f"train_speed_compiled {precision}: {out[precision]}")
    out["bf16_over_fp32"] = round(out["bf16"]["tasks_per_s"] / out["fp32"]["tasks_per_s"], 3)
    out["auto"] = str(resolve_precision("auto", device, compiled=True))


def section_equivalence(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                        out: dict[str, Any]) -> None:
    out.update(equivalence.run(device, Path(args.packs), sizes.equivalence, log))


def prepare_packs(args: argparse.Namespace) -> dict[str, Any]:
    """Pack what is missing from ``--raw`` before any section: this checkout's packs and, with
    ``--compare-commit``, that code's own (each code reads its own pack format)."""
    start = time.perf_counter()
    out: dict[str, Any] = {"packs": args.packs}
    try:
        raw = Path(args.raw) if args.raw else None
        runs.ensure_packs(runs.checkout_code(Path(args.packs)), raw, log)
        compare = compare_code(args)
        if compare is not None:
            runs.ensure_packs(compare, raw, log)
            out["compare_packs"] = str(compare.packs)
    except Exception as exc:  # the sections that need them report it again
        out["error"] = error_text(exc)
        log(f"packs: {out['error']}")
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def compare_code(args: argparse.Namespace) -> runs.Code | None:
    """The earlier commit that ``train_run`` trains beside this checkout, if one is asked for:
    its tree (``--compare-src``, extracted there by ``git archive`` when empty) and its packs."""
    if not args.compare_commit:
        return None
    root = runs.checkout_code(Path(args.packs)).root
    tree = Path(args.compare_src or Path(args.workdir) / f"code-{args.compare_commit}")
    packs = Path(args.compare_packs or f"{args.packs}-{args.compare_commit}")
    return runs.Code(args.compare_commit, runs.extract_commit(root, args.compare_commit, tree),
                     packs)


def section_train_run(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                      out: dict[str, Any]) -> None:
    workdir = Path(args.workdir) / "train_run"
    out.update(runs.seed_comparison(
        packs=Path(args.packs), raw=Path(args.raw) if args.raw else None,
        compare=compare_code(args), seeds=sizes.seeds, schedule=sizes.run_overrides,
        parallel=sizes.run_parallel, workdir=workdir, deadline=args.section_deadline, log=log))
    log(f"train_run: {out}")


def gpu_index(device: torch.device) -> int:
    """The GPU the trials of a sweep section share (on CPU, a stand-in index: the trials then
    run on the CPU, which tests the packing itself)."""
    return device.index or 0 if device.type == "cuda" else 0


def section_trials(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                   out: dict[str, Any]) -> None:
    out.update(sweeps.trials_throughput(sizes.trial_counts, sizes.trial_overrides,
                                        Path(args.packs), gpu_index(device),
                                        Path(args.workdir) / "trials", log))


def section_paper(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                  out: dict[str, Any]) -> None:
    out.update(sweeps.paper_rows("paper_omni_emnist", sizes.paper_overrides, Path(args.packs),
                                 gpu_index(device), Path(args.workdir), _out_dir(args), log))


def section_paper_maml(device: torch.device, sizes: Sizes, args: argparse.Namespace,
                       out: dict[str, Any]) -> None:
    out.update(sweeps.paper_rows("paper_maml_omni_emnist", sizes.paper_overrides,
                                 Path(args.packs), gpu_index(device), Path(args.workdir),
                                 _out_dir(args), log))


def _out_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.out) if args.out else None


SECTION_FUNCTIONS: dict[str, Callable[[torch.device, Sizes, argparse.Namespace,
                                       dict[str, Any]], None]] = {
    "env": section_env,
    "equivalence": section_equivalence,
    "numerics": section_numerics,
    "ddp": section_ddp,
    "train_speed": section_train_speed,
    "train_run": section_train_run,
    "paper": section_paper,
    "trials": section_trials,
    "paper_maml": section_paper_maml,
    "adapt": section_adapt,
    "train_speed_compiled": section_train_speed_compiled,
}


def run_section(name: str, device: torch.device, sizes: Sizes, args: argparse.Namespace,
                deadline: float) -> dict[str, Any]:
    """One section's results, its error as a string, or why it was skipped."""
    left = deadline - time.perf_counter()
    if left < max(sizes.needs[name], 1.0):
        return {"skipped": f"{left:.0f} s of --budget-s left, needs about "
                           f"{sizes.needs[name]:.0f} s"}
    log(f"{name} ...")
    out: dict[str, Any] = {}
    start = time.perf_counter()
    limit = min(sizes.caps[name], left)
    # sections that wait for processes stop them a little before the alarm, keeping results
    args.section_deadline = start + max(limit - 10.0, limit / 2)
    try:
        with time_limit(limit):
            SECTION_FUNCTIONS[name](device, sizes, args, out)
    except Exception as exc:  # every section reports its own failure; the others still run
        out["error"] = error_text(exc)
        log(f"{name} failed: {out['error']}")
    out["seconds"] = round(time.perf_counter() - start, 2)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hmaml bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true",
                        help="every section tiny (seconds on CPU): tests the check itself")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="skip the sections that no longer fit (default: %(default)s)")
    parser.add_argument("--packs", default="shards",
                        help="folder holding the omniglot_nolatin and emnist packs "
                             "(default: %(default)s)")
    parser.add_argument("--raw", metavar="DIR",
                        help="raw Omniglot and EMNIST (omniglot/*.zip, emnist/emnist.zip) to "
                             "pack from where a pack is missing (this checkout's and the "
                             "compared commit's)")
    parser.add_argument("--compare-commit", metavar="REV",
                        help="train_run: train this earlier commit's code beside this "
                             "checkout, seed for seed")
    parser.add_argument("--compare-src", metavar="DIR",
                        help="the tree of --compare-commit (extracted there with git archive "
                             "when it is empty; a GPU machine without git gets it prepared)")
    parser.add_argument("--compare-packs", metavar="DIR",
                        help="the compared code's packs (default: <--packs>-<REV>)")
    parser.add_argument("--workdir", metavar="DIR",
                        help="run folders of the training sections (default: a temporary "
                             "folder, removed at the end)")
    parser.add_argument("--out", metavar="DIR",
                        help="also write gpu.json and the sweep summaries there")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these (default: all)")
    args = parser.parse_args(argv)
    for key in ("packs", "raw", "compare_src", "compare_packs", "workdir", "out"):
        if getattr(args, key):  # runs start in their own code's folder
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    args.temporary_workdir = not args.workdir
    if not args.workdir:  # removed by main at the end
        args.workdir = tempfile.mkdtemp(prefix="hmaml-gpu-")
    args.section_deadline = math.inf  # set by run_section for each section
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HmamlError(f"--device cuda: torch {torch.__version__} sees no CUDA device here; "
                         "use --device cpu (with --smoke to test the check)")
    start = time.perf_counter()
    deadline = start + args.budget_s
    sizes = SMOKE if args.smoke else FULL
    result: dict[str, Any] = {"mode": "smoke" if args.smoke else "full",
                              "device": args.device, "budget_s": args.budget_s}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        with stdout_to_stderr():
            result["packs"] = prepare_packs(args)
            for name in args.sections:
                result[name] = run_section(name, device, sizes, args, deadline)
                if args.out:  # after every section: a later failure loses nothing
                    (Path(args.out) / "gpu.json").write_text(json.dumps(result, indent=1))
    finally:
        if args.temporary_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    if args.out:
        (Path(args.out) / "gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result
