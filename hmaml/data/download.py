"""Fetch public dataset archives: resumable, verified, atomically renamed, safely extracted.

A download streams into ``<file>.part`` (resumed with an HTTP ``Range`` request when it exists),
is checked against the registry's checksum (sha256, md5, or git's blob sha1 where that is the only
published one) and only then renamed to ``<file>``: a file under its final name is always complete
and verified. Where no checksum is known the registry says so and the computed sha256 is printed,
so that it can be pinned. Archives are extracted member by member into a scratch folder after a
check of every member (no absolute path, no ``..``, no link or device), then moved into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from hmaml.errors import HmamlError
from hmaml.log import show_bars

ENV_BASE = "HMAML_DOWNLOAD_BASE"
_CHUNK = 1 << 16
_ALGOS = ("sha256", "md5", "git-sha1")


@dataclass(frozen=True)
class Artifact:
    """One public file: where it lives, its checksum (``algo:hex`` or None), whether to unpack."""

    url: str
    checksum: str | None
    extract: bool = False
    note: str = ""

    @property
    def filename(self) -> str:
        return PurePosixPath(urlsplit(self.url).path).name


_GH = "https://raw.githubusercontent.com"
_VINYALS = f"{_GH}/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals"
_RAVI = f"{_GH}/twitter/meta-learning-lstm/master/data/miniImagenet"

REGISTRY: dict[str, tuple[Artifact, ...]] = {
    "omniglot": (
        Artifact(f"{_GH}/brendenlake/omniglot/master/python/images_background.zip",
                 "md5:68d2efa1b9178cc56df9314c21c6e718", note="Lake et al. 2015; MIT"),
        Artifact(f"{_GH}/brendenlake/omniglot/master/python/images_evaluation.zip",
                 "md5:6b91aef0f799c5bb55b94e3f2daec811", note="Lake et al. 2015; MIT"),
    ),
    "omniglot-splits": tuple(
        Artifact(f"{_VINYALS}/{name}.txt", f"sha256:{digest}", note="Vinyals et al. 2016 split")
        for name, digest in (
            ("train", "984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0"),
            ("val", "11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a"),
            ("test", "845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204"),
        )),
    "emnist": (
        # The only published identity of this file is its git blob hash in the DAOSL repository.
        Artifact("https://github.com/NanqingD/DAOSL/raw/master/data/emnist.zip",
                 "git-sha1:22d5568c110832859510c257372a0614fa44ea69",
                 note="EMNIST byclass subset used by HyperMAML (62 x 200); non-commercial use"),
    ),
    "cub": (
        Artifact("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                 "md5:97eceeb196236b17998738112f37df78", extract=True,
                 note="Wah et al. 2011; about 1.1 GB"),
    ),
    "mini-splits": tuple(
        Artifact(f"{_RAVI}/{name}.csv", f"sha256:{digest}", note="Ravi & Larochelle 2017 split")
        for name, digest in (
            ("train", "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f"),
            ("val", "5658a59921ca027ee76af92949869c5d6f41d77592ff3b18db325a9d10c893b9"),
            ("test", "2b7cfa78342995761a572a8158e539bc4e0a80f9bbd7d00c1e17a460fbbb93fa"),
        )),
}


# ----------------------------------------------------------------------------- checksums

def parse_checksum(text: str) -> tuple[str, str]:
    """``algo:hex`` -> (algo, lower-case hex); algo in sha256, md5, git-sha1."""
    algo, _, digest = text.partition(":")
    lengths = {"sha256": 64, "md5": 32, "git-sha1": 40}
    if algo not in lengths or not re.fullmatch(rf"[0-9a-fA-F]{{{lengths.get(algo, 0)}}}", digest):
        raise HmamlError(f"checksum {text!r}: expected one of {', '.join(_ALGOS)} as "
                         "'algo:hex', e.g. sha256:<64 hex digits>")
    return algo, digest.lower()


def file_digest(path: Path, algo: str) -> str:
    """Hex digest of a file; ``git-sha1`` is git's blob id (sha1 of 'blob <size>\\0' + data)."""
    if algo == "git-sha1":
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    else:
        digest = hashlib.new(algo)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- fetching

def resolve_url(url: str, base_url: str | None) -> str:
    """Replace scheme and host of ``url`` by ``base_url`` (a mirror keeping the same paths)."""
    if not base_url:
        return url
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return base_url.rstrip("/") + path


def _offline(url: str, exc: BaseException) -> HmamlError:
    reason = getattr(exc, "reason", exc)
    return HmamlError(f"cannot reach {url} ({reason}); offline? point --base-url or "
                      f"{ENV_BASE} at a mirror")


