"""Files written atomically: a reader sees the old content or the new, never a torn one; a full
disk is a named error, not a library's traceback.

A write that runs out of space (``ENOSPC``, a quota's ``EDQUOT``, or the short write torch's zip
writer reports as ``unexpected pos``) raises :class:`DiskFullError`: one line naming the file,
the bytes it needed and the space left on its filesystem. The temporary file is removed and the
previous content stays in place, so a re-run after space is freed starts from it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from hmaml.errors import HmamlError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
MB = 1 << 20


class DiskFullError(HmamlError):
    """A write found no space left on its filesystem (or quota); nothing was half written."""


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a write that found no space."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return True
        # torch's zip writer turns a short write of its file into this (the OSError is lost)
        if isinstance(seen, RuntimeError) and "unexpected pos" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes free to this user on the filesystem of ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(path: str | Path, needed: int | None = None) -> DiskFullError:
    """The error for a write of ``path`` that found no space (``needed``: its size, if known)."""
    free = f"{free_bytes(path) / MB:.1f} MB free on {mount_point(path)}"
    need = f"{needed / MB:.1f} MB needed, " if needed is not None else ""
    return DiskFullError(f"no space left on device writing {path} ({need}{free})")


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object], *,
                 durable: bool = False, size: int | None = None) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place (the
    temporary file is removed if anything fails). ``durable`` also fsyncs the file and its
    folder, so that the new content survives a crash right after (checkpoints, weights). Out of
    space: :class:`DiskFullError` (``size``: the bytes being written, for its message)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, Exception) and out_of_space(exc):
            raise disk_full(path, size) from None
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes, *, durable: bool = False) -> Path:
    """:func:`write_atomic` of bytes made beforehand (a full disk's message knows their size)."""
    return write_atomic(path, lambda handle: handle.write(data), durable=durable, size=len(data))


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
    write_bytes_atomic(path, text.encode())


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
