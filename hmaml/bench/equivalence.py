"""Device equivalence: the same training on the CPU and on another device, step by step.

The check that finds a device-only bug. Each case is a shipped config (HyperMAML through its
warm-up switch, MAML adapting the whole network at second order, ProtoNet) trained for a few
epochs of real tasks from its packs, from the same initial weights and on the same batches,
twice: on the CPU in float64 (the reference) and on the device. Two comparisons:

- **float64 on the device** (TF32 off, deterministic algorithms): the parameters after each
  phase (HyperMAML: warm-up p = 1, switch 0 < p < 1, hypernetwork p = 0) must agree to
  :data:`FLOAT64_TOLERANCE`; rounding alone gives ~1e-12. At the first step of each phase both
  devices also run one forward and backward pass from the same weights under an op tracer
  (:class:`OpTrace`), which compares every operator's output in order, so that a difference is
  named where it starts (``encoder.blocks.1.bn``: ``native_batch_norm``), not where it ends up;
- **fp32 as training runs it on the device** (the default TF32 settings, channels-last, fused
  Adam on CUDA) against the float64 reference, with the tolerances of
  :data:`FP32_TOLERANCE`.

On the CPU alone (``device=cpu``) both runs take the same path and agree exactly: that tests the
check itself; a test perturbs one layer on the "device" side and expects the tracer to name it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from hmaml.config import Config, load_config
from hmaml.data.stream import train_loader
from hmaml.methods import Method
from hmaml.models import fused
from hmaml.precision import Precision
from hmaml.tasks import TaskBatch
from hmaml.train.build import build_model, open_packs

CPU = torch.device("cpu")
#: float64 on two devices: each operator rounds at ~1e-16, and training amplifies it. Rounding
#: alone (the CPU at 1 against 2 threads, the FULL sizes, 20 steps) left the parameters
#: 1e-12 apart (relative L2) through HyperMAML's warm-up, 3.4e-9 after its switch (Adam's
#: fresh state for the hypernetwork), 3e-12 for MAML and ProtoNet; fp32 is 1e-2 away. 1e-6
#: is far above rounding and far below any real difference.
FLOAT64_TOLERANCE = 1e-6
#: An operator's output differs "for real" above this relative L2 difference (float64).
OP_TOLERANCE = 1e-9
#: fp32 as training runs it against float64, same start and batches: the relative L2 difference
#: of the first step's gradients (same weights, same batch) bounds it. Measured on the CPU (fp32,
#: no TF32), FULL sizes: 1.4e-2 (HyperMAML, through MAML's second-order inner step), 7e-3
#: (MAML, ProtoNet): BatchNorm over a 5-image support set cancels digits. TF32 (10-bit mantissa)
#: adds its own; a wrong kernel is off by O(1). The training losses (up to 20 % apart after 20
#: steps on the CPU) and the parameters are reported but bound nothing: Adam turns the rounding
#: of near-zero gradients into steps of +-lr.
FP32_TOLERANCE = {"first_grad_rel": 5e-2}
#: Operators whose outputs say nothing of their own: views and aliases (the inputs' values) and
#: allocations (uninitialised memory until the next op writes it).
_SKIPPED = frozenset({"view", "_unsafe_view", "transpose", "t", "unsqueeze", "squeeze", "expand",
                      "permute", "detach", "alias", "slice", "select", "as_strided", "reshape",
                      "split", "chunk", "unbind", "_reshape_alias", "lift_fresh", "empty",
                      "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


@dataclass(frozen=True)
class Case:
    """One method to compare: its shipped config and the overrides that shorten it."""

    config: str
    overrides: tuple[str, ...]
    tasks: int  # per optimizer step, one micro-batch (the GPU's real shape for HyperMAML)


@dataclass(frozen=True)
class EquivalenceSizes:
    """The workload: full on a GPU, tiny for ``--smoke``."""

    cases: dict[str, Case]
    epochs: int
    steps_per_epoch: int
    extra: tuple[str, ...]  # overrides for every case (shapes of the smoke run)


#: HyperMAML through the switch as the GPU check's train_run has it: W = 1, S = 3, the LR drops
#: at W + 1 and W + S; 5 epochs x 4 steps = 20 Adam steps: 4 at p = 1, 12 blending, 4 at p = 0,
#: at the train_run's 32 tasks in one pass. MAML and ProtoNet at 4 tasks: the float64 CPU
#: reference is the slow side (a HyperMAML step of 32 tasks: 11.5 s in float64 on 2 cores).
_HYPERMAML = ("method.warmup_start=1", "method.warmup_len=3", "train.lr_milestones=[2,4]")
FULL = EquivalenceSizes(
    cases={"hypermaml": Case("omni_emnist1", _HYPERMAML, 32),
           "maml_all": Case("maml_omni_emnist1", (), 4),
           "protonet": Case("protonet_omni_emnist1", (), 4)},
    epochs=5, steps_per_epoch=4, extra=())
SMOKE = EquivalenceSizes(
    cases={"hypermaml": Case("omni_emnist1", _HYPERMAML, 2),
           "maml_all": Case("maml_omni_emnist1", (), 2),
           "protonet": Case("protonet_omni_emnist1", (), 2)},
    epochs=5, steps_per_epoch=1,
    extra=("data.n_query=2", "method.hn_width=32"))


# ----------------------------------------------------------------------------- the op tracer


@dataclass
class OpRecord:
    """One operator's output, summarised so that two runs can be compared without keeping it."""

    op: str
    module: str
    numel: int
    norm: float
    projection: float
    finite: bool


