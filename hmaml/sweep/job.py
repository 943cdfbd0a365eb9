"""One trial as a checkpointable submitit job: distributed set-up, trial record, requeue.

How the job reacts to preemption and time limits is :mod:`hmaml.sweep.signals`'s business; this
module wires it around the training loop. A job of several tasks (``tasks_per_node`` x ``nodes``)
runs one process per task; each exports the torch.distributed variables of its task before the
training loop builds its Accelerator, and only rank 0 writes the trial record (and, inside the
loop, files and MLflow). A packed job (:class:`PackedTrials`, ``executor.trials_per_gpu``) runs
K trials in its K tasks instead, each a world of one on the job's GPU.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from hmaml.config import Config
from hmaml.errors import first_line
from hmaml.sweep.signals import (
    PreemptionGuard,
    job_environment,
    requeue_this_job,
    restart_count,
)
from hmaml.train.peers import LostRankError, process_alive
from hmaml.train.rundir import RunDir, Status, TrainResult


def write_trial_state(rd: RunDir, state: str, error: str | None = None) -> None:
    """Record what this job is doing with the trial in ``run_dir/trial.json`` (atomically).

    The record says where the trial runs (host, process, SLURM or local job) so that a later
    submission can ask whether that job is still alive (:func:`~hmaml.sweep.signals.still_running`).
    """
    env = job_environment()
    rd.write_trial({
        "state": state, "cluster": env.cluster if env is not None else None,
        "job_id": env.job_id if env is not None else None, "host": socket.gethostname(),
        "pid": os.getpid(), "restarts": restart_count(), "time": time.time(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "error": error})


class TrialJob:
    """One trial as a checkpointable submitit callable.

    Calling it trains ``cfg`` (resuming from ``cfg.run_dir``) as a child run of
    ``parent_run_id``; ``checkpoint()`` returns the submission that requeues it, which resumes
    from the run directory. ``grace_s``: how long a preemption signal may wait for a step
    boundary before submitit requeues at once. ``lost_rank_requeues``: how often the job may
    still requeue itself after losing one of its ranks (SLURM).
    """

    def __init__(self, cfg: Config, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, grace_s: float = 45.0,
                 on_validation: Callable[[int, float], bool] | None = None,
                 lost_rank_requeues: int = 0) -> None:
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.grace_s = grace_s
        self.on_validation = on_validation  # a search trial's pruner (hmaml.sweep.search)
        self.lost_rank_requeues = lost_rank_requeues

    def fresh(self, lost_rank_requeues: int | None = None) -> TrialJob:
        """A new job of the same trial (what a requeue runs; it resumes from ``run_dir``)."""
        return TrialJob(self.cfg, self.parent_run_id, self.tags, self.grace_s,
                        self.on_validation, self.lost_rank_requeues
                        if lost_rank_requeues is None else lost_rank_requeues)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpoint protocol: requeue a fresh copy; it resumes from ``run_dir``."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self.fresh(), *args, **kwargs)

    def stop_requested(self, guard: PreemptionGuard) -> bool:
        """The training loop's stop predicate (a seam for tests)."""
        return guard.requested()

    def __call__(self) -> TrainResult:
        env = job_environment()
        if env is not None and env.num_tasks > 1:
            from submitit.helpers import TorchDistributedEnvironment

            # the job's own ranks win over variables inherited from the submitting shell
            TorchDistributedEnvironment().export(overwrite=True)
        result, guard = self.run(main=env is None or env.global_rank == 0)
        if result.status == Status.PREEMPTED:
            guard.hand_over()  # after submitit's signal: checkpoint(), requeue, exit
        return result

    def run(self, main: bool) -> tuple[TrainResult, PreemptionGuard]:
        """Train the trial (``main``: this process writes its record); the guard says whether a
        preemption signal came, which the caller hands over to submitit."""
        # lazy: torch and Accelerate stay out of launch/sweep.py's --help, --status, --dry-run
        from hmaml.train.loop import train

        rd = RunDir(self.cfg.run_dir)
        if main:
            write_trial_state(rd, "running")
        state, error = "preempted", None  # unless train returns or raises an error
        guard = PreemptionGuard(self.grace_s)
        try:
            with guard:
                result = train(self.cfg, parent_run_id=self.parent_run_id,
                               stop_requested=lambda: self.stop_requested(guard),
                               tags=self.tags, on_validation=self.on_validation)
            state = result.status.value
        except Exception as exc:
            state, error = "failed", f"{type(exc).__name__}: {first_line(exc)}"
            if isinstance(exc, LostRankError) and self.requeue_after(exc):
                state = "requeued"
                raise SystemExit(exc.exit_status) from exc  # no result: the job runs again
            raise
        finally:  # also after submitit's own requeue exit (SystemExit) or Ctrl-C: resumable
            if main:
                write_trial_state(rd, state, error)
        return result, guard

    def requeue_after(self, lost: LostRankError) -> bool:
        """Requeue this trial's SLURM job after a lost rank while requeues are left; whether
        it was. Done at once: ``srun --kill-on-bad-exit`` kills this task ``KillWait`` seconds
        after the other one died."""
        left = self.lost_rank_requeues
        job = requeue_this_job(self.fresh(left - 1)) if left > 0 else None
        print(f"error: {lost}", file=sys.stderr, flush=True)
        if job is not None:
            print(f"requeued SLURM job {job} to resume the trial (executor."
                  f"max_lost_rank_requeues: {left - 1} left)", file=sys.stderr, flush=True)
        elif left <= 0 and job_environment() is not None:
            print("not requeued: executor.max_lost_rank_requeues used up", file=sys.stderr,
                  flush=True)
        return job is not None


