"""Mixed precision: what ``auto`` picks, and that only the encoder leaves fp32.

The parity tests compare every method's query logits and gradients with a bf16 encoder against
fp32 on the same weights and tasks, within the tolerances the GPU check states
(:data:`hmaml.bench.gpu.TOLERANCE`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmaml.bench.gpu import (
    FULL,
    TOLERANCE,
    WHOLE_NETWORK_TOLERANCE,
    compare_precisions,
    numerics_cases,
    signed_tasks,
)
from hmaml.errors import HmamlError
from hmaml.methods import MAML, HyperMAML, ProtoNet
from hmaml.models import build_encoder
from hmaml.precision import cpu_bf16_flags, resolve_precision
from tests.method_fixtures import random_tasks

CPU = torch.device("cpu")


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    return path


def test_auto_picks_bf16_on_cpus_with_native_bf16_only(tmp_path: Path) -> None:
    amx = cpuinfo(tmp_path, "avx512f amx_bf16 amx_tile avx512_bf16")
    assert cpu_bf16_flags(amx) == ["amx_bf16", "avx512_bf16"]
    picked = resolve_precision("auto", CPU, amx)
    assert (picked.name, picked.dtype) == ("bf16", torch.bfloat16)
    assert str(picked) == "bf16 (auto: CPU has amx_bf16/avx512_bf16)"
    plain = resolve_precision("auto", CPU, cpuinfo(tmp_path, "avx512f avx512bw"))
    assert (plain.name, plain.dtype) == ("no", None)
    assert "no native bf16" in plain.reason
    assert resolve_precision("auto", CPU, tmp_path / "absent").name == "no"  # e.g. macOS


def test_auto_on_cuda_follows_the_compute_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled (CUDA graphs): bf16 from compute capability 8.0; eager: fp32, saying why."""
    for capability, expected in (((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "no")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d, c=capability: c)
        assert resolve_precision("auto", torch.device("cuda"), compiled=True).name == expected
        eager = resolve_precision("auto", torch.device("cuda"))
        assert eager.name == "no"
        if capability[0] >= 8:
            assert "without train.compile" in eager.reason and "launches" in eager.reason


def test_an_explicit_precision_is_kept(tmp_path: Path) -> None:
    amx = cpuinfo(tmp_path, "amx_bf16")
    assert resolve_precision("no", CPU, amx).dtype is None
    assert resolve_precision("no", CPU, amx).label == "fp32"
    assert resolve_precision("bf16", CPU, cpuinfo(tmp_path, "")).dtype is torch.bfloat16
    assert resolve_precision("fp16", CPU, amx).dtype is torch.float16


@pytest.mark.parametrize("name", ["maml_head", "maml_all", "hypermaml_p0", "hypermaml_p0.5",
                                  "protonet"])
def test_bf16_encoder_matches_fp32_within_the_stated_tolerance(name: str) -> None:
    sizes = dataclasses.replace(FULL, tasks=4, hn_width=64)
    batch = signed_tasks(sizes, seed=0, device=CPU)
    torch.manual_seed(0)
    method = numerics_cases(sizes)[name]()
    tolerance = WHOLE_NETWORK_TOLERANCE if name == "maml_all" else TOLERANCE
    result = compare_precisions(method, batch, tolerance)
    assert result["pass"], result
    assert result["logits_max_abs"] > 0  # the bf16 encoder did run: rounding shows


@pytest.mark.parametrize("method_name", ["hypermaml", "maml", "protonet"])
def test_everything_after_the_encoder_stays_fp32(method_name: str) -> None:
    """With an encoder that computes nothing (raw pixels), a bf16 encoder precision and an
    outer bf16 autocast (Accelerate's) change no bit of the logits: the classifier, the
    hypernetwork, the softmax and the losses run in fp32 (bf16 logits would resolve ~0.5 at the
    paper's update norms)."""
    torch.manual_seed(0)
    encoder = build_encoder("pixels", 1, 16)
    method = {"hypermaml": lambda: HyperMAML(encoder, 4, hn_width=32, switch=False),
              "maml": lambda: MAML(encoder, 4, inner_steps=2),
              "protonet": lambda: ProtoNet(encoder, 4)}[method_name]()
    batch = random_tasks()
    reference = method(batch)
    method.encoder_dtype = torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = method(batch)
    assert fast.logits.dtype == torch.float32 and fast.loss.dtype == torch.float32
    torch.testing.assert_close(fast.logits, reference.logits, rtol=0, atol=0)


def test_the_encoder_runs_in_its_precision() -> None:
    torch.manual_seed(0)
    method = ProtoNet(build_encoder("conv4", 1, 16), 4)
    batch = random_tasks()
    fp32 = method.embed(batch)[0]
    method.encoder_dtype = torch.bfloat16
    bf16 = method.embed(batch)[0]
    assert bf16.dtype == torch.float32  # upcast for the head
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


def test_train_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch) -> None:
    from hmaml.train.engine import pick_device

    def seen(cuda: bool, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    seen(True, True)
    assert pick_device("auto") == "cuda" and pick_device("mps") == "mps"
    seen(False, True)
    assert pick_device("auto") == "mps" and pick_device("cpu") == "cpu"
    seen(False, False)
    assert pick_device("auto") == "cpu"
    for name in ("cuda", "mps"):
        with pytest.raises(HmamlError, match=rf"train.device={name}: torch sees no "
                                             rf"{name.upper()} device here"):
            pick_device(name)


def test_a_missing_device_is_one_line_not_a_cpu_run(tmp_path) -> None:
    """Asked for CUDA where there is none, training stops before it starts, naming the key."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "hmaml.cli", "train", "--config", "quickstart",
                           "train.device=cuda", f"run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: train.device=cuda: torch sees no CUDA")
