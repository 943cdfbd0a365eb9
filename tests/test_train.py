"""The training system: same update on k processes, exact resume, preemption, refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hmaml.errors import HmamlError
from hmaml.train.checkpoint import load_checkpoint
from hmaml.train.loop import milestones, train
from tests.train_fixtures import (
    ROOT,
    run,
    single_thread_env,
    tiny_config,
    tiny_pack,
    train_command,
    uninterrupted,
)

__all__ = ["tiny_pack", "uninterrupted"]  # the fixture, re-exported for pytest
CPU = torch.device("cpu")


@pytest.mark.parametrize(("method", "accum", "worlds"), [
    ("hypermaml", 2, (3, 8)), ("hypermaml", 1, (3,)), ("maml", 1, (3,))])
def test_any_number_of_processes_makes_the_same_update_as_one(
        tiny_pack: Path, tmp_path: Path, method: str, accum: int, worlds: tuple[int, ...]) -> None:
    """10 tasks per step over 3 or 8 ranks: uneven shares, padding micro-batches at 8."""
    script = ROOT / "tests" / "ddp_step.py"
    env = {**single_thread_env(), "PYTHONPATH": str(ROOT)}
    single = tmp_path / "one.pt"
    subprocess.run([sys.executable, str(script), str(single), method, str(accum),
                    str(tiny_pack)], env=env, check=True, capture_output=True, timeout=300)
    torchrun = Path(sys.executable).with_name("torchrun")
    for world in worlds:
        double = tmp_path / f"{world}.pt"
        proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(world),
                               str(script), str(double), method, str(accum), str(tiny_pack)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        check_same_update(single, double, method)


def check_same_update(single: Path, double: Path, method: str) -> None:
    one, two = torch.load(single), torch.load(double)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=1e-11, msg=key)
    from hmaml.config import Config
    from hmaml.methods import build_method
    from hmaml.models import build_encoder

    cfg = Config()
    cfg.method.name, cfg.method.hn_width = method, 32
    torch.manual_seed(0)
    start = build_method(cfg.method, build_encoder("conv4", 1, 16), 4).state_dict()
    moved = any(not torch.allclose(start[k].double(), one[k]) for k in one)
    assert moved  # the steps really changed the parameters


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt", None)["model"]


def _wait_for(path: Path, predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file():
            try:
                if predicate(json.loads(path.read_text())):
                    return
            except json.JSONDecodeError:
                pass
        assert proc.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError(f"{path} never satisfied the condition")


def test_a_run_leaves_its_results(uninterrupted: Path) -> None:
    result = json.loads((uninterrupted / "test.json").read_text())
    assert result["status"] == "finished" and result["test_episodes"] == 8
    assert 0 <= result["test_acc"] <= 100 and result["test_ci"] >= 0
    repeats = json.loads((uninterrupted / "test_accuracies.json").read_text())["repeats"]
    assert [len(r) for r in repeats] == [8]
    assert result["tested_p"] == 0.0 and result["reached_p0"] and result["test_std"] == 0.0
    history = [json.loads(line) for line in (uninterrupted / "history.jsonl").read_text()
               .splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [row["p"] for row in history] == [1.0, 0.5, 0.0]  # W=1, S=1: p(W) = S/(S+1)
    assert result["best_epoch"] == 3 and result["best_epoch_p"] == 0.0  # the only p = 0 epoch
    assert [row["lr"] for row in history] == pytest.approx([1e-2, 1e-2, 3e-3])
    assert (uninterrupted / "learning_curve.png").stat().st_size > 5000
    # each epoch's training time and its end, in order: what packed trials are compared by
    ends = [row["time"] for row in history]
    assert ends == sorted(ends) and all(row["epoch_s"] > 0 for row in history)
    assert all(b - a >= row["epoch_s"] for a, b, row in zip(ends, ends[1:], history[1:],
                                                            strict=False))
    assert result["train_tasks_per_s"] == pytest.approx(
        3 * 8 / sum(row["epoch_s"] for row in history))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_where_an_uninterrupted_run_ends(
        tiny_pack: Path, uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_command(tiny_pack, run_dir), env=single_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(run_dir / "progress.json", lambda p: p["epoch"] >= 1, proc)
    time.sleep(0.5)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "test.json").exists()
    resumed = run(train_command(tiny_pack, run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch" in resumed.stdout + resumed.stderr
    expected, found = _final_params(uninterrupted), _final_params(run_dir)
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=1e-6, msg=key)
    assert json.loads((run_dir / "test.json").read_text())["test_acc"] == pytest.approx(
        json.loads((uninterrupted / "test.json").read_text())["test_acc"])


@pytest.mark.slow
def test_sigterm_checkpoints_mid_epoch_exits_0_and_resumes_exactly(
        tiny_pack: Path, uninterrupted: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "preempted"
    steps = {"train.meta_batch": 2, "train.episodes_per_epoch": 32}  # 16 steps an epoch
    cmd = train_command(tiny_pack, run_dir, **steps)
    reference_dir = tmp_path / "reference"
    reference = run(train_command(tiny_pack, reference_dir, **steps))
    assert reference.returncode == 0, reference.stderr[-3000:]
    proc = subprocess.Popen(cmd, env=single_thread_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # the signal lands half-way through epoch 2, timed by the reference run's epoch 2 (a fixed
    # delay lands at an epoch's end once steps are fast, or before its first step under load)
    history = (reference_dir / "history.jsonl").read_text().splitlines()
    half_epoch_s = json.loads(history[1])["epoch_s"] / 2
    _wait_for(run_dir / "progress.json", lambda p: p["epoch"] >= 1, proc)
    time.sleep(half_epoch_s)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at epoch" in out
    stream = load_checkpoint(run_dir / "checkpoint.pt", None)["stream"]
    assert stream["step"] > 0  # stopped inside an epoch, not at its end
    assert json.loads((run_dir / "progress.json").read_text())["status"] == "preempted"
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, found = _final_params(reference_dir), _final_params(run_dir)
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_a_checkpoint_of_another_config_is_refused(tiny_pack: Path, uninterrupted: Path,
                                                   tmp_path: Path) -> None:
    cfg = tiny_config(tiny_pack, uninterrupted, **{"method.hn_width": 64})
    with pytest.raises(HmamlError, match=r"made by another config: method\.hn_width 32 -> 64"):
        train(cfg)
    moved = tmp_path / "moved"  # a folder copied elsewhere: the checkpoint still guards shapes
    moved.mkdir()
    (moved / "checkpoint.pt").write_bytes((uninterrupted / "checkpoint.pt").read_bytes())
    with pytest.raises(HmamlError, match=r"incompatible config.*method\.hn_width: 32 -> 64"):
        train(tiny_config(tiny_pack, moved, **{"method.hn_width": 64}))


def test_bad_configs_get_one_line_errors(tiny_pack: Path, tmp_path: Path) -> None:
    proc = run(train_command(tiny_pack, tmp_path / "r", **{"train.epochz": 3}))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "train.epochz" in proc.stderr
    proc = run(train_command(tmp_path / "nowhere", tmp_path / "r"))
    assert proc.returncode == 2 and "manifest" in proc.stderr


def test_milestone_tags() -> None:
    from hmaml.config import load_config

    cfg = load_config("omni_emnist1")
    assert milestones(cfg, 49) == {"milestone.warmup_end": 50}
    assert milestones(cfg, 50) == {"milestone.lr_drop_1": 51}
    assert milestones(cfg, 549) == {"milestone.switch_end": 550, "milestone.lr_drop_2": 550}


def test_evaluate_reproduces_the_test_and_reports_repeats(uninterrupted: Path) -> None:
    proc = run([sys.executable, str(ROOT / "launch" / "evaluate.py"), "--run",
                str(uninterrupted), "--repeats", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((uninterrupted / "evaluate.json").read_text())
    test = json.loads((uninterrupted / "test.json").read_text())
    means = [row["acc"] for row in summary["test_repeats"]]
    assert means[0] == pytest.approx(test["test_acc"])  # repeat 1 is the training's test
    assert summary["test_acc"] == pytest.approx(sum(means) / 2) and means[0] != means[1]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "mean": pytest.approx(sum(means) / 2), "std": pytest.approx(abs(means[0] - means[1]) / 2),
        "tested_p": 0.0}
    assert "mean ± std over 2 repeats of 8 episodes" in proc.stdout


def test_a_bf16_encoder_trains_and_its_precision_is_printed_and_tracked(
        tiny_pack: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "bf16"
    db = tmp_path / "mlruns.db"
    proc = run(train_command(tiny_pack, run_dir, **{"train.mixed_precision": "bf16",
                                                    "train.epochs": 1, "tracking.enabled": True,
                                                    "tracking.uri": f"sqlite:///{db}"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "encoder precision bf16 (train.mixed_precision)" in proc.stdout
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert MlflowClient(f"sqlite:///{db}").get_run(run_id).data.tags["precision"] == "bf16"
    history = json.loads((run_dir / "history.jsonl").read_text().splitlines()[0])
    assert history["train_loss"] == pytest.approx(history["train_loss"])  # finite, not NaN
    assert 0 < history["train_loss"] < 5 and json.loads(
        (run_dir / "test.json").read_text())["test_acc"] > 0


@pytest.mark.slow
def test_a_stop_signalled_to_one_rank_stops_every_rank(tiny_pack: Path, tmp_path: Path) -> None:
    """SLURM may signal one rank only: the ranks agree to stop at the same step, checkpoint and
    exit 0, instead of one rank leaving the other waiting in its next all-reduce."""
    import psutil

    run_dir = tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2",
           *train_command(tiny_pack, run_dir, **{"train.epochs": 6})[1:]]
    proc = subprocess.Popen(cmd, env=single_thread_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(run_dir / "progress.json", lambda p: p["epoch"] >= 1, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "RANK=1" in " ".join(f"{k}={v}" for k, v in p.environ().items() if k == "RANK")]
    assert len(ranks) == 1
    ranks[0].send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["status"] == "preempted" and progress["epoch"] < 6
    assert not (run_dir / "test.json").exists()


def test_accuracies_are_reported_in_percent(uninterrupted: Path) -> None:
    rows = [json.loads(line) for line in (uninterrupted / "history.jsonl").read_text()
            .splitlines()]
    assert all(0 <= row["train_acc"] <= 100 for row in rows)
    assert any(row["train_acc"] > 1 for row in rows)  # not a fraction: chance is 20 %


def test_evaluation_batches_fit_the_memory_budget_and_do_not_change_results(
        tiny_pack: Path, tmp_path: Path) -> None:
    """Unset, eval.tasks_per_batch comes from eval.memory_mb (the widest activation: 64
    channels of 28 px for 5 x 15 query images, 3 live, 4 bytes); the accuracies of a fixed
    episode list do not depend on it (fp32: with bf16, another group count of the grouped
    convolutions rounds otherwise, which can flip a near-tie of an untrained model)."""
    from accelerate import Accelerator

    from hmaml.precision import resolve_precision
    from hmaml.train.build import build_model, episodes_of, eval_tasks_per_batch, open_packs
    from hmaml.train.evaluate import evaluate

    cfg = tiny_config(tiny_pack, tmp_path / "run", **{"eval.tasks_per_batch": "null",
                                                      "train.mixed_precision": "no"})
    packs = open_packs(cfg)
    per_task = 5 * 15 * 64 * packs.image.size ** 2 * 4 * 3
    assert eval_tasks_per_batch(cfg, packs, 15) == int(512 * 2**20 // per_task)
    cfg.eval.memory_mb = 1
    assert eval_tasks_per_batch(cfg, packs, 15) == 1
    cfg.eval.memory_mb = 1e6
    assert eval_tasks_per_batch(cfg, packs, 15) == 100
    cfg.eval.tasks_per_batch = 3
    assert eval_tasks_per_batch(cfg, packs, 15) == 3

    accelerator = Accelerator(cpu=True)
    method = build_model(cfg, packs.image, resolve_precision(cfg.train.mixed_precision, CPU), CPU)
    method.set_tested()
    results = []
    for tasks in (1, 7):
        cfg.eval.tasks_per_batch = tasks
        loader = episodes_of(cfg, packs, cfg.data.test_split, 14, 15, rank=0, world=1)
        assert {len(b.indices) for b in loader} == ({1} if tasks == 1 else {7})
        results.append(evaluate(method, loader, accelerator).accuracies)
    assert results[0].tolist() == results[1].tolist()


def test_the_benchmark_times_an_evaluation_process_and_its_own_peak_memory(
        uninterrupted: Path) -> None:
    """The peak is the evaluation's own (VmHWM), not the benchmark's that forked it."""
    from hmaml.bench.train import evaluate_process

    ballast = torch.ones(1200 * 2**20 // 4)  # 1.2 GB in this process before the fork
    figures = evaluate_process(uninterrupted, 8)
    assert figures["evaluate_s"] > 0
    assert 100 < figures["evaluate_peak_mb"] < 1000, figures
    del ballast
