"""Small files written atomically: a reader sees the old content or the new, never a torn one."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object], *,
                 durable: bool = False) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place (the
    temporary file is removed if anything fails). ``durable`` also fsyncs the file and its
    folder, so that the new content survives a crash right after (checkpoints, weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    write_atomic(path, lambda handle: handle.write(text.encode()))


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    """:func:`write_text_atomic` of ``payload`` as indented JSON (non-JSON values as text)."""
    write_text_atomic(path, json.dumps(payload, indent=1, default=str))


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file is absent, unreadable or not one."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