class OpTrace(TorchDispatchMode):
    """Records every operator that produces floating-point values (views excepted), forward and
    backward, with the module it ran in.

    Each output is kept as its L2 norm and its projection on fixed weights w_i =
    frac(i * golden ratio) - 1/2 over its elements in logical order: two outputs x, y with
    ||x - y|| = e ||x|| differ in the projection by about e ||x|| / sqrt(12), a layout
    (permutation) bug included, so both summaries estimate e (:func:`op_difference`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self._stack: list[str] = []
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(
                self._enter(name or "method")))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append(label)
        return hook

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _SKIPPED:
            return out
        module = self._stack[-1] if self._stack else "backward"
        tensors = out if isinstance(out, (tuple, list)) else (out,)
        for value in tensors:
            if isinstance(value, Tensor) and value.is_floating_point() and value.numel():
                self.records.append(summarise(name, module, value))
        return out


def summarise(op: str, module: str, value: Tensor) -> OpRecord:
    flat = value.detach().double().reshape(-1)
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64)
    weights = torch.frac(weights * 0.6180339887498949) - 0.5
    finite = bool(torch.isfinite(flat).all())
    return OpRecord(op, module, flat.numel(), float(flat.norm()), float(flat @ weights), finite)


def op_difference(a: OpRecord, b: OpRecord) -> float:
    """Estimated relative L2 difference of two outputs from their summaries."""
    if not (a.finite and b.finite):
        return 0.0 if a.finite == b.finite and a.norm == b.norm else math.inf
    if a.numel != b.numel:
        return math.inf
    scale = max(a.norm, b.norm)
    if scale == 0.0:
        return 0.0
    return max(abs(a.norm - b.norm), abs(a.projection - b.projection) * math.sqrt(12)) / scale


def traced_step(method: Method, batch: TaskBatch) -> list[OpRecord]:
    """The ops of one forward and backward pass (gradients are left on ``method``)."""
    trace = OpTrace(method)
    try:
        with trace:
            out = method(batch)
            (out.task_loss.sum() / batch.num_tasks).backward()
    finally:
        trace.close()
    return trace.records


def compare_traces(reference: list[OpRecord], other: list[OpRecord], tolerance: float
                   ) -> dict[str, Any]:
    """Align two traces by op name (a device may run an extra op) and name the first op whose
    output differs by more than ``tolerance``, and the largest differences."""
    matcher = SequenceMatcher(None, [r.op for r in reference], [r.op for r in other],
                              autojunk=False)
    pairs = [(i + k, j + k) for i, j, size in matcher.get_matching_blocks()
             for k in range(size)]
    diffs = [(op_difference(reference[i], other[j]), i) for i, j in pairs]
    first = next(((d, i) for d, i in diffs if d > tolerance), None)
    worst = sorted(diffs, reverse=True)[:3]

    def describe(d: float, i: int) -> dict[str, Any]:
        r = reference[i]
        return {"index": i, "op": r.op, "module": r.module, "rel_diff": d, "numel": r.numel}

    return {"ops": len(reference), "ops_other": len(other), "ops_compared": len(pairs),
            "first_over_tolerance": None if first is None else describe(*first),
            "largest": [describe(d, i) for d, i in worst]}


# ----------------------------------------------------------------------------- training


def phase_of(p: float) -> str:
    """HyperMAML's phase at MAML weight p (methods without a switch: always p = 0)."""
    return "warmup (p=1)" if p == 1.0 else "switch (0<p<1)" if p > 0 else "p=0"


