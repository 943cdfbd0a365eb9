"""The 2-D toy as a user runs it: HyperMAML fits all four task types, MAML with one step cannot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_toy2d_reproduces_the_papers_claim(tmp_path: Path) -> None:
    out = tmp_path / "toy.png"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "toy2d.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"maml_1", "maml_5", "hypermaml"}
    assert result["hypermaml"] >= 0.95
    assert result["hypermaml"] > result["maml_1"] + 0.1
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