def fetch(url: str, dest: Path, checksum: str | None, *, progress: bool = True,
          timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify, then rename into place."""
    algo, want = parse_checksum(checksum) if checksum else ("sha256", None)
    if dest.exists():
        got = file_digest(dest, algo)
        if want is None:
            print(f"{dest}: already present (sha256 {got}; no published checksum to check)")
            return dest
        if got != want:
            raise HmamlError(f"{dest}: already present but its {algo} is {got}, not {want}; "
                             "delete it to download again")
        print(f"{dest}: already present and verified")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _download_part(url, part, progress=progress, timeout=timeout)
    got = file_digest(part, algo)
    if want is not None and got != want:
        part.unlink()
        raise HmamlError(f"{url}: downloaded file has {algo} {got}, expected {want}; removed it "
                         "(a changed upstream file or a broken mirror)")
    os.replace(part, dest)
    if want is None:
        print(f"{dest}: no checksum is known for this file; its sha256 is {got} "
              "(pin it to detect changes)")
    return dest


def _download_part(url: str, part: Path, *, progress: bool, timeout: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "hmaml-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and offset:  # the .part already holds the whole file
            return
        raise HmamlError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (URLError, OSError) as exc:
        raise _offline(url, exc) from exc
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the range: start over
        length = response.headers.get("Content-Length")
        total = int(length) + offset if length else None
        with open(part, "ab" if offset else "wb") as handle, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name[:-5], disable=not show_bars(progress), file=sys.stderr) as bar:
            try:
                while block := response.read(_CHUNK):
                    handle.write(block)
                    bar.update(len(block))
            except OSError as exc:
                raise HmamlError(f"{url}: download interrupted after {handle.tell()} bytes "
                                 f"({exc}); run the command again to resume") from exc


def download(name: str, to: str | Path, *, base_url: str | None = None,
             checksums: dict[str, str] | None = None, extract: bool | None = None,
             progress: bool = True, timeout: float = 60.0) -> list[Path]:
    """Fetch every file of registry entry ``name`` into ``to``; returns the local files.

    ``base_url`` (default: ``$HMAML_DOWNLOAD_BASE``) replaces the scheme and host of each URL.
    ``checksums`` maps a file name to an ``algo:hex`` that overrides the registry's.
    ``extract`` overrides the entry's own choice of unpacking its archives into ``to``.
    """
    if name not in REGISTRY:
        raise HmamlError(f"unknown download {name!r} (known: {', '.join(REGISTRY)})")
    base = base_url if base_url is not None else os.environ.get(ENV_BASE)
    overrides = checksums or {}
    folder = Path(to).expanduser()
    paths = []
    for art in REGISTRY[name]:
        dest = fetch(resolve_url(art.url, base), folder / art.filename,
                     overrides.get(art.filename, art.checksum), progress=progress,
                     timeout=timeout)
        if art.extract if extract is None else extract:
            safe_extract(dest, folder)
        paths.append(dest)
    return paths


# ----------------------------------------------------------------------------- extraction

def _check_name(archive: Path, name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or re.match(r"^[A-Za-z]:", name) or ".." in path.parts:
        raise HmamlError(f"{archive}: unsafe member {name!r} (absolute path or '..'); "
                         "refusing to extract")
    return path


def _zip_members(archive: Path) -> Iterator[tuple[str, bool, Callable[[Path], None]]]:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise HmamlError(f"{archive}: member {info.filename!r} is a link or device; "
                                 "refusing to extract")

            def write(target: Path, info: zipfile.ZipInfo = info) -> None:
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            yield info.filename, info.is_dir(), write


def _tar_members(archive: Path) -> Iterator[tuple[str, bool, Callable[[Path], None]]]:
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            if not (member.isfile() or member.isdir()):
                raise HmamlError(f"{archive}: member {member.name!r} is a link or device; "
                                 "refusing to extract")

            def write(target: Path, member: tarfile.TarInfo = member) -> None:
                src = tf.extractfile(member)
                assert src is not None  # a regular file always has a payload
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
            yield member.name, member.isdir(), write


def safe_extract(archive: str | Path, dest: str | Path,
                 members: Callable[[str], bool] | None = None) -> list[Path]:
    """Extract a zip or tar(.gz) into ``dest``; returns the top-level entries created.

    Members are written into a scratch folder inside ``dest`` and the top-level entries are
    renamed into place only when every member passed the checks, so a refused or broken archive
    leaves ``dest`` as it was. ``members`` keeps only the names it accepts. Top-level entries that
    already exist are kept as they are (an earlier complete extraction).
    """
    archive, dest = Path(archive), Path(dest)
    if zipfile.is_zipfile(archive):
        entries = _zip_members(archive)
    elif tarfile.is_tarfile(archive):
        entries = _tar_members(archive)
    else:
        raise HmamlError(f"{archive}: neither a zip nor a tar archive")
    dest.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        for name, is_dir, write in entries:
            rel = _check_name(archive, name)
            if not rel.parts or (members is not None and not members(name)):
                continue
            target = scratch.joinpath(*rel.parts)
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                write(target)
        created = []
        for entry in sorted(scratch.iterdir()):
            final = dest / entry.name
            if not final.exists():
                os.replace(entry, final)
                created.append(final)
        return created
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise HmamlError(f"{archive}: cannot extract ({exc})") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
