"""One trial as a checkpointable submitit job: distributed set-up, trial record, requeue.

How the job reacts to preemption and time limits is :mod:`hmaml.sweep.signals`'s business; this
module wires it around the training loop. A job of several tasks (``tasks_per_node`` x ``nodes``)
runs one process per task; each exports the torch.distributed variables of its task before the
training loop builds its Accelerator, and only rank 0 writes the trial record (and, inside the
loop, files and MLflow).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from hmaml.config import Config
from hmaml.files import write_json_atomic
from hmaml.sweep.signals import PreemptionGuard, job_environment, restart_count
from hmaml.sweep.spec import _first_line
from hmaml.train.rundir import RunDir, TrainResult


def write_trial_state(rd: RunDir, state: str, error: str | None = None) -> None:
    """Record what this job is doing with the trial in ``run_dir/trial.json`` (atomically).

    The record says where the trial runs (host, process, SLURM or local job) so that a later
    submission can ask whether that job is still alive (:func:`~hmaml.sweep.signals.still_running`).
    """
    env = job_environment()
    write_json_atomic(rd.trial, {
        "state": state, "cluster": env.cluster if env is not None else None,
        "job_id": env.job_id if env is not None else None, "host": socket.gethostname(),
        "pid": os.getpid(), "restarts": restart_count(), "time": time.time(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "error": error})


class TrialJob:
    """One trial as a checkpointable submitit callable.

    Calling it trains ``cfg`` (resuming from ``cfg.run_dir``) as a child run of
    ``parent_run_id``; ``checkpoint()`` returns the submission that requeues it, which resumes
    from the run directory. ``grace_s``: how long a preemption signal may wait for a step
    boundary before submitit requeues at once.
    """

    def __init__(self, cfg: Config, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, grace_s: float = 45.0) -> None:
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.grace_s = grace_s

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpoint protocol: requeue a fresh copy; it resumes from ``run_dir``."""
        from submitit.helpers import DelayedSubmission

        fresh = TrialJob(self.cfg, self.parent_run_id, self.tags, self.grace_s)
        return DelayedSubmission(fresh, *args, **kwargs)

    def stop_requested(self, guard: PreemptionGuard) -> bool:
        """The training loop's stop predicate (a seam for tests)."""
        return guard.requested()

    def __call__(self) -> TrainResult:
        # lazy: torch and Accelerate stay out of launch/sweep.py's --help, --status, --dry-run
        from hmaml.train.loop import train

        env = job_environment()
        if env is not None and env.num_tasks > 1:
            from submitit.helpers import TorchDistributedEnvironment

            # the job's own ranks win over variables inherited from the submitting shell
            TorchDistributedEnvironment().export(overwrite=True)
        main = env is None or env.global_rank == 0
        rd = RunDir(self.cfg.run_dir)
        if main:
            write_trial_state(rd, "running")
        state, error = "preempted", None  # unless train returns or raises an error
        guard = PreemptionGuard(self.grace_s)
        try:
            with guard:
                result = train(self.cfg, parent_run_id=self.parent_run_id,
                               stop_requested=lambda: self.stop_requested(guard),
                               tags=self.tags)
            state = result.status.value
        except Exception as exc:
            state, error = "failed", f"{type(exc).__name__}: {_first_line(exc)}"
            raise
        finally:  # also after submitit's own requeue exit (SystemExit) or Ctrl-C: resumable
            if main:
                write_trial_state(rd, state, error)
        if state == "preempted":
            guard.hand_over()  # after submitit's signal: checkpoint(), requeue, exit
        return result
