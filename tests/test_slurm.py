"""Against a real SLURM (CI starts a one-node cluster with ``.ci/slurm``): a sweep is one job
array with MLflow child runs; ``scontrol requeue`` stops a trial at a step boundary, and the
requeued job resumes it to the very model an uninterrupted trial ends with; re-submission submits
nothing; a CPU trial of two tasks trains as a world of two, and submitit's time-limit signal stops
both ranks at one step before submitit requeues the job; a task of such a trial killed with
``kill -9`` ends the job at once, and the survivor's requeue resumes it to the uninterrupted
model; the sbatch template trains two ranks and requeues itself before its time limit; the "is
it still running" checks of :mod:`hmaml.sweep.signals` follow real jobs.

Requeued jobs wait about two minutes (``BeginTime``) before running again; the tests let them out
after two seconds with ``scontrol update StartTime=now``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hmaml.sweep import read_sweep_json
from hmaml.sweep.signals import (
    ACTIVE_SLURM_STATES,
    PreemptionGuard,
    slurm_job_state,
    still_running,
)
from hmaml.train.peers import process_alive
from tests.sweep_fixtures import FORCED_BAD, child_runs, search_body, write_sweep
from tests.train_fixtures import ROOT, tiny_overrides, tiny_pack

__all__ = ["tiny_pack"]  # the fixture, re-exported for pytest

# Four epochs of eight steps: long enough to be caught mid-run after its first epoch (~1 s each).
PREEMPTIBLE = {"overrides": {"train.epochs": 4, "train.episodes_per_epoch": 16}}
TIMEOUT_S = 240


def _slurm_down() -> str | None:
    """Why the SLURM tests cannot run here, or None."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM here (sinfo/sbatch not found; CI starts one with .ci/slurm)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                             timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    states = out.stdout.split()
    if out.returncode != 0:
        return f"sinfo failed: {(out.stderr.strip().splitlines() or ['?'])[0]}"
    if not any(s.rstrip("*~#$@^-") in ("idle", "mix", "alloc", "comp") for s in states):
        return f"no SLURM node is up (sinfo node states: {' '.join(states) or 'none'})"
    return None


SLURM_DOWN = _slurm_down()
needs_slurm = pytest.mark.skipif(SLURM_DOWN is not None, reason=str(SLURM_DOWN))


