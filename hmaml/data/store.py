"""Where a pack is read from: a local folder, an ``http(s)://`` URL, any fsspec URL (``s3://``,
``gs://``, ``memory://`` ...) or a ``pipe:`` command, through one reader.

Streaming from object storage or a web server is why one packs into WebDataset shards, so every
consumer (training stream, evaluation lists, ``pack verify``, ``hmaml predict``) opens the
manifest and the shards through :class:`PackStore`. Remote reads are bounded: each read has a
timeout, a failed or cut connection is re-opened at the byte it stopped at (an HTTP range
request; a ``pipe:`` command or an unseekable source is re-run and the bytes already read are
skipped) at most ``retries`` times in a row, then the run stops with one line naming the URL —
never a hang and never a silently shortened shard (the byte count must equal the manifest's).

With ``cache_dir`` a remote pack's shards are fetched once into ``cache_dir/<dataset>-<fp>/`` and
read locally from then on; a cached shard is used only when its size and sha256 match the
manifest, otherwise it is fetched again (with a warning).

A ``pipe:`` location is a command template: ``{file}`` is replaced by ``manifest.json`` or a
shard's name, e.g. ``pipe:aws s3 cp s3://bucket/packs/omniglot/{file} -``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec
from webdataset import gopen

from hmaml.data.format import (
    MANIFEST_NAME,
    PACK_VERSION,
    Manifest,
    ShardEntry,
    sha256_file,
    sha256_stream,
)
from hmaml.errors import HmamlError
from hmaml.files import write_atomic
from hmaml.log import LOGGER

_CHUNK = 1 << 20
_HTTP = ("http://", "https://")


def is_remote(location: str | Path) -> bool:
    """A URL (``scheme://``, except ``file://``) or a ``pipe:`` command, not a local folder."""
    text = str(location)
    return text.startswith("pipe:") or ("://" in text and not text.startswith("file://"))


@dataclass(frozen=True)
class RemotePolicy:
    """How remote files are read: ``timeout`` seconds per network operation, at most
    ``retries`` re-opens in a row without progress, waiting ``backoff`` x 2^k seconds."""

    retries: int = 3
    timeout: float = 60.0
    backoff: float = 1.0


class _Resuming(io.RawIOBase):
    """A remote file read front to back; a failed read re-opens it at the current offset."""

    def __init__(self, url: str, size: int | None, policy: RemotePolicy,
                 opener: Callable[[str, int, float], tuple[IO[bytes], int]]) -> None:
        self.url, self.size, self.policy, self.opener = url, size, policy, opener
        self.offset, self.failures = 0, 0
        self.stream: IO[bytes] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = len(buffer)
        if self.size is not None:
            want = min(want, self.size - self.offset)
        if want <= 0:
            return 0
        while True:
            try:
                if self.stream is None:
                    stream, skip = self.opener(self.url, self.offset, self.policy.timeout)
                    self.stream = stream
                    _discard(stream, skip, self.url)
                data = self.stream.read(want)
                if not data:
                    stream, self.stream = self.stream, None
                    stream.close()  # a pipe: raises here when its command failed
                    if self.size is None:
                        return 0
                    raise OSError(f"connection closed at byte {self.offset} of {self.size}")
            except (OSError, EOFError, ValueError) as exc:  # urllib, http.client, sockets, pipes
                self._failed(exc)
                continue
            n = len(data)
            buffer[:n] = data
            self.offset += n
            self.failures = 0
            return n

    def _failed(self, exc: BaseException) -> None:
        self._drop()
        self.failures += 1
        if self.failures > self.policy.retries:
            where = f" at byte {self.offset}" + (f" of {self.size}" if self.size else "")
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise HmamlError(f"{self.url}: read failed{where} after {self.policy.retries} "
                             f"retries ({detail})") from exc
        time.sleep(self.policy.backoff * 2 ** (self.failures - 1))

    def _drop(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(Exception):  # a dead connection or a failed pipe
                self.stream.close()
            self.stream = None

    def close(self) -> None:
        self._drop()
        super().close()


def _discard(stream: IO[bytes], count: int, url: str) -> None:
    while count > 0:
        data = stream.read(min(count, _CHUNK))
        if not data:
            raise OSError(f"{url}: ended while skipping to the resume offset")
        count -= len(data)


def _open_http(url: str, offset: int, timeout: float) -> tuple[IO[bytes], int]:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 403, 401, 410):
            raise HmamlError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise
    return response, offset if offset and response.status != 206 else 0


def _open_pipe(url: str, offset: int, timeout: float) -> tuple[IO[bytes], int]:
    return gopen(url, "rb"), offset  # WebDataset's opener: a failed command raises at the end


def _open_fsspec(url: str, offset: int, timeout: float) -> tuple[IO[bytes], int]:
    try:
        handle = fsspec.open(url, "rb").open()
    except ImportError as exc:
        raise HmamlError(f"{url}: {exc} (install the filesystem package it names, e.g. "
                         "pip install s3fs or gcsfs)") from None
    except FileNotFoundError:
        raise HmamlError(f"{url}: no such file") from None
    handle.seek(offset)
    return handle, 0


def _opener(url: str) -> Callable[[str, int, float], tuple[IO[bytes], int]]:
    if url.startswith(_HTTP):
        return _open_http
    if url.startswith("pipe:"):
        return _open_pipe
    return _open_fsspec


def open_location(where: Path | str, size: int | None, policy: RemotePolicy) -> IO[bytes]:
    """A local file (a ``Path``) or a remote one (a URL string, read under ``policy``; when
    ``size`` is given, fewer bytes are a failed read, not an end of file)."""
    if isinstance(where, Path):
        return open(where, "rb")
    return io.BufferedReader(_Resuming(where, size, policy, _opener(where)), _CHUNK)


@dataclass(frozen=True)
class PackStore:
    """A pack's location and how to read it (see the module docstring)."""

    location: str
    cache_dir: Path | None = None
    policy: RemotePolicy = field(default_factory=RemotePolicy)

    @classmethod
    def of(cls, location: str | Path | PackStore, **kw: Any) -> PackStore:
        if isinstance(location, PackStore):
            return location
        text = str(location)
        if text.startswith("file://"):
            text = text[len("file://"):]
        if text.startswith("pipe:") and "{file}" not in text:
            raise HmamlError(f"{text}: a pipe: pack location needs '{{file}}' where the file "
                             "name goes (manifest.json, shard names)")
        cache = kw.pop("cache_dir", None)
        return cls(text, Path(cache) if cache else None, **kw)

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    def where(self, name: str) -> str:
        """The path or URL of file ``name`` of the pack, as messages name it."""
        if self.location.startswith("pipe:"):
            return self.location.replace("{file}", name)
        if self.remote:
            return self.location.rstrip("/") + "/" + name
        return str(Path(self.location) / name)

    def open(self, name: str, size: int | None = None) -> IO[bytes]:
        """File ``name`` as a binary stream (remote: bounded retries; ``size`` checked)."""
        where = self.where(name)
        return open_location(Path(where) if not self.remote else where, size, self.policy)

    def manifest_bytes(self) -> bytes:
        """The manifest file's bytes (a missing local manifest says how to make one)."""
        if not self.remote and not Path(self.where(MANIFEST_NAME)).is_file():
            raise HmamlError(f"{self.where(MANIFEST_NAME)}: no manifest — pack a dataset there "
                             "first (hmaml pack ...)")
        with self.open(MANIFEST_NAME) as handle:
            return handle.read()

    def read_manifest(self) -> Manifest:
        """Load and check the manifest; refuse another pack version."""
        where = self.where(MANIFEST_NAME)
        raw = self.manifest_bytes()
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise HmamlError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        version = manifest.get("pack_version")
        if version != PACK_VERSION:
            raise HmamlError(f"{where}: pack_version {version!r} is not the supported "
                             f"{PACK_VERSION}; re-pack the dataset with this version of hmaml "
                             "(hmaml pack <dataset> ... --force)")
        return Manifest.parse(manifest, where, hashlib.sha256(raw).hexdigest())

    # ------------------------------------------------------------------------- the shard check

    def check_shard(self, shard: ShardEntry, manifest: Manifest, *,
                    full: bool = False) -> Path | str:
        """The one shard check (``pack verify`` and the episode streams alike). Returns where to
        read the shard: a local path, checked for its size (and sha256 with ``full``); a cached
        copy of a remote shard, checked for size and sha256; or, remote without a cache, its URL
        (size checked while it is read; hashed now with ``full``)."""
        name, size, digest = shard.file, shard.bytes, shard.sha256
        if not self.remote:
            path = Path(self.where(name))
            _check_file(path, size, digest if full else None, str(path))
            return path
        if self.cache_dir is not None:
            return self._cached(name, size, digest, manifest)
        if full:
            with self.open(name, size) as handle:
                _check_digest(sha256_stream(handle, _CHUNK), digest, self.where(name))
        return self.where(name)

    def cache_folder(self, manifest: Manifest) -> Path:
        """Where this pack's shards are cached: one folder per dataset and pack fingerprint."""
        assert self.cache_dir is not None
        return self.cache_dir / f"{manifest.dataset}-{manifest.fingerprint[:16]}"

    def _cached(self, name: str, size: int, digest: str, manifest: Manifest) -> Path:
        folder = self.cache_folder(manifest)
        path = folder / name
        if path.is_file():
            try:
                _check_file(path, size, digest, str(path))
                return path
            except HmamlError as exc:
                LOGGER.warning("cache: %s; fetching it again from %s", exc, self.where(name))
        folder.mkdir(parents=True, exist_ok=True)
        manifest_copy = folder / MANIFEST_NAME
        if not manifest_copy.is_file():
            write_atomic(manifest_copy, lambda f: f.write(self.manifest_bytes()))

        def fetch(out: IO[bytes]) -> None:
            with self.open(name, size) as handle:
                shutil.copyfileobj(handle, out, _CHUNK)

        write_atomic(path, fetch)
        try:
            _check_file(path, size, digest, self.where(name))
        except HmamlError:
            path.unlink()
            raise
        return path


def _check_file(path: Path, size: int, digest: str | None, label: str) -> None:
    """Exists, has ``size`` bytes and (when given) the sha256 ``digest``; else one line."""
    if not path.is_file():
        raise HmamlError(f"{label}: shard listed in the manifest is missing; re-pack the dataset")
    got = path.stat().st_size
    if got != size:
        raise HmamlError(f"{label}: {got} bytes but the manifest says {size} (truncated or "
                         "replaced shard); re-pack the dataset")
    if digest is not None:
        _check_digest(sha256_file(path), digest, label)


def _check_digest(actual: str, digest: str, label: str) -> None:
    if actual != digest:
        raise HmamlError(f"{label}: shard sha256 {actual} differs from the manifest's {digest} "
                         "(modified or corrupt); re-pack the dataset")


def read_manifest(location: str | Path | PackStore) -> Manifest:
    """The manifest of the pack at ``location`` (a folder, URL or :class:`PackStore`)."""
    return PackStore.of(location).read_manifest()


__all__ = ["PackStore", "RemotePolicy", "is_remote", "open_location", "read_manifest"]
