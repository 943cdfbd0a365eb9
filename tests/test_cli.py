"""Every command turns bad input into one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("argv", "culprit"), [
    (["bench.py", "loader", "--shards", "/nonexistent/pack"], "/nonexistent/pack/manifest.json"),
    (["evaluate.py", "--run", "/nonexistent/run"], "/nonexistent/run"),
    (["sweep.py", "--status", "/nonexistent/sweep"], "/nonexistent/sweep"),
    (["train.py", "--config", "no_such_config"], "no_such_config"),
    (["pack.py", "verify", "/nonexistent/pack"], "/nonexistent/pack"),
    (["pretrain.py", "--config", "mini_pretrain", "pretrain.batch_size=0"],
     "pretrain.batch_size=0"),
    (["tables.py", "norms", "--maml", "/nonexistent/m", "--hypermaml", "/nonexistent/h"],
     "/nonexistent/m"),
    (["evaluate.py", "--run", "/nonexistent/run", "--override", "method.hn_width=8"],
     "method.hn_width"),
])
def test_bad_input_is_one_line_naming_the_culprit(argv: list[str], culprit: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / argv[0]), *argv[1:]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0]
