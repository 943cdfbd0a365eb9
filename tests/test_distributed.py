"""The distributed plan, --dry-run for every shipped launch, and real multi-process training:
any world size, several nodes, DeepSpeed ZeRO-1/2 (gloo on CPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from hmaml.config import load_config
from hmaml.errors import HmamlError
from hmaml.train.checkpoint import load_checkpoint
from hmaml.train.engine import launch_from_file
from hmaml.train.plan import even_split, make_plan
from launch.train import main as train_main
from tests.train_fixtures import (
    ROOT,
    run,
    single_thread_env,
    tiny_overrides,
    tiny_pack,
    train_command,
)

__all__ = ["tiny_pack"]

ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
WORLDS = (1, 2, 3, 8, 16)


def test_even_split_differs_by_at_most_one() -> None:
    assert even_split(10, 3) == [4, 3, 3]
    assert even_split(10, 8) == [2, 2, 1, 1, 1, 1, 1, 1]
    assert even_split(4, 16) == [1] * 4 + [0] * 12


@pytest.mark.parametrize("world", [1, 3, 8, 16])
@pytest.mark.parametrize("accum", [1, 2, 3])
def test_the_plan_gives_every_task_of_an_epoch_to_exactly_one_rank(world: int,
                                                                   accum: int) -> None:
    cfg = load_config("quickstart", ["train.meta_batch=10", "train.episodes_per_epoch=100",
                                     f"train.grad_accum={accum}"])
    plan = make_plan(cfg, world)
    ranks = [plan.rank_steps(r) for r in range(world)]
    assert plan.step_tasks == [10] * 10
    seen = []
    for step in range(plan.steps):
        counts = {len(ranks[r][step]) for r in range(world)}
        assert len(counts) == 1  # every rank runs as many micro-batches (collectives match)
        assert counts.pop() <= accum
        for r in range(world):
            seen += [t for mb in ranks[r][step] if not mb.padding for t in mb.tasks]
            assert all(len(mb.tasks) == 1 for mb in ranks[r][step] if mb.padding)
    assert seen == list(range(100))  # in order: rank r's share follows rank r-1's
    assert plan.weight(0) == world / 10


def test_the_last_step_takes_the_remainder_and_its_own_weight() -> None:
    cfg = load_config("quickstart", ["train.meta_batch=32", "train.episodes_per_epoch=100",
                                     "train.grad_accum=1"])
    plan = make_plan(cfg, 3)
    assert plan.step_tasks == [32, 32, 32, 4]
    assert plan.weight(3) == 3 / 4
    assert plan.idle_share() == 0 and make_plan(cfg, 8).idle_share() > 0


def test_impossible_plans_are_refused_in_one_line() -> None:
    cfg = load_config("quickstart")
    with pytest.raises(HmamlError, match="spread evenly over 2 nodes"):
        make_plan(cfg, 3, nodes=2)
    with pytest.raises(HmamlError, match="processes=0"):
        make_plan(cfg, 0)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_config_plans_for_every_launch(experiment: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Every experiment x every accelerate file, and x world sizes 1, 2, 3, 8, 16."""
    for accelerate in ACCELERATE_CONFIGS:
        assert train_main(["--config", experiment, "--dry-run", "--accelerate-config",
                           str(accelerate)]) == 0, accelerate.name
        out = capsys.readouterr().out
        launch = launch_from_file(accelerate)
        engine = "single" if launch.processes == 1 and launch.engine == "DDP" else launch.engine
        assert f"processes: {launch.processes} " in out and f"engine {engine}," in out
        assert "steps per epoch:" in out and "dry run: nothing was trained" in out
    for world in WORLDS:
        nodes = 2 if world % 2 == 0 else 1
        assert train_main(["--config", experiment, "--dry-run", "--processes", str(world),
                           "--nodes", str(nodes)]) == 0, world
        assert f"processes: {world} ({nodes} node" in capsys.readouterr().out


