"""The GPU check (`bench.py gpu`) runs end to end on CPU in --smoke mode, and no section can
take the others down with it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hmaml.bench import gpu as bench_gpu
from tests.train_fixtures import ROOT, single_thread_env, tiny_pack

__all__ = ["tiny_pack"]  # the fixture, re-exported for pytest


def test_bench_help_lists_the_commands() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("adapt", "loader", "gpu"):
        assert command in proc.stdout


@pytest.mark.slow
def test_smoke_runs_every_section_on_cpu(tiny_pack: Path, tmp_path: Path) -> None:
    packs = tmp_path / "packs"
    packs.mkdir()
    for name in ("omniglot_nolatin", "emnist"):  # the glyph pack has all three splits
        (packs / name).symlink_to(tiny_pack)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "gpu",
                           "--device", "cpu", "--smoke", "--packs", str(packs)],
                          capture_output=True, text=True, timeout=300, env=single_thread_env())
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in bench_gpu.SECTIONS:
        assert "error" not in result[name], (name, result[name]["error"])
    for name in ("numerics", "ddp", "adapt", "train_speed", "train_run"):
        assert "skipped" not in result[name], (name, result[name])
    methods = result["numerics"]["methods"]
    assert set(methods) == {"maml_head", "maml_all", "hypermaml_p0", "hypermaml_p0.5",
                            "protonet"}
    assert all(m["pass"] for m in methods.values()) and result["numerics"]["pass"]
    assert result["ddp"]["pass"] and result["ddp"]["backend"] == "gloo"
    assert result["ddp"]["max_abs_update"] > 0  # the steps did move the parameters
    for label in ("28px_conv4", "84px_conv4pool"):
        assert set(result["adapt"][label]) == {"fp32", "bf16"}
    assert result["train_speed"]["fp32"]["tasks_per_s"] > 0
    assert result["train_run"]["status"] == "finished"
    assert 0 <= result["train_run"]["test_acc"] <= 100
    assert "torch" in result["env"] and result["wall_s"] > 0
    assert wall < 120, f"the smoke run took {wall:.0f} s"


def smoke_args(*extra: str):
    return bench_gpu.parse_args(["--device", "cpu", "--smoke", *extra])


def test_missing_packs_are_reported_not_raised(tmp_path: Path) -> None:
    out = bench_gpu.run_section("train_run", torch.device("cpu"), bench_gpu.SMOKE,
                                smoke_args("--packs", str(tmp_path)),
                                deadline=time.perf_counter() + 60)
    assert "packs not found" in out["error"] and str(tmp_path / "emnist") in out["error"]


def test_sections_past_the_budget_are_skipped() -> None:
    out = bench_gpu.run_section("env", torch.device("cpu"), bench_gpu.SMOKE,
                                smoke_args(), deadline=time.perf_counter() - 1)
    assert "--budget-s" in out["skipped"]


def test_an_overrunning_section_keeps_what_it_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(device, sizes, args, out) -> None:
        out["measured"] = 1
        time.sleep(30)

    monkeypatch.setitem(bench_gpu.SECTION_FUNCTIONS, "env", slow)
    sizes = dataclasses.replace(bench_gpu.SMOKE, caps={"env": 0.2})
    out = bench_gpu.run_section("env", torch.device("cpu"), sizes, smoke_args(),
                                deadline=time.perf_counter() + 60)
    assert out["measured"] == 1 and out["error"].startswith("SectionTimeout")
    assert out["seconds"] < 5


def test_the_training_benchmark_prints_every_variant_as_json() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "train",
                           "--steps", "1", "--tasks", "2", "--query", "2", "--size", "16",
                           "--no-compile"], capture_output=True, text=True, timeout=300,
                          env=single_thread_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    variants = ["hypermaml_fp32", "hypermaml_bf16", "encoder_hmaml_fp32", "encoder_hmaml_bf16",
                "encoder_plain_fp32", "encoder_plain_bf16", "encoder_plain_bf16_channels_last"]
    assert all(result[v] > 0 for v in variants) and result["threads"] == 1
    assert result["plain_over_hmaml_encoder_bf16"] > 0
    assert result["targets"]["train_tasks_per_s"]["target"] == 13.0


def test_targets_say_met_or_missed_in_the_right_direction() -> None:
    from hmaml.bench.train import targets

    met = targets({"hypermaml_bf16": 13.0, "evaluate_s": 20.0, "evaluate_peak_mb": 400.0},
                  "hypermaml_bf16")
    assert all(row["met"] for row in met.values()) and len(met) == 3
    missed = targets({"hypermaml_bf16": 12.9, "evaluate_s": 20.1, "evaluate_peak_mb": 1025.0},
                     "hypermaml_bf16")
    assert not any(row["met"] for row in missed.values())
    assert missed["evaluate_s"] == {"target": 20.0, "measured": 20.1, "met": False}
    assert set(targets({"hypermaml_fp32": 20.0}, "hypermaml_fp32")) == {"train_tasks_per_s"}
