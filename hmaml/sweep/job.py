"""One trial as a checkpointable submitit job, and how it survives preemption and timeouts.

Preemption and timeouts (SLURM, and submitit's local executor): submitit sends the job ``SIGUSR2``
(``signal_delay_s`` before the time limit, or at a preemption when the cluster forwards it) and
calls the callable's ``checkpoint()`` *inside that signal handler*, dumps the submission it returns,
requeues the job and exits the process at once (``sys.exit``), whatever the training was doing.
:class:`TrialJob` puts its own handler in front: the first signal only sets the flag that the
training loop polls at every step boundary, where it writes a checkpoint and returns; the job then
hands the signal to submitit, which requeues it. Should the loop not reach a step boundary within
half of ``signal_delay_s``, the signal is sent again and goes straight to submitit (requeue and
exit); the requeued trial then resumes from the checkpoint of its last finished epoch.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from hmaml.config import Config
from hmaml.files import write_json_atomic
from hmaml.sweep.report import TRIAL_JSON
from hmaml.sweep.spec import _first_line


def _job_environment() -> Any:
    """submitit's environment of the running job, or None outside a submitit job."""
    import submitit

    try:
        return submitit.JobEnvironment()
    except RuntimeError:
        return None


def _usr_signal() -> signal.Signals:
    """The signal submitit uses for preemption and timeouts (``SIGUSR2`` unless configured)."""
    import submitit

    return getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}")


def write_trial_state(run_dir: Path, state: str, error: str | None = None) -> None:
    """Record what the job is doing in ``run_dir/trial.json`` (atomically)."""
    env = _job_environment()
    payload = {"state": state, "host": socket.gethostname(), "pid": os.getpid(),
               "job_id": env.job_id if env is not None else None, "time": time.time(),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "error": error}
    write_json_atomic(run_dir / TRIAL_JSON, payload)


class TrialJob:
    """One trial as a checkpointable submitit callable (see the module docstring).

    Calling it trains ``cfg`` (resuming from ``cfg.run_dir``) as a child run of
    ``parent_run_id``; ``checkpoint()`` returns the submission that requeues it, which resumes
    from the run directory. ``request_stop()`` asks the training loop to checkpoint and return at
    its next step boundary.
    """

    def __init__(self, cfg: Config, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, grace_s: float = 45.0) -> None:
        self.cfg = cfg
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.grace_s = grace_s
        self._reset()

    def _reset(self) -> None:
        self._stop = False
        self._signum: int | None = None
        self._previous: Any = None
        self._timer: threading.Timer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "parent_run_id": self.parent_run_id, "tags": self.tags,
                "grace_s": self.grace_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpoint protocol: requeue a fresh copy; it resumes from ``run_dir``."""
        from submitit.helpers import DelayedSubmission

        fresh = TrialJob(self.cfg, self.parent_run_id, self.tags, self.grace_s)
        return DelayedSubmission(fresh, *args, **kwargs)

    def __call__(self) -> dict[str, Any]:
        from hmaml.train.loop import train

        env = _job_environment()
        if env is not None and env.num_tasks > 1:
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export()
        main = env is None or env.global_rank == 0
        run_dir = Path(self.cfg.run_dir)
        self._reset()
        if main:
            write_trial_state(run_dir, "running")
        state, error = "preempted", None  # unless train returns or raises an error
        self._arm()
        try:
            try:
                result = train(self.cfg, parent_run_id=self.parent_run_id,
                               stop_requested=self.stop_requested, tags=self.tags)
            finally:
                previous = self._disarm()
            state = str(result.get("status", "finished"))
        except Exception as exc:
            state, error = "failed", f"{type(exc).__name__}: {_first_line(exc)}"
            raise
        finally:  # also after submitit's own requeue exit (SystemExit) or Ctrl-C: resumable
            if main:
                write_trial_state(run_dir, state, error)
        if state == "preempted" and self._signum is not None:
            previous(self._signum, None)  # submitit: checkpoint(), requeue, exit
        return result

    def _arm(self) -> None:
        """Put :meth:`_on_signal` in front of submitit's handler of the preemption signal."""
        if threading.current_thread() is not threading.main_thread():
            return
        sig = _usr_signal()
        previous = signal.getsignal(sig)
        if callable(previous):  # only inside a submitit job (or a test standing in for one)
            self._previous = previous
            signal.signal(sig, self._on_signal)

    def _disarm(self) -> Any:
        """Hand the signal back to submitit (a pending one then goes to it), stop the timer."""
        previous, self._previous = self._previous, None
        if previous is not None:
            signal.signal(_usr_signal(), previous)
        if self._timer is not None:
            self._timer.cancel()
        return previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signum is None:  # first signal: checkpoint at the next step boundary
            self._signum = signum
            self._stop = True
            self._timer = threading.Timer(self.grace_s, os.kill, (os.getpid(), signum))
            self._timer.daemon = True
            self._timer.start()
            return
        self._previous(signum, frame)  # no step boundary in time: submitit requeues now