def test_dry_run_refuses_fp16_under_deepspeed_on_cpu(tmp_path: Path) -> None:
    accelerate = tmp_path / "ds_cpu.yaml"
    accelerate.write_text((ROOT / "configs/accelerate/deepspeed_zero2.yaml").read_text()
                          .replace("use_cpu: false", "use_cpu: true"))
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                           "quickstart", "train.mixed_precision=fp16", "--dry-run",
                           "--accelerate-config", str(accelerate)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: train.mixed_precision=fp16 under DeepSpeed on CPU is not supported by DeepSpeed "
        "(dtype mismatch); use train.mixed_precision=auto or bf16 (autocast inside the model), "
        "or plain DDP"]


# ----------------------------------------------------------------------------- real training
# fp32: bf16 rounding depends on how many tasks share a kernel call, hence on the process count
E2E = {"method.name": "maml", "train.epochs": 1, "train.episodes_per_epoch": 20,
       "train.meta_batch": 10, "train.grad_accum": 2, "train.lr_milestones": "[]",
       "train.mixed_precision": "no"}


def torchrun(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), *args]


def params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt", None)["model"]


def assert_same_params(found: Path, expected: Path, rel: float) -> None:
    """All parameters together within ``rel`` (relative norm) of the expected ones.

    Adam steps ±lr on a gradient element whose sign is rounding noise, so float32 runs that
    only sum in another order differ: measured here, 3.5e-3 after 6 steps (DeepSpeed against
    DDP), while clipping at 1.0 instead of 0.05 gives 2.0e-2 and another data seed ~1. Exact
    equivalence is shown in float64 by tests/ddp_step.py.
    """
    a, b = params(found), params(expected)
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    diff = float(diff / torch.cat([b[k].flatten() for k in b]).norm())
    assert diff <= rel, f"relative difference {diff:.2e} > {rel:.0e}"


@pytest.mark.slow
def test_launch_train_trains_at_1_3_and_8_processes_to_the_same_parameters(
        tiny_pack: Path, tmp_path: Path) -> None:
    """The whole trainer (stream, plan, Adam, validation, test) under torchrun: 10 tasks per
    step over 3 or 8 ranks. MAML in float32: equal up to rounding. Each rank runs its
    micro-batches' tasks as one grouped convolution, and another group count picks other
    kernels with other rounding, which Adam turns into ±lr steps where a gradient element is
    near zero: measured 7.2e-3 (3 ranks) and 1.6e-2 (8 ranks); tasks of another seed give ~1."""
    single = tmp_path / "1"
    proc = run(train_command(tiny_pack, single, **E2E))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for world in (3, 8):
        run_dir = tmp_path / str(world)
        proc = run(torchrun("--standalone", "--nproc_per_node", str(world),
                            *train_command(tiny_pack, run_dir, **E2E)[1:]))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert re.search(rf"processes {world} on cpu\S* \(DDP\)", proc.stdout)
        assert_same_params(run_dir, single, rel=3e-2)
        assert json.loads((run_dir / "test.json").read_text())["test_episodes"] == 8


