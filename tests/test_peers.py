"""A lost rank, named: which peers :class:`~hmaml.train.peers.Peers` blames for a failed
collective (gone, silent, or on another host), what the line says, its exit status, and a
trial job's requeue budget after one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from hmaml.config import load_config
from hmaml.errors import HmamlError, one_line_errors
from hmaml.sweep import job as job_module
from hmaml.sweep.job import TrialJob
from hmaml.train.peers import LostRankError, Peer, Peers, backend_said, collective_failure

HOST = socket.gethostname()
RESET = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                     "[127.0.0.1]:45447: Connection reset by peer")
TIMED_OUT = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] "
                         "Timed out waiting 5000ms for recv operation to complete")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def two_ranks(other: Peer) -> Peers:
    me = Peer(0, HOST, 1)
    return Peers(me, [me, other], timeout_s=300)


def test_a_dead_peer_on_this_host_is_named_as_gone() -> None:
    pid = dead_pid()
    exc = two_ranks(Peer(1, HOST, pid)).explain(RESET, "in epoch 3")
    assert isinstance(exc, LostRankError)
    assert str(exc) == (
        f"rank 0 of 2 lost rank 1 (pid {pid} on {HOST}), which is gone (in epoch 3; "
        "RuntimeError: Read error [127.0.0.1]:45447: Connection reset by peer); this rank "
        "stops too; started again, the run resumes from its last checkpoint")


def test_a_live_peer_that_did_not_answer_is_named_with_the_timeout() -> None:
    exc = two_ranks(Peer(1, HOST, os.getpid())).explain(TIMED_OUT, "in epoch 2")
    assert str(exc).startswith(f"rank 0 of 2 lost rank 1 (pid {os.getpid()} on {HOST}): no "
                               "answer within train.dist_timeout_s=300 s (in epoch 2; "
                               "RuntimeError: Timed out waiting 5000ms for recv operation")


def test_peers_on_another_host_are_named_by_host() -> None:
    exc = two_ranks(Peer(1, "node-b", 4242)).explain(RESET, "while the run started")
    assert "rank 0 of 2 lost contact with the ranks on node-b (while the run started;" \
        in str(exc)


def test_other_failures_and_a_world_of_one_pass_through_unchanged() -> None:
    other = ValueError("bad value")
    assert two_ranks(Peer(1, HOST, dead_pid())).explain(other, "in epoch 1") is other
    alone = Peers(Peer(0, HOST, 1), [Peer(0, HOST, 1)], 300)
    assert alone.explain(RESET, "in epoch 1") is RESET
    assert collective_failure(RESET) and collective_failure(TIMED_OUT)
    assert not collective_failure(RuntimeError("CUDA out of memory"))


def test_named_context_raises_the_named_error_from_the_backends() -> None:
    peers = two_ranks(Peer(1, HOST, dead_pid()))
    with pytest.raises(LostRankError, match="which is gone") as caught, \
            peers.named("while the run started"):
        raise RESET
    assert caught.value.__cause__ is RESET


def test_backend_said_keeps_the_first_sentence_without_the_source_location() -> None:
    assert backend_said(TIMED_OUT) == \
        "RuntimeError: Timed out waiting 5000ms for recv operation to complete"
    assert backend_said(RuntimeError("one. two. three")) == "RuntimeError: one"


def test_a_lost_rank_exits_3_and_bad_input_2(capsys: pytest.CaptureFixture[str]) -> None:
    def lost() -> int:
        raise LostRankError("rank 0 of 2 lost rank 1")

    def bad() -> int:
        raise HmamlError("train.epochs=0 must be >= 1")

    assert one_line_errors(lost)() == 3
    assert one_line_errors(bad)() == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: rank 0 of 2 lost rank 1", "error: train.epochs=0 must be >= 1"]


def test_a_trial_job_requeues_itself_while_its_lost_rank_budget_lasts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    queued: list[Any] = []
    monkeypatch.setattr(job_module, "requeue_this_job",
                        lambda submission: queued.append(submission) or "77_1")
    monkeypatch.setattr(job_module, "job_environment", lambda: object())
    lost = LostRankError("rank 0 of 2 lost rank 1")
    job = TrialJob(load_config("quickstart"), lost_rank_requeues=2)
    assert job.requeue_after(lost)
    [again] = queued
    assert isinstance(again, TrialJob) and again.lost_rank_requeues == 1
    assert again.cfg is job.cfg
    assert not TrialJob(job.cfg, lost_rank_requeues=0).requeue_after(lost)
    assert len(queued) == 1  # no budget: SLURM is not asked
    assert capsys.readouterr().err.splitlines() == [
        "error: rank 0 of 2 lost rank 1",
        "requeued SLURM job 77_1 to resume the trial (executor.max_lost_rank_requeues: "
        "1 left)",
        "error: rank 0 of 2 lost rank 1",
        "not requeued: executor.max_lost_rank_requeues used up"]


def test_outside_slurm_requeue_this_job_does_nothing() -> None:
    from hmaml.sweep.signals import requeue_this_job

    assert requeue_this_job(object()) is None
