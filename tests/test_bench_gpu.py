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
from hmaml.bench import runs, sweeps
from hmaml.errors import HmamlError
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
    out = tmp_path / "out"
    start = time.perf_counter()
    # the "earlier commit" is this checkout itself, reading the same packs
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "bench.py"), "gpu",
                           "--device", "cpu", "--smoke", "--packs", str(packs),
                           "--compare-commit", "HEAD", "--compare-src", str(ROOT),
                           "--compare-packs", str(packs), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=single_thread_env())
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((out / "gpu.json").read_text()) == result
    for name in bench_gpu.SECTIONS:
        assert "error" not in result[name], (name, result[name]["error"])
    for name in ("equivalence", "numerics", "ddp", "adapt", "train_speed", "train_run", "paper",
                 "trials", "paper_maml"):
        assert "skipped" not in result[name], (name, result[name])
    assert result["equivalence"]["pass"]
    methods = result["numerics"]["methods"]
    assert set(methods) == {"maml_head", "maml_all", "hypermaml_p0", "hypermaml_p0.5",
                            "protonet"}
    assert all(m["pass"] for m in methods.values()) and result["numerics"]["pass"]
    assert result["ddp"]["pass"] and result["ddp"]["backend"] == "gloo"
    assert result["ddp"]["max_abs_update"] > 0  # the steps did move the parameters
    for label in ("28px_conv4", "84px_conv4pool"):
        assert set(result["adapt"][label]) == {"fp32", "bf16"}
    assert result["train_speed"]["fp32"]["tasks_per_s"] > 0
    variants = result["train_run"]["variants"]
    assert len(variants) == 3 and all(v["finished"] == 2 for v in variants.values())
    assert all(0 <= v["test_acc_mean"] <= 100 for v in variants.values())
    assert len(result["train_run"]["differences_of_means"]) == 3
    assert set(result["trials"]["trials"]) == {"1", "2"}
    rows = result["paper"]["rows"]
    assert set(rows) == {"1shot", "5shot"} and rows["1shot"]["paper"] == [79.07, 1.09]
    assert set(result["paper_maml"]["rows"]) == {"maml"}
    assert (out / "paper_omni_emnist_summary.md").is_file()
    assert "torch" in result["env"] and result["wall_s"] > 0
    assert wall < 400, f"the smoke run took {wall:.0f} s"


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
    assert result["targets"]["train_tasks_per_s"]["target"] == 40.0


def test_targets_say_met_or_missed_in_the_right_direction() -> None:
    from hmaml.bench.train import targets

    met = targets({"hypermaml_bf16": 40.0, "evaluate_s": 8.0, "evaluate_peak_mb": 400.0},
                  "hypermaml_bf16")
    assert all(row["met"] for row in met.values()) and len(met) == 3
    missed = targets({"hypermaml_bf16": 39.9, "evaluate_s": 8.1, "evaluate_peak_mb": 1025.0},
                     "hypermaml_bf16")
    assert not any(row["met"] for row in missed.values())
    assert missed["evaluate_s"] == {"target": 8.0, "measured": 8.1, "met": False}
    assert set(targets({"hypermaml_fp32": 20.0}, "hypermaml_fp32")) == {"train_tasks_per_s"}


def test_aggregate_rate_counts_the_epochs_all_trials_trained_side_by_side() -> None:
    a = [{"time": t, "epoch_s": 1.0} for t in (11.0, 12.0, 13.0)]  # epochs 10-11, 11-12, 12-13
    b = [{"time": t, "epoch_s": 1.0} for t in (11.5, 12.5)]  # epochs 10.5-11.5, 11.5-12.5
    window = sweeps.common_window([a, b], episodes=100)
    # the window is 10.5 .. 12.5: a's second epoch and both of b's lie inside it
    assert window == {"overlap_s": 2.0, "aggregate_tasks_per_s": 200.0,
                      "per_trial_tasks_per_s": 100.0}
    late = [{"time": 20.0, "epoch_s": 1.0}]
    assert sweeps.common_window([a, late], 100)["aggregate_tasks_per_s"] is None


def test_a_failed_run_reports_its_error_line(tmp_path: Path) -> None:
    code = runs.Code("this checkout", ROOT, tmp_path / "no_packs")
    spec = runs.RunSpec("v", code, "quickstart", ("train.epochs=1",), 0, tmp_path / "run")
    [result] = runs.run_all([spec], parallel=1, deadline=time.perf_counter() + 120,
                            log=lambda _: None)
    assert result.returncode == 2 and not result.test
    assert result.error.startswith("exit status 2: error: ") and "no_packs" in result.error
    assert (tmp_path / "run.log").read_text().strip().endswith(result.error.split(": ", 1)[1])
    table = runs.seed_table([result])
    assert table["v"]["finished"] == 0 and table["v"]["seeds"]["0"] == {"error": result.error}


def test_seed_table_gives_mean_and_sample_std_over_seeds(tmp_path: Path) -> None:
    code = runs.Code("c", ROOT, tmp_path)
    results = [runs.RunResult(runs.RunSpec("v", code, "q", (), seed, tmp_path / str(seed)), 0,
                              1.0, {"test_acc": acc, "wall_s": 2.0})
               for seed, acc in ((0, 70.0), (1, 72.0), (2, 74.0))]
    row = runs.seed_table(results)["v"]
    assert (row["test_acc_mean"], row["test_acc_std"], row["finished"]) == (72.0, 2.0, 3)


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_an_earlier_commit_is_extracted_once(tmp_path: Path) -> None:
    tree = runs.extract_commit(ROOT, "HEAD", tmp_path / "code")
    assert (tree / "launch" / "train.py").is_file() and (tree / "hmaml" / "cli.py").is_file()
    assert not (tree / ".git").exists()
    assert runs.extract_commit(tmp_path / "not_a_repo", "HEAD", tree) == tree  # reused
    with pytest.raises(HmamlError, match="is not a git checkout; extract the commit"):
        runs.extract_commit(tmp_path / "not_a_repo", "HEAD", tmp_path / "other")
