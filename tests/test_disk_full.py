"""A full disk is one named error (exit 2) that loses nothing, and a re-run after space is freed
resumes exactly. The filesystem is a real small tmpfs (mounting needs root, as in CI; the tests
skip, saying so, where mounting is refused)."""

from __future__ import annotations

import contextlib
import errno
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hmaml.config import load_config
from hmaml.data.pack import pack_dataset
from hmaml.files import DiskFullError, out_of_space, write_bytes_atomic
from hmaml.train.checkpoint import load_checkpoint
from hmaml.train.tracking import Tracker
from tests.train_fixtures import run, tiny_pack, train_command, uninterrupted  # noqa: F401

MB = 1 << 20
PAGE = 4096


@contextlib.contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``where`` (skips the test if mounting is refused)."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip() or 'not root'})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def test_a_short_write_of_torch_counts_as_out_of_space() -> None:
    """What torch.save's zip writer raises when its file hits a full disk (the OSError lost)."""
    assert out_of_space(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                                     "pos 615872 vs 615760"))
    assert out_of_space(OSError(28, "No space left on device"))
    assert not out_of_space(OSError(13, "Permission denied"))


def test_a_write_that_does_not_fit_names_file_size_and_space_and_keeps_the_old(
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 1 * MB) as small:
        target = small / "state.bin"
        write_bytes_atomic(target, b"old" * 1000)
        with pytest.raises(DiskFullError) as caught:
            write_bytes_atomic(target, bytes(2 * MB))
        message = str(caught.value)
        assert re.fullmatch(rf"no space left on device writing {re.escape(str(target))} "
                            rf"\(2\.0 MB needed, [01]\.\d MB free on {re.escape(str(small))}\)",
                            message), message
        assert target.read_bytes() == b"old" * 1000
        assert sorted(p.name for p in small.iterdir()) == ["state.bin"]  # no temporary file


def test_packing_onto_a_full_disk_is_named_and_leaves_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 256 * 1024) as small:
        with pytest.raises(DiskFullError, match=rf"no space left on device writing "
                                                rf"{re.escape(str(small / 'glyphs'))} "
                                                r"\(0\.\d MB free on "):
            pack_dataset("glyphs", None, small / "glyphs", classes=(20, 10, 10), per_class=20,
                         progress=False)
        assert list(small.iterdir()) == []


def test_training_onto_a_full_disk_stops_named_and_resumes_exactly_once_freed(
        tmp_path: Path, tiny_pack: Path, uninterrupted: Path) -> None:  # noqa: F811
    """Room for the first checkpoint and best.pt, not for the next checkpoint beside the old:
    exit 2 with the one line, the warning at start, no temporary file, the last checkpoint
    readable; after the disk grows the same command ends at the uninterrupted run's weights."""
    checkpoint = (uninterrupted / "checkpoint.pt").stat().st_size
    best = (uninterrupted / "best.pt").stat().st_size
    size = -(-(checkpoint + best + 128 * 1024) // PAGE) * PAGE
    with tmpfs(tmp_path / "small", size) as small:
        run_dir = small / "run"
        command = train_command(tiny_pack, run_dir)
        stopped = run(command)
        assert stopped.returncode == 2, stopped.stderr[-3000:]
        last = stopped.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: no space left on device writing "
                            rf"{re.escape(str(run_dir))}/(checkpoint|best)\.pt "
                            rf"\(\d+\.\d MB needed, \d+\.\d MB free on {re.escape(str(small))}\)",
                            last), last
        assert "Traceback" not in stopped.stderr
        assert "less than two checkpoints" in stopped.stdout
        assert not [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]
        kept = load_checkpoint(run_dir / "checkpoint.pt", None)
        assert 1 <= kept["epoch"] < 3

        resize(small, 64 * MB)
        resumed = run(command)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resuming at epoch {kept['epoch'] + 1}" in resumed.stdout
        ours = load_checkpoint(run_dir / "checkpoint.pt", None)["model"]
        reference = load_checkpoint(uninterrupted / "checkpoint.pt", None)["model"]
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_a_full_disk_under_the_tracking_store_is_named_and_the_run_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's store may lie on another disk than the run: tracking turns off with a warning
    that says why; the run's own files (and its errors) are the run folder's."""
    cfg = load_config("quickstart", [f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"])
    tracker = Tracker()
    tracker.start(cfg, tmp_path / "run")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tracker._client, "log_artifact", full)
    (tmp_path / "test.json").write_text("{}")
    with pytest.warns(RuntimeWarning, match=r"off for the rest of this run \(no space left on "
                                            r"device for its store; OSError"):
        tracker.log_artifact(tmp_path / "test.json")
    assert not tracker.active