@dataclass
class Trajectory:
    """What one training run leaves to compare."""

    losses: list[float]
    phases: dict[str, dict[str, Tensor]]  # phase -> parameters at its end (on the CPU, float64)
    first_grads: dict[str, Tensor]
    probe_logits: Tensor
    phase_starts: dict[str, tuple[dict[str, Tensor], TaskBatch, int]]  # weights, batch, epoch


def as_dtype(batch: TaskBatch, device: torch.device, dtype: torch.dtype) -> TaskBatch:
    return TaskBatch(batch.support_x.to(device, dtype), batch.support_y.to(device),
                     batch.query_x.to(device, dtype), batch.query_y.to(device), batch.n_way)


def parameters_of(method: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().to(CPU, torch.float64).clone()
            for name, p in method.named_parameters()}


def train_steps(method: Method, cfg: Config, epochs: list[list[TaskBatch]], probe: TaskBatch,
                device: torch.device, dtype: torch.dtype, fused: bool) -> Trajectory:
    """The training loop's arithmetic (Adam, the LR schedule, the hypernetwork resting while
    p = 1, each task's loss weighted 1/T) on fixed batches."""
    optimizer = torch.optim.Adam(method.parameters(), lr=cfg.train.lr, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(cfg.train.lr_milestones), gamma=cfg.train.lr_gamma)
    losses: list[float] = []
    phases: dict[str, dict[str, Tensor]] = {}
    starts: dict[str, tuple[dict[str, Tensor], TaskBatch, int]] = {}
    first_grads: dict[str, Tensor] = {}
    for epoch, batches in enumerate(epochs):
        method.set_epoch(epoch)
        phase = phase_of(method.p)
        for batch in batches:
            if phase not in starts:
                starts[phase] = (parameters_of(method), batch, epoch)
            moved = as_dtype(batch, device, dtype)
            optimizer.zero_grad(set_to_none=True)
            out = method(moved)
            (out.task_loss.sum() / moved.num_tasks).backward()
            for param in method.resting_parameters():
                param.grad = None
            if not first_grads:
                first_grads = {n: p.grad.detach().to(CPU, torch.float64).clone()
                               for n, p in method.named_parameters() if p.grad is not None}
            optimizer.step()
            losses.append(float(out.loss.detach()))
        phases[phase] = parameters_of(method)
        scheduler.step()
    method.set_tested()
    with torch.no_grad():
        logits = method(as_dtype(probe, device, dtype)).logits.detach().to(CPU, torch.float64)
    return Trajectory(losses, phases, first_grads, logits, starts)