#: The variables of a torch.distributed launch: without them a process is a world of one
#: (Accelerate takes any of them, ``LOCAL_RANK=0`` included, for a launch of several).
_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                     "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


class PackedTrials:
    """Several trials in one job of as many tasks, sharing its GPU (``executor.trials_per_gpu``):
    task i trains trial i as a world of one, with its own run folder and MLflow child run.

    The job ends when its last trial does: task 0 waits for the others before it returns (or, at
    a preemption, until each has checkpointed or ``grace_s`` passed), because only task 0 requeues
    the job, and a requeue restarts every trial of it from its run folder.
    """

    def __init__(self, jobs: list[TrialJob]) -> None:
        self.jobs = jobs

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(PackedTrials([job.fresh() for job in self.jobs]), *args,
                                 **kwargs)

    def __call__(self) -> TrainResult | None:
        env = job_environment()
        rank = env.global_rank if env is not None else 0
        if rank >= len(self.jobs):  # the last job of an array may hold fewer trials than tasks
            return None
        for key in _LAUNCH_VARIABLES:
            os.environ.pop(key, None)
        result, guard = self.jobs[rank].run(main=True)
        if rank == 0:
            guard = self._wait_for_the_others(guard)
        guard.hand_over()  # a preemption: task 0 checkpoints the job and requeues it
        return result

    def _wait_for_the_others(self, own: PreemptionGuard) -> PreemptionGuard:
        """Task 0, its trial over: wait while another trial of the job still trains. A
        preemption (before or during the wait) gives them ``grace_s`` to checkpoint; the guard
        that saw it is returned for the hand-over."""
        others = [RunDir(job.cfg.run_dir) for job in self.jobs[1:]]
        grace = self.jobs[0].grace_s

        def wait(until: float | None, stop: Callable[[], bool]) -> None:
            while any(trial_running(rd) for rd in others) and not stop() and \
                    (until is None or time.monotonic() < until):
                time.sleep(_WAIT_S)

        if own.requested():
            wait(time.monotonic() + grace, lambda: False)
            return own
        with PreemptionGuard(grace) as waiting:
            wait(None, waiting.requested)
            if waiting.requested():
                wait(time.monotonic() + grace, lambda: False)
        return waiting


_WAIT_S = 1.0


def trial_running(rd: RunDir) -> bool:
    """Whether the trial's record says a live process of this host is training it."""
    record = rd.read_trial()
    return record is not None and record.get("state") == "running" and \
        record.get("host") == socket.gethostname() and process_alive(int(record.get("pid", 0)))