# --- helpers --------------------------------------------------------------------------------


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job`` of one job as a dict (JobState, Reason, Restarts, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(what: str, check: Callable[[], Any], jobs: tuple[str, ...] = (),
             timeout: float = TIMEOUT_S) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` and the jobs' states
    on timeout, or at once when all ``jobs`` have ended without ``check`` coming true."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        states = {job: slurm_job_state(job) for job in jobs}
        ended = bool(jobs) and not any(s in ACTIVE_SLURM_STATES for s in states.values())
        if ended or time.monotonic() > end:
            value = check()  # one last look: it may have come true as the job ended
            if value:
                return value
            why = "the jobs ended" if ended else f"{timeout:.0f} s"
            pytest.fail(f"gave up waiting for {what} ({why}); job states: {states}")
        time.sleep(0.2)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def first_epoch_done(run_dir: Path) -> bool:
    return read_json(run_dir / "progress.json").get("epoch", 0) >= 1


def release_when_requeued(job_id: str) -> None:
    """Wait until the job is back in the queue for its BeginTime delay, then let it out.

    Not at once: slurmd refuses to start a job whose credential it revoked in the same second
    ("Job credential revoked"), and the job would end FAILED.
    """
    wait_for(f"job {job_id} to be requeued", lambda: job_fields(job_id).get("Reason")
             == "BeginTime", jobs=(job_id,))
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True,
                   timeout=60)


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_ended_alike(trial: Path, calm: Path) -> None:
    """The trial's final and best model are ``torch.equal`` to those of ``calm`` (which ran
    through), and its test figures the same."""
    for name in ("checkpoint.pt", "best.pt"):
        expected, got = model_state(calm / name), model_state(trial / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    keys = ("test_acc", "test_ci", "best_val_acc", "best_epoch", "epoch")
    assert {k: read_json(trial / "test.json")[k] for k in keys} == \
        {k: read_json(calm / "test.json")[k] for k in keys}


def sweep_cli(*args: str) -> str:
    """``launch/sweep.py`` in this process; returns what it printed (it must exit 0)."""
    from launch.sweep import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(list(args))
    assert status == 0, out.getvalue()
    return out.getvalue()


def slurm_env(**extra: str) -> dict[str, str]:
    """The environment for sbatch: jobs inherit it (one thread per task, this Python first)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path, **extra}


# --- a sweep as one job array, preempted and requeued -----------------------------------------


@pytest.fixture(scope="module")
def requeued_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_pack: Path
                   ) -> dict[str, Any]:
    """Two identical trials as one job array; ``requeued`` gets ``scontrol requeue`` (SIGTERM)
    once its first epoch is done, ``calm`` runs through. Returns what the tests look at."""
    if SLURM_DOWN:
        pytest.skip(SLURM_DOWN)
    folder = tmp_path_factory.mktemp("slurm_sweep")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    path = write_sweep(folder, {
        **PREEMPTIBLE, "variants": [{"name": "calm", "overrides": {}},
                                    {"name": "requeued", "overrides": {}}],
        "executor": {"cluster": "slurm", "cpus_per_task": 1, "timeout_min": 10}},
        pack=tiny_pack, tracking_uri=uri)
    sweep_dir = folder / "out"
    started = time.monotonic()
    first = sweep_cli("--sweep", str(path), "--cluster", "slurm")
    jobs = read_sweep_json(sweep_dir)["submissions"][0]["jobs"]
    again_while_queued = sweep_cli("--sweep", str(path), "--cluster", "slurm")
    running_check = still_running(None, jobs["calm_seed=0"])

    victim = sweep_dir / "requeued_seed=0"
    wait_for("the first epoch of requeued_seed=0", lambda: first_epoch_done(victim),
             jobs=tuple(jobs.values()))
    subprocess.run(["scontrol", "requeue", jobs["requeued_seed=0"]], check=True, timeout=60)
    stopped = wait_for("requeued_seed=0 to record its stop", lambda: (
        read_json(victim / "trial.json").get("state") == "preempted"
        and read_json(victim / "progress.json")), jobs=tuple(jobs.values()))
    release_when_requeued(jobs["requeued_seed=0"])
    wait_for("both trials to finish", lambda: all(
        (sweep_dir / name / "test.json").is_file() for name in jobs),
        jobs=tuple(jobs.values()))
    wait_for("both jobs to end", lambda: not any(
        still_running(None, job) for job in jobs.values()), jobs=tuple(jobs.values()))
    return {"path": path, "uri": uri, "sweep_dir": sweep_dir, "jobs": jobs, "first": first,
            "again_while_queued": again_while_queued, "running_check": running_check,
            "stopped_progress": stopped, "seconds": time.monotonic() - started}


@pytest.mark.slow
@needs_slurm
def test_sweep_is_one_job_array_with_mlflow_child_runs(requeued_sweep: dict) -> None:
    jobs = requeued_sweep["jobs"]
    assert sorted(jobs.values()) == sorted(f"{jobs['calm_seed=0'].split('_')[0]}_{i}"
                                           for i in range(2))  # array id, tasks 0 and 1
    assert "queued as SLURM job" in requeued_sweep["first"]
    info = read_sweep_json(requeued_sweep["sweep_dir"])
    children = child_runs(requeued_sweep["uri"], info["parent_run_id"])
    assert sorted(c["name"] for c in children) == sorted(jobs)  # resumed: still one run
    assert {c["status"] for c in children} == {"FINISHED"}
    for child in children:
        assert child["tags"]["sweep.trial"] == child["name"]
        assert child["tags"]["world_size"] == "1"
        record = read_json(requeued_sweep["sweep_dir"] / child["name"] / "trial.json")
        assert (record["state"], record["cluster"], record["job_id"]) == (
            "finished", "slurm", jobs[child["name"]])


@pytest.mark.slow
@needs_slurm
def test_requeued_trial_resumes_to_the_same_model(requeued_sweep: dict) -> None:
    sweep_dir = requeued_sweep["sweep_dir"]
    calm, requeued = sweep_dir / "calm_seed=0", sweep_dir / "requeued_seed=0"
    assert requeued_sweep["stopped_progress"]["status"] == "preempted"  # a clean stop
    assert requeued_sweep["stopped_progress"]["epoch"] < 4
    assert read_json(requeued / "trial.json")["restarts"] == 1
    assert read_json(calm / "trial.json")["restarts"] == 0
    assert "resuming at epoch" in "".join(
        p.read_text() for p in (sweep_dir / "submitit").glob("*/*_0_log.out"))
    assert_ended_alike(requeued, calm)


@pytest.mark.slow
@needs_slurm
def test_resubmitting_submits_nothing_while_queued_or_once_finished(
        requeued_sweep: dict) -> None:
    assert "0 to run, 2 finished or running" in requeued_sweep["again_while_queued"]
    assert requeued_sweep["running_check"]  # scontrol: the queued job counts as running
    again = sweep_cli("--sweep", str(requeued_sweep["path"]), "--cluster", "slurm")
    assert "0 to run, 2 finished or running" in again and "queued as" not in again
    assert len(read_sweep_json(requeued_sweep["sweep_dir"])["submissions"]) == 1


# --- two CPU processes per trial, stopped by submitit's signal -------------------------------


@pytest.mark.slow
@needs_slurm
def test_cpu_trial_of_two_tasks_trains_as_world_of_two_and_survives_the_time_limit_signal(
        tmp_path: Path, tiny_pack: Path) -> None:
    """``tasks_per_node: 2`` without GPUs: two processes that form one gloo group; SIGUSR2 (what
    SLURM sends before the time limit) stops both at one step, submitit requeues, they resume."""
    from hmaml.sweep import submit
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    path = write_sweep(tmp_path, {**PREEMPTIBLE, "executor": {
        "cluster": "slurm", "gpus_per_node": 0, "tasks_per_node": 2, "cpus_per_task": 1,
        "timeout_min": 10, "signal_delay_s": 60}}, pack=tiny_pack, tracking_uri=uri)
    out = submit(path, echo=lambda _: None)
    [(name, job)] = out["submitted"].items()
    run_dir = tmp_path / "out" / name
    wait_for("the first epoch", lambda: first_epoch_done(run_dir), jobs=(job,))
    subprocess.run(["scancel", "--signal=USR2", job], check=True,
                   timeout=60)
    wait_for("the trial to record its stop",
             lambda: read_json(run_dir / "trial.json").get("state") == "preempted", jobs=(job,))
    release_when_requeued(job)
    wait_for("the trial to finish", lambda: (run_dir / "test.json").is_file(), jobs=(job,))
    wait_for("the job to end", lambda: not still_running(None, job), jobs=(job,))

    [child] = child_runs(uri, out["parent_run_id"])  # rank 1 logged nothing
    assert child["tags"]["world_size"] == "2" and child["status"] == "FINISHED"
    record = read_json(run_dir / "trial.json")
    assert (record["state"], record["restarts"]) == ("finished", 1)
    logs = {p.name: p.read_text() for p in (tmp_path / "out" / "submitit").glob("*/*_log.out")}
    rank0 = next(text for n, text in logs.items() if n.endswith("_0_log.out"))
    rank1 = next(text for n, text in logs.items() if n.endswith("_1_log.out"))
    assert "global_rank=1(2)" in rank1 and "processes 2 on cpu" not in rank1
    assert rank0.count("processes 2 on cpu") == 2  # the first run and the resumed one
    assert "resuming at epoch" in rank0
    progress = read_json(run_dir / "progress.json")
    assert (progress["status"], progress["epoch"]) == ("finished", 4)


def task_pid(job_id: str, rank: int) -> int:
    """The process of one task of a running job (``scontrol listpids``: the task's root, not
    its children), by the job's global task rank."""
    raw = job_fields(job_id)["JobId"]  # an array task's own id
    out = subprocess.run(["scontrol", "listpids", raw], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split("\n")[1:]
    pids = {int(f[0]) for f in (line.split() for line in out)
            if len(f) == 5 and f[2].isdigit() and f[4] == str(rank)}
    roots = [pid for pid in pids
             if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
             not in pids]
    assert len(roots) == 1, (job_id, rank, out)
    return roots[0]


@pytest.mark.slow
@needs_slurm
def test_a_killed_task_ends_the_job_at_once_and_the_requeued_trial_ends_as_if_uninterrupted(
        tmp_path: Path, tiny_pack: Path) -> None:
    """Two identical trials of two CPU tasks each. Task 1 of ``killed`` gets ``kill -9`` in its
    second epoch: task 0 names the lost rank, requeues the job, and ``--kill-on-bad-exit`` ends
    the step; the job leaves the node within 60 s, runs again, resumes, and ends with the very
    model of ``calm``, which nothing interrupted."""
    from hmaml.sweep import submit
    path = write_sweep(tmp_path, {**PREEMPTIBLE, "variants": [
        {"name": "calm", "overrides": {}}, {"name": "killed", "overrides": {}}],
        "executor": {"cluster": "slurm", "gpus_per_node": 0, "tasks_per_node": 2,
                     "cpus_per_task": 1, "timeout_min": 10}}, pack=tiny_pack)
    jobs = submit(path, echo=lambda _: None)["submitted"]
    sweep_dir, job = tmp_path / "out", jobs["killed_seed=0"]
    victim = sweep_dir / "killed_seed=0"
    wait_for("the first epoch of killed_seed=0", lambda: first_epoch_done(victim),
             jobs=tuple(jobs.values()))
    os.kill(task_pid(job, 1), signal.SIGKILL)
    killed = time.monotonic()
    wait_for("the job to leave the node", lambda: job_fields(job)["JobState"] not in (
        "RUNNING", "COMPLETING"), jobs=(job,), timeout=60)
    left_after = time.monotonic() - killed
    record = read_json(victim / "trial.json")
    release_when_requeued(job)
    wait_for("both trials to finish", lambda: all(
        (sweep_dir / name / "test.json").is_file() for name in jobs), jobs=tuple(jobs.values()))
    wait_for("both jobs to end", lambda: not any(
        still_running(None, j) for j in jobs.values()), jobs=tuple(jobs.values()))

    assert left_after < 60
    assert record["state"] == "requeued" and record["restarts"] == 0
    assert record["error"].startswith("LostRankError: rank 0 of 2 lost rank 1 (pid "), record
    assert "which is gone (in epoch " in record["error"]
    log = "".join(p.read_text() for p in (sweep_dir / "submitit").glob(f"{job}/*_0_log.*"))
    assert f"requeued SLURM job {job} to resume the trial (executor.max_lost_rank_requeues: " \
        "2 left)" in log
    assert "resuming at epoch" in log
    final = read_json(victim / "trial.json")
    assert (final["state"], final["restarts"], final["error"]) == ("finished", 1, None)
    assert_ended_alike(victim, sweep_dir / "calm_seed=0")


# --- an Optuna search ------------------------------------------------------------------------


@pytest.mark.slow
@needs_slurm
def test_a_search_runs_two_trials_at_a_time_prunes_the_bad_one_and_resubmits_nothing(
        tmp_path: Path, tiny_pack: Path) -> None:
    """Four trials, two at a time as SLURM jobs: the third (enqueued with a learning rate that
    learns nothing) is pruned from its own job; submitting the search again adds no trial."""
    import optuna

    from hmaml.sweep import submit

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    body = search_body(n_trials=4, parallel=2, **FORCED_BAD)
    body["executor"] = {"cluster": "slurm", "cpus_per_task": 1, "timeout_min": 10}
    path = write_sweep(tmp_path, body, pack=tiny_pack, tracking_uri=uri)
    lines: list[str] = []
    out = submit(path, echo=lines.append)
    assert list(out["submitted"]) == ["t000", "t001", "t002", "t003"]
    running, most = 0, 0
    for line in lines:  # the driver's log: never more than two trials at once
        if "] started as slurm job" in line:
            running += 1
            most = max(most, running)
        elif line.startswith("[t") and "started" not in line:
            running -= 1
    assert most == 2 and running == 0, lines
    info = read_sweep_json(tmp_path / "out")
    trials = optuna.load_study(study_name=info["search"]["study"],
                               storage=info["search"]["storage"]).trials
    states = [t.state.name for t in trials]
    assert states[:3] == ["COMPLETE", "COMPLETE", "PRUNED"] and states[3] != "FAIL", states
    assert read_json(tmp_path / "out" / "t002" / "trial.json")["state"] == "pruned"
    children = {c["name"]: c for c in child_runs(uri, out["parent_run_id"])}
    assert sorted(children) == ["t000", "t001", "t002", "t003"]
    assert children["t002"]["status"] == "KILLED"

    again = submit(path, echo=lambda _: None)
    assert again["submitted"] == {}
    assert len(optuna.load_study(study_name=info["search"]["study"],
                                 storage=info["search"]["storage"]).trials) == 4


# --- trials packed into one job (executor.trials_per_gpu) -----------------------------------


@pytest.mark.slow
@needs_slurm
def test_packed_trials_share_a_job_survive_its_time_limit_signal_and_end_as_if_alone(
        tmp_path: Path, tiny_pack: Path) -> None:
    """``trials_per_gpu: 2`` without GPUs: three identical trials become two jobs of two tasks
    (the last one idle), each task a world of one with its own folder and child run. SIGUSR2 to
    the first job stops both of its trials at a step; task 0 waits for its partner's checkpoint,
    then submitit requeues the job; both resume and end bit for bit as the uninterrupted one."""
    from hmaml.sweep import submit
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    path = write_sweep(tmp_path, {
        **PREEMPTIBLE, "variants": [{"name": n, "overrides": {}} for n in ("a", "b", "calm")],
        "executor": {"cluster": "slurm", "gpus_per_node": 0, "trials_per_gpu": 2,
                     "cpus_per_task": 1, "timeout_min": 10, "signal_delay_s": 60}},
        pack=tiny_pack, tracking_uri=uri)
    out = submit(path, echo=lambda _: None)
    jobs = out["submitted"]
    assert jobs["a_seed=0"] == jobs["b_seed=0"] != jobs["calm_seed=0"]
    packed, sweep_dir = jobs["a_seed=0"], tmp_path / "out"
    wait_for("the first epoch of both packed trials", lambda: all(
        first_epoch_done(sweep_dir / n) for n in ("a_seed=0", "b_seed=0")), jobs=(packed,))
    subprocess.run(["scancel", "--signal=USR2", packed], check=True, timeout=60)
    wait_for("both packed trials to record their stop", lambda: all(
        read_json(sweep_dir / n / "trial.json").get("state") == "preempted"
        for n in ("a_seed=0", "b_seed=0")), jobs=(packed,))
    release_when_requeued(packed)
    wait_for("every trial to finish", lambda: all(
        (sweep_dir / n / "test.json").is_file() for n in jobs), jobs=tuple(set(jobs.values())))
    wait_for("both jobs to end", lambda: not any(
        still_running(None, job) for job in set(jobs.values())), jobs=tuple(set(jobs.values())))

    children = child_runs(uri, out["parent_run_id"])
    assert sorted(c["name"] for c in children) == sorted(jobs)
    assert all(c["status"] == "FINISHED" and c["tags"]["world_size"] == "1" for c in children)
    for name, restarts in (("a_seed=0", 1), ("b_seed=0", 1), ("calm_seed=0", 0)):
        record = read_json(sweep_dir / name / "trial.json")
        assert (record["state"], record["restarts"], record["job_id"]) == (
            "finished", restarts, jobs[name])
        for file in ("checkpoint.pt", "best.pt"):
            expected, got = model_state(sweep_dir / "calm_seed=0" / file), \
                model_state(sweep_dir / name / file)
            assert all(torch.equal(expected[k], got[k]) for k in expected), (name, file)
    logs = {p.name: p.read_text() for p in (sweep_dir / "submitit").glob(f"{packed}/*_log.out")}
    assert len(logs) == 2
    for text in logs.values():  # each task trained alone, then resumed
        assert text.count("processes 1 on cpu") == 2 and "resuming at epoch" in text


# --- the sbatch template for one run without a sweep -----------------------------------------


@pytest.mark.slow
@needs_slurm
def test_sbatch_template_trains_two_ranks_and_requeues_itself_before_the_time_limit(
        tmp_path: Path, tiny_pack: Path) -> None:
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    args = tiny_overrides(tiny_pack, run_dir, **{"train.epochs": 6})
    job = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",
         str(ROOT / "launch" / "slurm_train.sbatch"), "--config", "quickstart", *args],
        cwd=ROOT, env=slurm_env(PYTHON=sys.executable), capture_output=True, text=True,
        check=True, timeout=60).stdout.strip()
    wait_for("the first epoch", lambda: first_epoch_done(run_dir), jobs=(job,))
    # what SLURM sends the batch script 120 s before the time limit (--signal=B:USR1@120)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=60)
    wait_for("the ranks to stop", lambda: read_json(run_dir / "progress.json").get("status")
             == "preempted", jobs=(job,))
    release_when_requeued(job)
    wait_for("the run to finish", lambda: (run_dir / "test.json").is_file(), jobs=(job,))
    wait_for("the job to end", lambda: not still_running(None, job), jobs=(job,))
    text = log.read_text()
    assert "2 tasks on 1 node(s)" in text and text.count("processes 2 on cpu") == 2
    assert "requeueing job" in text and "restart 1," in text and "resuming at epoch" in text
    assert read_json(run_dir / "test.json")["epoch"] == 6


# --- hmaml.sweep.signals ---------------------------------------------------------------------


@pytest.mark.slow
@needs_slurm
def test_job_state_and_still_running_follow_a_real_job(tmp_path: Path) -> None:
    job = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path / 'sleep.log'}",
                          "--wrap", "sleep 120"], capture_output=True, text=True, check=True,
                         timeout=60).stdout.strip()
    try:
        assert slurm_job_state(job) in ("PENDING", "CONFIGURING", "RUNNING")
        assert still_running(None, job)  # queued, no record yet
        assert still_running({"state": "preempted", "cluster": "slurm", "job_id": job})
    finally:
        subprocess.run(["scancel", job], check=True, timeout=60)
    wait_for("the job to be cancelled", lambda: slurm_job_state(job) == "CANCELLED", jobs=(job,))
    assert not still_running({"state": "running", "cluster": "slurm", "job_id": job})
    assert slurm_job_state("99999999") is None  # a job SLURM never had (or forgot)
    assert slurm_job_state(f"{job}_7") is None  # an array task it never had


def test_still_running_for_local_records() -> None:
    import socket

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        record = {"state": "running", "cluster": "local", "host": socket.gethostname(),
                  "pid": child.pid}
        assert still_running(record)
        assert not still_running({**record, "state": "preempted"})
        assert not still_running({**record, "host": "elsewhere"})
        assert not still_running({**record, "pid": os.getpid()})  # a debug sweep: this process
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid) and not still_running(record)
    assert not still_running(None)


def test_preemption_guard_stays_out_of_the_way_outside_a_submitit_job() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    guard = PreemptionGuard(grace_s=1.0)
    with guard:  # no callable handler installed: nothing to put itself in front of
        assert signal.getsignal(signal.SIGUSR2) is before
    assert not guard.requested()
    guard.hand_over()  # nothing came: nothing happens
