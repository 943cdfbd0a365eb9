"""Runs you can trust: a run folder knows its config, has one owner, never finishes on NaN, and
reports what it tested (p, repeats)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from hmaml.config import Config, load_config
from hmaml.errors import HmamlError
from hmaml.methods import build_method
from hmaml.models import build_encoder
from hmaml.train.checkpoint import load_checkpoint, save_checkpoint
from hmaml.train.loop import optimizer_step, train
from hmaml.train.rundir import RunDir
from tests.method_fixtures import random_tasks
from tests.train_fixtures import run, tiny_overrides, tiny_pack, train_command
from tests.train_fixtures import uninterrupted as finished

__all__ = ["finished", "tiny_pack"]


def lines(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stderr.strip().splitlines()


def test_another_config_on_a_run_folder_is_refused_naming_the_keys(tiny_pack: Path,
                                                                  finished: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in finished.iterdir()}
    proc = run(train_command(tiny_pack, finished, **{"data.n_shot": 5, "train.lr": 0.5}))
    assert proc.returncode == 2 and len(lines(proc)) == 1
    assert lines(proc)[0] == (f"error: {finished} was made by another config: data.n_shot 1 -> 5, "
                              "train.lr 0.01 -> 0.5; pass run_dir=... for a new run")
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir()} == before  # nothing lost


def test_the_same_config_prints_the_stored_result(tiny_pack: Path, finished: Path) -> None:
    stored = json.loads((finished / "test.json").read_text())
    proc = run(train_command(tiny_pack, finished, **{"tracking.enabled": False}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{finished} is finished" in proc.stdout
    assert f"test: {stored['test_acc']:.2f} ± {stored['test_ci']:.2f} %" in proc.stdout


def test_a_larger_train_epochs_extends_a_finished_run(tiny_pack: Path, tmp_path: Path) -> None:
    """... and its wall time is the whole run's, over both processes, without the first
    process's test (a run of 3 epochs at once would not have run it)."""
    run_dir = tmp_path / "extend"
    assert run(train_command(tiny_pack, run_dir, **{"train.epochs": 2})).returncode == 0
    first = json.loads((run_dir / "test.json").read_text())
    assert first["processes"] == 1 and 0 < first["wall_s"] <= first["process_wall_s"]
    trained = load_checkpoint(run_dir / "checkpoint.pt", None)["run_s"]  # up to the last epoch
    assert 0 < trained < first["wall_s"]
    proc = run(train_command(tiny_pack, run_dir, **{"train.epochs": 3, "eval.every": 3}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    every = load_config("quickstart").eval.every
    assert (f"changed since the run began: eval.every: {every} -> 3; train.epochs: 2 -> 3"
            in proc.stdout)
    assert "resuming at epoch 3" in proc.stdout
    result = json.loads((run_dir / "test.json").read_text())
    assert result["epoch"] == 3 and result["processes"] == 2
    assert 0 < result["wall_s"] - trained <= result["process_wall_s"]
    assert (f"wall time {result['wall_s'] / 60:.1f} min over 2 processes (this one "
            f"{result['process_wall_s'] / 60:.1f} min)") in proc.stdout
    assert "train:\n  epochs: 3" in (run_dir / "config.yaml").read_text()


def test_extending_a_run_may_add_a_milestone_after_its_epochs(tiny_pack: Path, finished: Path,
                                                             tmp_path: Path) -> None:
    """3 epochs at milestones [2], extended to 5 at [2, 4], end where a 5-epoch run at [2, 4]
    ends; a milestone among the trained epochs is refused, by the folder and by the checkpoint."""
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    shutil.copytree(finished, extended)
    schedule = {"train.epochs": 5, "train.lr_milestones": "[2,4]"}
    proc = run(train_command(tiny_pack, extended, **schedule))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.lr_milestones: [2] -> [2, 4]" in proc.stdout
    assert run(train_command(tiny_pack, fresh, **schedule)).returncode == 0
    history = [json.loads(line) for line in (extended / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]  # every epoch kept its row
    assert [row["lr"] for row in history] == pytest.approx([1e-2, 1e-2, 3e-3, 3e-3, 9e-4])
    found = load_checkpoint(extended / "checkpoint.pt", None)["model"]
    expected = load_checkpoint(fresh / "checkpoint.pt", None)["model"]
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=1e-6, msg=key)
    for past in ("[1]", "[2,3]"):  # 3 acts after the 3rd epoch, which is trained
        proc = run(train_command(tiny_pack, finished, **{"train.epochs": 5,
                                                         "train.lr_milestones": past}))
        assert proc.returncode == 2 and len(lines(proc)) == 1
        assert "made by another config: train.lr_milestones [2] -> " in lines(proc)[0]
    moved = tmp_path / "moved"  # no config.yaml beside it: the checkpoint's schedule decides
    moved.mkdir()
    (moved / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    cfg = load_config("quickstart", tiny_overrides(tiny_pack, moved, **{
        "train.epochs": 5, "train.lr_milestones": "[1]"}))
    with pytest.raises(HmamlError, match=r"train\.lr_milestones \[1\] changes the learning "
                                         r"rate of the 3 epochs already trained"):
        train(cfg)


def test_a_run_resumed_from_a_checkpoint_without_its_time_says_so(tiny_pack: Path,
                                                                   tmp_path: Path) -> None:
    """Checkpoints of older versions did not record time: the total is unknown, not guessed."""
    run_dir = tmp_path / "old"
    assert run(train_command(tiny_pack, run_dir, **{"train.epochs": 1})).returncode == 0
    state = load_checkpoint(run_dir / "checkpoint.pt", None)
    del state["run_s"], state["processes"]
    save_checkpoint(run_dir / "checkpoint.pt", state)
    proc = run(train_command(tiny_pack, run_dir, **{"train.epochs": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "test.json").read_text())
    assert result["wall_s"] is None and result["processes"] == 2
    assert "min in this process (resumed; the earlier processes' time was not recorded)" in (
        proc.stdout)


def test_a_second_owner_is_refused_and_a_dead_one_is_replaced(tiny_pack: Path,
                                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "locked"
    with RunDir(run_dir).lock():  # this test process owns the folder
        proc = run(train_command(tiny_pack, run_dir))
    assert proc.returncode == 2 and len(lines(proc)) == 1
    assert f"is in use by pid {os.getpid()} on {socket.gethostname()}" in lines(proc)[0]
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "run.lock").exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(),
                                                  "pid": gone.pid, "since": 0}))
    proc = run(train_command(tiny_pack, run_dir, **{"train.epochs": 1}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the lock of pid {gone.pid}" in proc.stderr
    assert not (run_dir / "run.lock").exists()  # released at the end


def test_a_lock_on_another_host_is_never_taken(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    with pytest.raises(HmamlError, match="in use by pid 1 on elsewhere"), rd.lock():
        pass


def test_divergence_stops_with_an_error_and_the_run_failed(tiny_pack: Path,
                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "nan"
    db = tmp_path / "mlruns.db"
    proc = run(train_command(tiny_pack, run_dir, **{"train.lr": 1e8, "train.epochs": 6,
                                                    "tracking.enabled": True,
                                                    "tracking.uri": f"sqlite:///{db}"}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = lines(proc)[-1]
    assert error.startswith("error: epoch ") and "is not finite; training stopped" in error
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["status"] == "failed" and "not finite" in progress["error"]
    assert not (run_dir / "test.json").exists()
    if (run_dir / "checkpoint.pt").exists():  # the last checkpoint holds finite weights
        state = load_checkpoint(run_dir / "checkpoint.pt", None)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    from mlflow.tracking import MlflowClient

    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert MlflowClient(f"sqlite:///{db}").get_run(run_id).info.status == "FAILED"


def test_skipping_non_finite_steps_stops_after_the_patience(tiny_pack: Path,
                                                            tmp_path: Path) -> None:
    proc = run(train_command(tiny_pack, tmp_path / "skip", **{
        "train.lr": 1e8, "train.epochs": 6, "train.nonfinite": "skip",
        "train.nonfinite_patience": 2}))
    assert proc.returncode == 2
    assert "2 steps in a row (train.nonfinite_patience=2)" in lines(proc)[-1]


def _accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def test_a_non_finite_step_changes_nothing() -> None:
    cfg = Config()
    cfg.method.hn_width = 16
    method = build_method(cfg.method, build_encoder("conv4", 1, 16), 4)
    optimizer = torch.optim.Adam(method.parameters(), lr=0.1)
    accelerator = _accelerator()
    model, optimizer = accelerator.prepare(method, optimizer)
    batch = random_tasks(tasks=2, n_way=4)
    batch.query_x[0, 0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in method.state_dict().items()}
    _, nonfinite = optimizer_step(accelerator, model, optimizer, [batch], [0.5])
    assert nonfinite == "loss"
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
    assert not optimizer.state_dict()["state"]


def test_the_warm_up_leaves_the_hypernetwork_and_its_adam_state_alone() -> None:
    cfg = Config()
    cfg.method.hn_width, cfg.method.warmup_start, cfg.method.warmup_len = 16, 2, 2
    method = build_method(cfg.method, build_encoder("conv4", 1, 16), 4)
    optimizer = torch.optim.Adam(method.parameters(), lr=0.01)
    accelerator = _accelerator()
    model, optimizer = accelerator.prepare(method, optimizer)
    hyper = {k: v.clone() for k, v in method.hypernet.state_dict().items()}
    method.set_epoch(1)  # p = 1
    for seed in range(3):
        assert optimizer_step(accelerator, model, optimizer,
                              [random_tasks(tasks=2, n_way=4, seed=seed)], [0.5])[1] is None
    assert all(torch.equal(hyper[k], v) for k, v in method.hypernet.state_dict().items())
    state = optimizer.optimizer.state
    assert all(p not in state for p in method.hypernet.parameters())
    assert all(p in state for p in method.encoder.parameters())  # the rest did train
    method.set_epoch(2)  # p = 2/3: the switch has begun
    optimizer_step(accelerator, model, optimizer, [random_tasks(tasks=2, n_way=4)], [0.5])
    assert all(p in state for p in method.hypernet.parameters())


def test_a_run_that_never_reached_p0_says_so_and_repeats_are_reported(
        tiny_pack: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "early"
    proc = run(train_command(tiny_pack, run_dir, **{
        "train.epochs": 2, "method.warmup_start": 1, "method.warmup_len": 4,
        "eval.test_repeats": 3}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    test = json.loads((run_dir / "test.json").read_text())
    assert test["tested_p"] == 0.0 and not test["reached_p0"]
    assert test["best_epoch_p"] in (1.0, 0.8)
    means = [r["acc"] for r in test["test_repeats"]]
    assert len(means) == 3 and len(set(means)) > 1
    assert test["test_acc"] == pytest.approx(sum(means) / 3)
    assert test["test_std"] == pytest.approx(torch.tensor(means).std(correction=0).item())
    assert "mean ± std over 3 repeats of 8 episodes" in proc.stdout
    assert "training never reached p = 0" in proc.stdout


def test_validation_on_the_test_split_is_refused() -> None:
    with pytest.raises(HmamlError, match=r"data\.test_split='val' is also data\.val_split"):
        load_config("quickstart", ["data.test_split=val"])
