"""The host allocator keeps freed memory: a large block freed stays mapped for the next one
(glibc; elsewhere it says that it changed nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hmaml.allocator import keep_freed_memory

PROBE = """
import json, re, sys
import torch
if sys.argv[1] == "keep":
    from hmaml.allocator import keep_freed_memory
    keep_freed_memory()
def rss_mb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
before = rss_mb()
block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
touched = rss_mb()
del block
print(json.dumps({"grown": touched - before, "kept": rss_mb() - before}))
"""


def probe(mode: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return json.loads(out)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "glibc" not in keep_freed_memory(),
                    reason="glibc only")
def test_a_freed_block_stays_for_the_next_step() -> None:
    assert "freed blocks kept for reuse (glibc" in keep_freed_memory()
    default, kept = probe("default"), probe("keep")
    assert default["grown"] > 60 and kept["grown"] > 60
    assert default["kept"] < 8  # glibc's default: the block went back to the OS (munmap)
    assert kept["kept"] > 60  # kept: the next step reuses the pages, no page faults