@pytest.mark.slow
def test_two_nodes_of_two_processes_make_the_update_of_one(tiny_pack: Path,
                                                            tmp_path: Path) -> None:
    """torchrun --nnodes 2 on one machine (static rendezvous on 127.0.0.1), two agents."""
    import socket

    script = ROOT / "tests" / "ddp_step.py"
    env = {**single_thread_env(), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt"), "hypermaml", "2",
                    str(tiny_pack)], env=env, check=True, capture_output=True, timeout=300)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [subprocess.Popen(torchrun("--nnodes", "2", "--nproc_per_node", "2", "--node_rank",
                                       str(rank), "--master_addr", "127.0.0.1", "--master_port",
                                       str(port), str(script), str(tmp_path / "four.pt"),
                                       "hypermaml", "2", str(tiny_pack)),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    one, four = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "four.pt")
    for key in one:
        torch.testing.assert_close(four[key], one[key], rtol=1e-9, atol=1e-11, msg=key)


# ----------------------------------------------------------------------------- DeepSpeed
DS = {**E2E, "train.epochs": 3, "train.episodes_per_epoch": 8, "train.meta_batch": 4,
      "train.max_grad_norm": 0.05, "train.lr_milestones": "[2]"}


def start_until_first_epoch(cmd: list[str], run_dir: Path) -> subprocess.Popen:
    """A launch in its own session; returns once its first epoch is done."""
    job = subprocess.Popen(cmd, env=single_thread_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    progress = run_dir / "progress.json"
    while not (progress.is_file() and json.loads(progress.read_text())["epoch"] >= 1):
        assert job.poll() is None, job.stderr.read()[-3000:] if job.stderr else ""
        time.sleep(0.05)
    return job


def rank_process(job: subprocess.Popen, rank: int) -> psutil.Process:
    """The one process of a launch that is the given rank (below the launcher's own)."""
    [process] = [p for p in psutil.Process(job.pid).children(recursive=True)
                 if p.environ().get("RANK") == str(rank)]
    return process


def accelerate_launch(config: Path, run_dir: Path, pack: Path, **extra: object) -> list[str]:
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
            str(config), "--main_process_port", "0", str(ROOT / "launch" / "train.py"),
            "--config", "quickstart", *tiny_overrides(pack, run_dir, **{**DS, **extra})]


def cpu_launch_file(tmp: Path, stage: int | None) -> Path:
    """A 2-process CPU launch file: DDP (stage None) or DeepSpeed ZeRO-``stage``."""
    if stage is None:
        text = (ROOT / "configs/accelerate/cpu2.yaml").read_text()
    else:
        text = ((ROOT / "configs/accelerate/deepspeed_zero2.yaml").read_text()
                .replace("zero_stage: 2", f"zero_stage: {stage}")
                .replace("num_processes: 8", "num_processes: 2")
                .replace("use_cpu: false", "use_cpu: true"))
    path = tmp / f"launch_{stage}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def ddp_reference(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    proc = run(accelerate_launch(cpu_launch_file(tmp, None), tmp / "run", tiny_pack))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"processes 2 on cpu\S* \(DDP\)", proc.stdout)
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_trains_like_ddp_with_its_optimizer_partitioned(
        tiny_pack: Path, tmp_path: Path, ddp_reference: Path, stage: int) -> None:
    """Clipping from train.max_grad_norm (0.05: every step clips), grad_accum=2 in one
    DeepSpeed step: any silent default would move the parameters away from DDP's."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    proc = run(accelerate_launch(cpu_launch_file(tmp_path, stage), run_dir, tiny_pack))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(rf"processes 2 on cpu\S* \(DeepSpeed ZeRO-{stage}\)", proc.stdout)
    state = load_checkpoint(run_dir / "checkpoint.pt", None)
    zero = run_dir / state["zero_state"]
    partitions = sorted(p.name for p in zero.rglob("*optim_states*"))
    assert len(partitions) == 2, partitions  # one optimizer partition per rank
    assert state["optimizer"] == {}
    engine = torch.load(next(zero.rglob("mp_rank_00_model_states.pt")), weights_only=False)
    assert engine["ds_config"]["zero_optimization"]["stage"] == stage
    assert engine["ds_config"]["gradient_clipping"] == DS["train.max_grad_norm"]
    assert engine["global_steps"] == 3 * 2  # 3 epochs of 2 steps: one DeepSpeed step each
    assert_same_params(run_dir, ddp_reference, rel=1e-2)


@pytest.mark.slow
def test_deepspeed_resumes_exactly_after_a_stop(tiny_pack: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")

    launch = cpu_launch_file(tmp_path, 2)
    straight = tmp_path / "straight"
    proc = run(accelerate_launch(launch, straight, tiny_pack, **{"train.epochs": 4}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stopped = tmp_path / "stopped"
    cmd = accelerate_launch(launch, stopped, tiny_pack, **{"train.epochs": 4})
    job = start_until_first_epoch(cmd, stopped)
    # SIGTERM to a rank, as SLURM sends it to the job's tasks (the launcher itself exits 1 on
    # a signal whatever its workers do); the ranks agree to stop at the same step
    rank_process(job, 0).send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    assert json.loads((stopped / "progress.json").read_text())["status"] == "preempted"
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch" in resumed.stdout
    assert_same_params(stopped, straight, rel=0)
    assert len(list(stopped.glob("zero-state-*"))) == 1  # older partitions are removed


# ----------------------------------------------------------------------------- a lost rank
LOST = {**E2E, "train.epochs": 4, "train.episodes_per_epoch": 16, "train.meta_batch": 4,
        "train.grad_accum": 1}


def start_ranks(run_dir: Path, pack: Path, **extra: object) -> subprocess.Popen:
    """torchrun of two ranks; returns once the first epoch is done."""
    return start_until_first_epoch(torchrun(
        "--standalone", "--nproc_per_node", "2",
        *train_command(pack, run_dir, **{**LOST, **extra})[1:]), run_dir)


@pytest.mark.slow
def test_under_torchrun_a_killed_rank_stops_the_survivor_at_once_and_a_rerun_resumes(
        tiny_pack: Path, tmp_path: Path) -> None:
    """``kill -9`` of rank 1 in epoch 2: rank 0's next collective fails, it prints one line
    naming the lost rank, torchrun ends at once; the same command again resumes from the last
    checkpoint and ends where an uninterrupted run of two ranks ends. (torchrun reports the
    failure it saw first, rank 1's SIGKILL or rank 0's status 3: tests/test_peers.py holds the
    3.)"""
    straight = tmp_path / "straight"
    proc = run(torchrun("--standalone", "--nproc_per_node", "2",
                        *train_command(tiny_pack, straight, **LOST)[1:]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    job = start_ranks(killed, tiny_pack)
    victim = rank_process(job, 1)
    victim.kill()
    start = time.monotonic()
    _, err = job.communicate(timeout=120)
    took = time.monotonic() - start
    assert took < 60 and job.returncode != 0
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert line.startswith(f"error: rank 0 of 2 lost rank 1 (pid {victim.pid} on ")
    assert "which is gone (in epoch " in line and "resumes from its last checkpoint" in line
    progress = json.loads((killed / "progress.json").read_text())
    assert progress["status"] == "failed" and progress["error"] == line[len("error: "):]
    resumed = run(torchrun("--standalone", "--nproc_per_node", "2",
                           *train_command(tiny_pack, killed, **LOST)[1:]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at epoch" in resumed.stdout
    assert_same_params(killed, straight, rel=0)


@pytest.mark.slow
def test_a_rank_that_stops_answering_is_named_once_train_dist_timeout_s_runs_out(
        tiny_pack: Path, tmp_path: Path) -> None:
    """SIGSTOP of rank 1 (a hung process, a frozen node): rank 0 waits no longer than the
    process group's timeout, then names the rank that did not answer."""
    job = start_ranks(tmp_path / "run", tiny_pack, **{"train.dist_timeout_s": 5})
    victim = rank_process(job, 1)
    victim.suspend()
    start = time.monotonic()
    # without the timeout rank 0 would wait for gloo's 30 min: end it all after 120 s
    watchdog = threading.Timer(120, os.killpg, (job.pid, signal.SIGKILL))
    watchdog.start()
    try:
        assert job.stderr is not None
        line = next((x for x in job.stderr if x.startswith("error: ")), "")
        took = time.monotonic() - start
    finally:
        watchdog.cancel()
        victim.resume()
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    assert line.startswith(f"error: rank 0 of 2 lost rank 1 (pid {victim.pid} on "), line
    assert "no answer within train.dist_timeout_s=5 s (in epoch " in line
    assert 4 < took < 60
