"""Preemption signals, requeues, and whether a trial's job is still alive.

Why one module: whether a trial stops cleanly, and whether submitting a sweep again could run a
trial twice, both hang on how SLURM and submitit behave; the rules live here, next to each other,
and ``tests/test_slurm.py`` checks them against a real SLURM.

How a trial job is stopped:

- **submitit's signal** (``SIGUSR2``): SLURM sends it ``signal_delay_s`` before the time limit
  (and at a preemption when ``SlurmctldParameters=preempt_send_user_signal``); submitit's handler
  calls the job's ``checkpoint()``, requeues the job (``scontrol requeue``) and exits the process
  *inside the handler*, whatever the training was doing. :class:`PreemptionGuard` puts its own
  handler in front: the first signal only sets the flag the training loop polls at every step
  boundary, where it writes a checkpoint and returns; :meth:`PreemptionGuard.hand_over` then gives
  the signal to submitit, which requeues. If no step boundary comes within ``grace_s``, the signal
  is sent again and goes straight to submitit; the requeued trial resumes from its last epoch.
- **SLURM's own** ``SIGTERM`` (``scontrol requeue``, preemption with ``PreemptMode=REQUEUE``,
  ``scancel``): the training loop's SIGTERM handler checkpoints at the next step boundary and the
  job ends; SLURM requeues it (it waits ``BeginTime``, about two minutes, before running it again
  with ``SLURM_RESTART_COUNT`` one higher) or not (``scancel``). ``KillWait`` must leave time to
  reach a step boundary.
- **a lost rank** (a task of a trial of several killed, its node lost): the job step's
  ``srun --kill-on-bad-exit`` ends the other tasks, and a survivor that saw the collective fail
  (:class:`~hmaml.train.peers.LostRankError`) first requeues the job itself
  (:func:`requeue_this_job`), within ``executor.max_lost_rank_requeues``; submitit requeues only
  after its own signal. The requeued trial resumes from its last checkpoint.

Without ``slurmdbd``, ``sacct`` (and hence submitit's job state) knows nothing, so a job's state
comes from ``scontrol show job``, which knows jobs until ``MinJobAge`` after they end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping
from types import FrameType, TracebackType
from typing import Any

from hmaml.errors import HmamlError
from hmaml.train.peers import process_alive

# SLURM job states in which the job may still run (or run again) the trial it was given.
ACTIVE_SLURM_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING",
    "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"})
# ... and those of a job SLURM took back to run again (another survivor requeued it first).
REQUEUED_SLURM_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
_JOB_STATE = re.compile(r"\bJobState=(\S+)")

Handler = Callable[[int, FrameType | None], Any]


def job_environment() -> Any:
    """submitit's environment of the running job, or None outside a submitit job."""
    import submitit

    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


def preemption_signal() -> signal.Signals:
    """The signal submitit uses for preemption and timeouts (``SIGUSR2`` unless configured)."""
    import submitit

    return getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")


def restart_count() -> int:
    """How often SLURM has requeued this job (0 outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from ``scontrol show job`` (e.g. ``PENDING``), None once SLURM forgot it.

    An array task is ``<array id>_<index>``. Raises HmamlError when SLURM cannot be asked: not
    knowing whether a job runs must not turn into running its trial twice.
    """
    try:
        out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id],
                             capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise HmamlError(f"SLURM job {job_id}: scontrol not found, cannot tell whether the job "
                         "still runs (run this where SLURM is installed)") from None
    except subprocess.TimeoutExpired:
        raise HmamlError(f"SLURM job {job_id}: scontrol show job did not answer in 60 s"
                         ) from None
    if out.returncode != 0:
        said = f"{out.stderr}\n{out.stdout}".strip()
        if "Invalid job id" in said or f"Job {job_id} not found" in said:  # job / array task
            return None
        why = (said.splitlines() or [f"exit status {out.returncode}"])[0]
        raise HmamlError(f"SLURM job {job_id}: scontrol show job failed: {why}")
    match = _JOB_STATE.search(out.stdout)
    return match.group(1) if match else None


def still_running(record: Mapping[str, Any] | None, slurm_job: str | None = None) -> bool:
    """Whether a trial may still be running (or about to run) somewhere.

    ``record`` is the trial's ``trial.json`` (written by the job that runs it), ``slurm_job`` the
    SLURM job it was last submitted as (a queued job has not written a record yet). A SLURM job
    counts while SLURM holds it in an active state: queued, running, or requeued and waiting to
    run again. A local job counts while its record says ``running`` and its process lives on
    this host (and is not this process: a debug sweep runs trials in-process).
    """
    jobs = {slurm_job} if slurm_job else set()
    if record and record.get("cluster") == "slurm" and record.get("job_id"):
        jobs.add(str(record["job_id"]))
    if any(slurm_job_state(job) in ACTIVE_SLURM_STATES for job in sorted(jobs)):
        return True
    if not record or record.get("cluster") == "slurm" or record.get("state") != "running":
        return False
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not pid:
        return False
    return int(pid) != os.getpid() and process_alive(int(pid))


class PreemptionGuard:
    """Turns submitit's preemption signal into a stop at the next step boundary (module doc).

    Use as a context around training; :meth:`requested` is the loop's stop predicate. Outside a
    submitit job (no callable handler installed) or off the main thread it does nothing.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self._submitit: Handler | None = None
        self._timer: threading.Timer | None = None

    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            sig = preemption_signal()
            previous = signal.getsignal(sig)
            if callable(previous):
                self._submitit = previous
                signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Give the signal back to submitit and stop the timer."""
        if self._submitit is not None:
            signal.signal(preemption_signal(), self._submitit)
        if self._timer is not None:
            self._timer.cancel()

    def hand_over(self) -> None:
        """If a signal came, pass it to submitit now: it checkpoints, requeues and exits."""
        if self.signum is not None and self._submitit is not None:
            self._submitit(self.signum, None)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:  # first signal: stop at the next step boundary
            self.signum = signum
            self._timer = threading.Timer(self.grace_s, os.kill, (os.getpid(), signum))
            self._timer.daemon = True
            self._timer.start()
            return
        assert self._submitit is not None
        self._submitit(signum, frame)  # no step boundary in time: submitit requeues now


def requeue_this_job(submission: Any) -> str | None:
    """Requeue the SLURM job this process runs in, to call ``submission`` when it runs again;
    returns the job id, or None outside a SLURM job.

    submitit's own requeue after its signal, for a failure it does not requeue (a lost rank):
    the job's pickle is replaced (keeping its time-limit countdown), then ``scontrol requeue``.
    Several survivors may all call it: a job SLURM already holds for its restart counts as
    requeued. Raises HmamlError when SLURM refuses.
    """
    from submitit.core import utils

    env = job_environment()
    if env is None or env.cluster != "slurm":
        return None
    path = env.paths.submitted_pickle
    old = utils.DelayedSubmission.load(path)
    new = utils.DelayedSubmission(submission)
    new.set_timeout(old._timeout_min, old._timeout_countdown)
    with utils.temporary_save_path(path) as tmp:
        new.dump(tmp)
    job = str(env.job_id)
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0 and slurm_job_state(job) not in REQUEUED_SLURM_STATES:
        said = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise HmamlError(f"scontrol requeue {job} failed: {said}")
    return job
