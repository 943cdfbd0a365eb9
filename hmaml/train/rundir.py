"""The run folder: every file a run writes, who may write them, and which config made them.

One :class:`RunDir` names every file (nothing else spells those names), checks that a re-run
uses the config that made the folder (:meth:`RunDir.check_config`), and holds the lock that lets
a single training process group own it (:meth:`RunDir.lock`). A folder is made by one config:
re-running with another is refused, naming the keys that differ, except for the keys of
:data:`MAY_CHANGE`, which only extend or observe a run, and LR milestones after the epochs the
run has trained.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from hmaml.config import Config, config_from_yaml, flatten, to_yaml
from hmaml.errors import HmamlError
from hmaml.files import disk_full, out_of_space, read_json, write_json_atomic, write_text_atomic

#: Keys that may differ when a run folder is re-used: to extend a run (train.epochs) or to
#: change only how it is watched. Anything else would mix two experiments in one folder.
MAY_CHANGE = ("train.epochs", "eval.every", "data.workers", "train.progress", "train.compile",
              "train.device", "eval.tasks_per_batch", "eval.memory_mb", "data.cache_dir",
              "data.read_retries", "data.read_timeout_s", "tracking.")
#: May change when every milestone the run has passed stays as it was: extending a run may add a
#: step down of the learning rate for the epochs it adds.
FUTURE_MILESTONES = "train.lr_milestones"
#: Keys that say where a run is, not what it is.
NOT_COMPARED = ("run_dir",)
ZERO_PREFIX = "zero-state-"  # DeepSpeed's per-rank optimizer partitions, one folder a position


class Status(str, Enum):
    """How a training call ended (also the ``status`` of ``progress.json``)."""

    RUNNING = "running"
    FINISHED = "finished"
    PREEMPTED = "preempted"
    PRUNED = "pruned"  # stopped by a search's pruner after a validation (final, not resumed)
    FAILED = "failed"


@dataclass
class TrainResult:
    """What :func:`hmaml.train.loop.train` returns; ``test`` is ``test.json`` when finished."""

    status: Status
    run_dir: str
    epoch: int
    mlflow_run_id: str | None = None
    test: dict[str, Any] | None = None


class RunDir:
    """The files of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def _file(self, name: str) -> Path:
        return self.path / name

    checkpoint = property(lambda self: self._file("checkpoint.pt"))
    best = property(lambda self: self._file("best.pt"))
    test = property(lambda self: self._file("test.json"))
    test_accuracies = property(lambda self: self._file("test_accuracies.json"))
    progress = property(lambda self: self._file("progress.json"))
    history = property(lambda self: self._file("history.jsonl"))
    config = property(lambda self: self._file("config.yaml"))
    lock_file = property(lambda self: self._file("run.lock"))
    mlflow_run_id = property(lambda self: self._file("mlflow_run_id.txt"))
    trial = property(lambda self: self._file("trial.json"))
    learning_curve = property(lambda self: self._file("learning_curve.png"))
    evaluation = property(lambda self: self._file("evaluate.json"))
    encoder = property(lambda self: self._file("encoder.pt"))

    # ------------------------------------------------------------------ records
    # Every reader and writer of a run's records goes through these: one place knows the files.
    def read_history(self) -> list[dict[str, Any]]:
        """The per-epoch rows of ``history.jsonl`` (none when the run has not finished an epoch)."""
        if not self.history.is_file():
            return []
        return [json.loads(line) for line in self.history.read_text().splitlines() if line]

    def write_history(self, rows: Sequence[dict[str, Any]]) -> None:
        """All rows of ``history.jsonl``, replaced atomically: a resumed run's history is its
        checkpoint's (rows after it dropped), so the file is rewritten whole, never appended to,
        and a crash mid-write cannot leave half a row."""
        write_text_atomic(self.history, "".join(json.dumps(row) + "\n" for row in rows))

    def read_progress(self) -> dict[str, Any] | None:
        """``progress.json``: epoch, epochs, status, best validation accuracy (None: no epoch
        recorded yet)."""
        return read_json(self.progress)

    def read_test(self) -> dict[str, Any] | None:
        """``test.json``, the finished run's summary (None until the run is tested)."""
        return read_json(self.test)

    def write_test(self, summary: dict[str, Any], repeats: list[list[float]]) -> None:
        """The test's per-episode accuracies (``test_accuracies.json``) and then its summary
        (``test.json``, whose presence marks the run finished)."""
        write_json_atomic(self.test_accuracies, {"repeats": repeats})
        write_json_atomic(self.test, summary)

    def write_evaluation(self, summary: dict[str, Any]) -> None:
        """``evaluate.json``: a re-test of the best checkpoint (``hmaml evaluate``)."""
        write_json_atomic(self.evaluation, summary)

    def read_trial(self) -> dict[str, Any] | None:
        """``trial.json``, the sweep job's record of the trial (None outside a sweep)."""
        return read_json(self.trial)

    def write_trial(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.trial, record)

    def zero_state(self, epoch: int, step: int) -> Path:
        return self._file(f"{ZERO_PREFIX}{epoch:06d}-{step:06d}")

    def zero_states(self) -> list[Path]:
        return sorted(self.path.glob(f"{ZERO_PREFIX}*"))

    def write_progress(self, epoch: int, epochs: int, status: Status,
                       best_val_acc: float | None, error: str | None = None) -> None:
        write_json_atomic(self.progress, {"epoch": epoch, "epochs": epochs,
                                          "status": status.value, "best_val_acc": best_val_acc,
                                          **({"error": error} if error else {})})

    # ------------------------------------------------------------------ identity
    def stored_config(self) -> Config | None:
        if not self.config.is_file():
            return None
        return config_from_yaml(self.config.read_text(), source=str(self.config))

    def check_config(self, cfg: Config) -> list[str]:
        """Refuse ``cfg`` if another config made this folder; returns the allowed changes
        (``key: old -> new``, keys of :data:`MAY_CHANGE`), empty for a new folder."""
        stored = self.stored_config()
        if stored is None:
            return []
        old, new = flatten(stored), flatten(cfg)
        differ = [k for k in sorted(set(old) | set(new))
                  if old.get(k) != new.get(k) and k not in NOT_COMPARED]
        refused = [k for k in differ if not k.startswith(MAY_CHANGE) and k not in MAY_CHANGE
                   and not (k == FUTURE_MILESTONES and self._future_only(
                       stored.train.lr_milestones, cfg.train.lr_milestones))]
        if refused:
            changes = ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in refused)
            raise HmamlError(f"{self.path} was made by another config: {changes}; pass "
                             "run_dir=... for a new run")
        return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in differ]

    def _future_only(self, old: Sequence[int], new: Sequence[int]) -> bool:
        """Whether two LR schedules agree on every milestone the run has passed (a milestone
        ``m`` acts after the ``m``-th epoch), so the new one only reshapes epochs to come."""
        done = (self.read_progress() or {}).get("epoch")
        if done is None:
            return False
        return sorted(m for m in old if m <= done) == sorted(m for m in new if m <= done)

    def write_config(self, cfg: Config) -> None:
        write_text_atomic(self.config, to_yaml(cfg))

    # ------------------------------------------------------------------ ownership
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Own the folder for the duration; a second owner is refused, naming the holder.

        A lock whose process is gone (same host), or that a requeued run of the same SLURM job
        left, is taken over with a warning.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.time()}
        while True:
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_json(self.lock_file) or {}
                if not self._stale(holder, me):
                    since = time.strftime("%Y-%m-%d %H:%M:%S",
                                          time.localtime(holder.get("since", 0)))
                    raise HmamlError(
                        f"{self.path} is in use by pid {holder.get('pid')} on "
                        f"{holder.get('host')} (since {since}); wait for it to end, or remove "
                        f"{self.lock_file} if that process is gone") from None
                warnings.warn(f"{self.path}: taking over the lock of pid {holder.get('pid')} "
                              f"on {holder.get('host')}, which is gone", stacklevel=3)
                with contextlib.suppress(FileNotFoundError):
                    self.lock_file.unlink()
                continue
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(me, handle)
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    self.lock_file.unlink()
                if out_of_space(exc):
                    raise disk_full(self.lock_file) from None
                raise
            break
        try:
            yield
        finally:
            if (read_json(self.lock_file) or {}).get("pid") == me["pid"]:
                with contextlib.suppress(FileNotFoundError):
                    self.lock_file.unlink()

    @staticmethod
    def _stale(holder: dict[str, Any], me: dict[str, Any]) -> bool:
        if not holder:  # written by a process killed between create and write
            return True
        if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
            return True  # the same SLURM job, requeued: its earlier run is over
        if holder.get("host") != me["host"]:
            return False  # cannot tell whether it lives: refuse
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False


def wall_time(summary: dict[str, Any]) -> str:
    """The run's wall time, saying how many processes it took and, when resumed from a
    checkpoint that did not record earlier processes' time, that only this process's is known."""
    # a test.json written before processes were counted holds one process's time in wall_s
    this = summary.get("process_wall_s", summary["wall_s"]) / 60
    processes = summary.get("processes", 1)
    if processes == 1:
        return f"wall time {this:.1f} min"
    if summary["wall_s"] is None:
        return (f"wall time {this:.1f} min in this process (resumed; the earlier processes' "
                "time was not recorded)")
    return (f"wall time {summary['wall_s'] / 60:.1f} min over {processes} processes "
            f"(this one {this:.1f} min)")


__all__ = ["MAY_CHANGE", "RunDir", "Status", "TrainResult", "wall_time"]
