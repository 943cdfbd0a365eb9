"""A tiny glyph pack and a seconds-long training config for the training-system tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmaml.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hmaml.data.pack import pack_dataset

    out = tmp_path_factory.mktemp("packs") / "glyphs"
    pack_dataset("glyphs", None, out, classes=(20, 10, 10), per_class=20, progress=False)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny quickstart run (once per test module)."""
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    proc = run(train_command(tiny_pack, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def tiny_overrides(pack: Path, run_dir: Path, **extra: object) -> list[str]:
    """Overrides that make quickstart train in seconds; ``extra`` adds or replaces keys."""
    values: dict[str, object] = {
        "data.train_pack": pack, "run_dir": run_dir, "data.workers": 0,
        "train.epochs": 3, "train.episodes_per_epoch": 8, "train.meta_batch": 4,
        "train.grad_accum": 1,
        "train.lr_milestones": "[2]", "method.warmup_start": 1, "method.warmup_len": 1,
        "method.hn_width": 32, "eval.val_episodes": 4, "eval.test_episodes": 8,
        "eval.tasks_per_batch": 4, "tracking.enabled": False, "train.progress": False,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def tiny_config(pack: Path, run_dir: Path, **extra: object) -> Config:
    return load_config("quickstart", tiny_overrides(pack, run_dir, **extra))


def train_command(pack: Path, run_dir: Path, **extra: object) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "quickstart",
            *tiny_overrides(pack, run_dir, **extra)]


def single_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=single_thread_env(), **kwargs)