def parameter_difference(reference: dict[str, Tensor], other: dict[str, Tensor]
                         ) -> dict[str, Any]:
    """``rel_l2``: ||a - b|| / ||a|| over all parameters (what the tolerances bound); and the
    largest max|a - b| / max|a| of one tensor, with its name: Adam turns the rounding of a
    gradient that is exactly zero in exact arithmetic (a BatchNorm bias followed by another
    normalisation) into steps of random sign, so single tensors differ far more than the whole."""
    worst, name = 0.0, ""
    for key, ref in reference.items():
        scale = float(ref.abs().max()) or 1.0
        diff = float((other[key] - ref).abs().max()) / scale
        if not math.isfinite(diff) or diff > worst:
            worst, name = diff, key
    return {"rel_l2": relative_norm(reference, other), "max_rel_tensor": worst,
            "worst_tensor": name}


def relative_norm(reference: dict[str, Tensor], other: dict[str, Tensor]) -> float:
    diff = sum(float((other[k] - v).pow(2).sum()) for k, v in reference.items())
    ref = sum(float(v.pow(2).sum()) for v in reference.values())
    return math.sqrt(diff / ref) if ref else 0.0


# ----------------------------------------------------------------------------- the section


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Plain fp32 convolutions and matmuls on CUDA (a no-op elsewhere)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def float64_settings(device: torch.device) -> Iterator[list[str]]:
    """TF32 off, deterministic algorithms (warning, not failing, where an op has none: the
    warnings are returned so that the report names them), cuDNN autotuning off."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    nondeterministic: list[str] = []
    try:
        with no_tf32(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield nondeterministic
        nondeterministic.extend(sorted({str(w.message).split(".")[0] for w in caught
                                        if "deterministic" in str(w.message)}))
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def case_config(case: Case, packs: Path, sizes: EquivalenceSizes) -> Config:
    return load_config(case.config, [
        f"data.train_pack={packs / 'omniglot_nolatin'}", f"data.eval_pack={packs / 'emnist'}",
        "tracking.enabled=false", "data.workers=0", "data.augment=null", *case.overrides,
        *sizes.extra])


def case_batches(cfg: Config, tasks: int, sizes: EquivalenceSizes
                 ) -> tuple[list[list[TaskBatch]], TaskBatch]:
    """Real training tasks, epoch by epoch, and one more batch held out as the probe."""
    data = cfg.data
    packs = open_packs(cfg)
    epochs = []
    for epoch in range(sizes.epochs + 1):
        loader = train_loader(packs.train, data.train_split, n_way=data.n_way,
                              n_shot=data.n_shot, n_query=data.n_query, tasks_per_batch=tasks,
                              episodes=tasks * sizes.steps_per_epoch, seed=cfg.seed,
                              epoch=epoch, image_size=packs.image.size)
        epochs.append(list(loader))
    return epochs[:-1], epochs[-1][0]


def build(cfg: Config) -> Method:
    """The case's method with the config's initial weights (float64, on the CPU)."""
    image = open_packs(cfg).image
    return build_model(cfg, image, Precision("no", "equivalence"), CPU).double()


def compare_case(name: str, case: Case, device: torch.device, packs: Path,
                 sizes: EquivalenceSizes,
                 device_patch: Callable[[Method], None] | None = None) -> dict[str, Any]:
    """One method: float64 on both devices (with op traces at each phase's first step), then
    fp32 on the device as training runs it, both against the CPU float64 run."""
    cfg = case_config(case, packs, sizes)
    epochs, probe = case_batches(cfg, case.tasks, sizes)
    start = build(cfg)

    def on_device(dtype: torch.dtype) -> Method:
        method = copy.deepcopy(start).to(device, dtype)
        if device_patch is not None:
            device_patch(method)
        return method

    with float64_settings(device) as nondeterministic:
        reference = train_steps(copy.deepcopy(start), cfg, epochs, probe, CPU, torch.float64,
                                fused=False)
        other = train_steps(on_device(torch.float64), cfg, epochs, probe, device,
                            torch.float64, fused=False)
        traces = {}
        for phase, (weights, batch, epoch) in reference.phase_starts.items():
            ref_method, dev_method = copy.deepcopy(start), on_device(torch.float64)
            for method in (ref_method, dev_method):
                method.load_state_dict(weights, strict=False)
                method.set_epoch(epoch)
            traces[phase] = compare_traces(
                traced_step(ref_method, as_dtype(batch, CPU, torch.float64)),
                traced_step(dev_method, as_dtype(batch, device, torch.float64)), OP_TOLERANCE)
    float64: dict[str, Any] = {"phases": {}}
    for phase, params in reference.phases.items():
        float64["phases"][phase] = {**parameter_difference(params, other.phases[phase]),
                                    "op_trace": traces.get(phase)}
    float64["loss_max_rel_diff"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in
                                       zip(reference.losses, other.losses, strict=True))
    float64["nondeterministic_ops"] = nondeterministic
    float64["pass"] = all(p["rel_l2"] <= FLOAT64_TOLERANCE for p in float64["phases"].values())

    fp32 = train_steps(on_device(torch.float32), cfg, epochs, probe, device, torch.float32,
                       fused=device.type == "cuda")
    with no_tf32():  # how much of the fp32 difference is TF32's: the first step without it
        exact = train_steps(on_device(torch.float32), cfg, [epochs[0][:1]], probe, device,
                            torch.float32, fused=device.type == "cuda")
    probe_scale = float(reference.probe_logits.abs().max()) or 1.0
    fp32_report: dict[str, Any] = {
        "first_grad_rel": relative_norm(reference.first_grads, fp32.first_grads),
        "first_grad_rel_tf32_off": relative_norm(reference.first_grads, exact.first_grads),
        "loss_rel": max(abs(a - b) / max(abs(a), 1e-12) for a, b in
                        zip(reference.losses, fp32.losses, strict=True)),
        "probe_logits_rel": float((fp32.probe_logits - reference.probe_logits).abs().max())
        / probe_scale,
        "phases": {phase: parameter_difference(params, fp32.phases[phase])
                   for phase, params in reference.phases.items()},
    }
    fp32_report["pass"] = all(fp32_report[k] <= v for k, v in FP32_TOLERANCE.items()) and \
        all(math.isfinite(x) for x in fp32.losses)
    return {"config": case.config, "overrides": list(case.overrides), "tasks_per_step": case.tasks,
            "steps": len(reference.losses), "losses": [round(x, 6) for x in reference.losses],
            "float64": float64, "fp32": fp32_report,
            "pass": float64["pass"] and fp32_report["pass"]}


def run(device: torch.device, packs: Path, sizes: EquivalenceSizes,
        log: Callable[[str], None] = lambda line: None,
        device_patch: Callable[[Method], None] | None = None) -> dict[str, Any]:
    """Every case; what the GPU check's ``equivalence`` section reports. Both devices run the
    native operators (:func:`hmaml.models.fused.native_ops`: CUDA has no fused CPU kernel), so
    the op traces pair operator with operator."""
    settings = {"reference": "cpu, float64", "device": str(device),
                "float64": "TF32 off, deterministic algorithms, cuDNN benchmark off",
                "fp32": ("as training runs it: default TF32 settings "
                         f"(cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                         f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}), "
                         "channels-last, " + ("fused Adam" if device.type == "cuda"
                                              else "Adam")),
                "tolerance": {"float64_param_rel": FLOAT64_TOLERANCE, "op_rel": OP_TOLERANCE,
                              **{f"fp32_{k}": v for k, v in FP32_TOLERANCE.items()}}}
    methods = {}
    for name, case in sizes.cases.items():
        with fused.native_ops():
            methods[name] = compare_case(name, case, device, packs, sizes, device_patch)
        log(f"equivalence {name}: float64 {methods[name]['float64']['phases']}, "
            f"fp32 {methods[name]['fp32']}")
    return {**settings, "methods": methods, "pass": all(m["pass"] for m in methods.values())}


__all__ = ["FULL", "SMOKE", "EquivalenceSizes", "OpTrace", "compare_traces", "run"]
