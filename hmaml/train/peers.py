"""The other ranks of a run, and the one line a rank prints when it loses one of them.

Why here: a rank that is killed (``kill -9``, the OOM killer, a lost node) leaves the others in
a collective. Over gloo a dead process closes its sockets, so the survivors' next collective
fails at once ("Connection reset by peer"); a rank that hangs or is stopped, or a node that
vanishes, is noticed only when the collective's timeout (``train.dist_timeout_s``) runs out.
Either way the survivor gets a backend error that says nothing of ranks; :class:`Peers` knows
every rank's host and process, so :meth:`Peers.explain` turns it into a
:class:`LostRankError` that names the rank lost and says what is kept. The survivor then ends
(exit status 3): under ``torchrun`` the agent ends the rest, under SLURM ``--kill-on-bad-exit``
does, and a sweep trial's job requeues itself
(:func:`hmaml.sweep.signals.requeue_this_job`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

from hmaml.errors import HmamlError, first_line

#: What gloo's messages say when a peer's connection broke or a collective timed out (gloo
#: raises plain RuntimeErrors; NCCL and the c10d stores raise torch.distributed.DistError).
_GLOO_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                 "Timed out waiting", "Broken pipe")


class LostRankError(HmamlError):
    """A rank of the run was lost; this one stops. Nothing is wrong with the input: the run
    resumes from its last checkpoint when it is started again (exit status 3, not 2)."""

    exit_status = 3


def process_alive(pid: int) -> bool:
    """Whether a process of this host with that id exists (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): kill(0) said it exists
        return True


def collective_failure(exc: BaseException) -> bool:
    """Whether an exception is a collective that failed for want of a peer."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _GLOO_MARKERS)


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    pid: int

    def __str__(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host})"


class Peers:
    """Every rank's host and process id, gathered once when the process group forms."""

    def __init__(self, me: Peer, everyone: list[Peer], timeout_s: float) -> None:
        self.me, self.everyone, self.timeout_s = me, everyone, timeout_s

    @classmethod
    def gather(cls, rank: int, world: int, timeout_s: float) -> Peers:
        me = Peer(rank, socket.gethostname(), os.getpid())
        if world == 1:
            return cls(me, [me], timeout_s)
        found: list[tuple[int, str, int] | None] = [None] * world
        dist.all_gather_object(found, (me.rank, me.host, me.pid))
        return cls(me, [Peer(*p) for p in found if p is not None], timeout_s)

    @contextlib.contextmanager
    def named(self, where: str) -> Iterator[None]:
        """Raise a collective's failure for want of a peer as a :class:`LostRankError`."""
        try:
            yield
        except Exception as exc:
            named = self.explain(exc, where)
            if named is exc:
                raise
            raise named from exc

    def explain(self, exc: BaseException, where: str) -> BaseException:
        """``exc`` as a :class:`LostRankError` naming the lost ranks when it is a collective
        that failed for want of a peer (``where``: e.g. "in epoch 3"); otherwise ``exc``."""
        if len(self.everyone) == 1 or isinstance(exc, LostRankError) or \
                not collective_failure(exc):
            return exc
        others = [p for p in self.everyone if p.rank != self.me.rank]
        here = [p for p in others if p.host == self.me.host]
        gone = [p for p in here if not process_alive(p.pid)]
        if gone:
            what = f"lost {', '.join(map(str, gone))}, which is gone"
        elif len(here) == len(others):  # all on this host and alive: hung, stopped or slow
            what = (f"lost {', '.join(map(str, others))}: no answer within "
                    f"train.dist_timeout_s={self.timeout_s:g} s")
        else:
            hosts = sorted({p.host for p in others if p.host != self.me.host})
            what = f"lost contact with the ranks on {', '.join(hosts)}"
        return LostRankError(
            f"rank {self.me.rank} of {len(self.everyone)} {what} ({where}; "
            f"{backend_said(exc)}); this rank stops too; started again, the run resumes from "
            "its last checkpoint")


def backend_said(exc: BaseException) -> str:
    """The gist of a backend's error: gloo's first sentence without its source location."""
    said = re.sub(r"^\[[^\]]*\]\s*", "", first_line(exc))
    return f"{type(exc).__name__}: {said.split('. ')[0].rstrip('.')[:160]}"


__all__ = ["LostRankError", "Peer", "Peers", "collective_failure", "process_alive"]
