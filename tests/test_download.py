"""Downloads through a local HTTP server: checksums, resume, offline message, safe extraction."""

from __future__ import annotations

import io
import socket
import tarfile
import zipfile

import pytest

from hmaml.data.download import (
    REGISTRY,
    download,
    fetch,
    file_digest,
    parse_checksum,
    resolve_url,
    safe_extract,
)
from hmaml.errors import HmamlError
from launch.pack import main
from tests.data_fixtures import EMNIST_ZIP, OMNIGLOT, SHARED_SHA256, need, serve_files


@pytest.fixture
def mirror():
    """The shared real archives, served by file name over HTTP with Range support."""
    files = {"images_background.zip": need(OMNIGLOT / "images_background.zip"),
             "images_evaluation.zip": need(OMNIGLOT / "images_evaluation.zip"),
             "emnist.zip": need(EMNIST_ZIP)}
    with serve_files(files) as served:
        yield served


def _pinned(*names):
    return {n: f"sha256:{SHARED_SHA256[n]}" for n in names}


def test_download_omniglot_and_emnist_through_a_mirror(tmp_path, mirror):
    base, ranges = mirror
    paths = download("omniglot", tmp_path, base_url=base, progress=False,
                     checksums=_pinned("images_background.zip", "images_evaluation.zip"))
    assert [p.name for p in paths] == ["images_background.zip", "images_evaluation.zip"]
    for path in paths:
        assert file_digest(path, "sha256") == SHARED_SHA256[path.name]
    (emnist,) = download("emnist", tmp_path, base_url=base, progress=False,
                         checksums=_pinned("emnist.zip"))
    assert emnist.read_bytes() == EMNIST_ZIP.read_bytes()
    assert ranges == [None, None, None]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "emnist.zip", "images_background.zip", "images_evaluation.zip"]
    # a second run finds the verified files and fetches nothing
    download("emnist", tmp_path, base_url=base, progress=False, checksums=_pinned("emnist.zip"))
    assert len(ranges) == 3


def test_wrong_checksum_is_refused_and_nothing_is_kept(tmp_path, mirror):
    # the shared Omniglot zips were rebuilt, so torchvision's md5s (the registry's) do not match
    with pytest.raises(HmamlError, match=r"images_background\.zip: downloaded file has md5"):
        download("omniglot", tmp_path, base_url=mirror[0], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_partial_download_is_resumed_with_a_range_request(tmp_path, mirror):
    base, ranges = mirror
    source = EMNIST_ZIP.read_bytes()
    (tmp_path / "emnist.zip.part").write_bytes(source[:3_000_000])
    download("emnist", tmp_path, base_url=base, progress=False, checksums=_pinned("emnist.zip"))
    assert ranges == ["bytes=3000000-"]
    assert (tmp_path / "emnist.zip").read_bytes() == source
    assert not (tmp_path / "emnist.zip.part").exists()


def test_complete_part_file_needs_no_transfer(tmp_path, mirror):
    base, ranges = mirror
    (tmp_path / "emnist.zip.part").write_bytes(EMNIST_ZIP.read_bytes())
    download("emnist", tmp_path, base_url=base, progress=False, checksums=_pinned("emnist.zip"))
    assert ranges == [f"bytes={EMNIST_ZIP.stat().st_size}-"]  # answered 416: nothing left
    assert file_digest(tmp_path / "emnist.zip", "sha256") == SHARED_SHA256["emnist.zip"]


def test_unknown_checksum_prints_the_sha256_to_pin(tmp_path, mirror, capsys):
    fetch(f"{mirror[0]}/x/emnist.zip", tmp_path / "emnist.zip", None, progress=False)
    assert SHARED_SHA256["emnist.zip"] in capsys.readouterr().out


def test_env_var_mirror_and_missing_file(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("HMAML_DOWNLOAD_BASE", mirror[0])
    download("emnist", tmp_path, progress=False, checksums=_pinned("emnist.zip"))
    assert (tmp_path / "emnist.zip").is_file()
    with pytest.raises(HmamlError, match=r"/no/such\.zip: HTTP 404"):
        fetch(f"{mirror[0]}/no/such.zip", tmp_path / "such.zip", None, progress=False)


def test_offline_gives_one_line_naming_the_url(tmp_path):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/brendenlake/omniglot/master/python/images_background.zip"
    with pytest.raises(HmamlError, match=rf"cannot reach {url} .*offline") as info:
        download("omniglot", tmp_path, base_url=f"http://127.0.0.1:{port}", progress=False)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_command_line_download(tmp_path, mirror, capsys):
    sha = SHARED_SHA256["emnist.zip"]
    assert main(["download", "emnist", "--to", str(tmp_path), "--base-url", mirror[0],
                 "--expect", f"emnist.zip=sha256:{sha}", "--quiet"]) == 0
    assert str(tmp_path / "emnist.zip") in capsys.readouterr().out
    assert main(["download", "emnist", "--to", str(tmp_path / "x"), "--base-url", mirror[0],
                 "--expect", "emnist.zip=sha256:" + "0" * 64, "--quiet"]) == 2
    assert "expected 0000" in capsys.readouterr().err


def test_registry_urls_and_checksums_are_well_formed():
    for name, artifacts in REGISTRY.items():
        assert artifacts, name
        for art in artifacts:
            assert art.url.startswith("https://") and art.filename
            if art.checksum is not None:
                parse_checksum(art.checksum)
    assert resolve_url("https://host.org/a/b.zip", "http://127.0.0.1:9/") == \
        "http://127.0.0.1:9/a/b.zip"
    with pytest.raises(HmamlError, match="checksum 'sha1:abc'"):
        parse_checksum("sha1:abc")


def test_git_blob_sha1_matches_git(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello\n")  # `git hash-object` of this content
    assert file_digest(path, "git-sha1") == "ce013625030ba8dba906f756967f9e9ca394464a"


# ----------------------------------------------------------------------------- extraction

def _zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path, add):
    with tarfile.open(path, "w:gz") as tf:
        add(tf)
    return path


def _file(tf, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_safe_extract_zip_and_tar(tmp_path):
    _zip(tmp_path / "a.zip", {"top/x/1.txt": b"one", "top/2.txt": b"two"})
    assert safe_extract(tmp_path / "a.zip", tmp_path / "out") == [tmp_path / "out" / "top"]
    assert (tmp_path / "out" / "top" / "x" / "1.txt").read_bytes() == b"one"
    _tar(tmp_path / "b.tgz", lambda tf: _file(tf, "CUB/images/a/1.jpg", b"jpg"))
    safe_extract(tmp_path / "b.tgz", tmp_path / "out")
    assert (tmp_path / "out" / "CUB" / "images" / "a" / "1.jpg").read_bytes() == b"jpg"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["CUB", "top"]


def test_zip_with_parent_member_is_refused(tmp_path):
    _zip(tmp_path / "evil.zip", {"good/1.txt": b"ok", "../evil": b"boom"})
    with pytest.raises(HmamlError, match=r"evil\.zip: unsafe member '\.\./evil'"):
        safe_extract(tmp_path / "evil.zip", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_tar_with_symlink_or_absolute_path_is_refused(tmp_path):
    def with_link(tf):
        _file(tf, "data/ok.txt")
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    _tar(tmp_path / "link.tgz", with_link)
    with pytest.raises(HmamlError, match=r"link\.tgz: member 'data/link' is a link"):
        safe_extract(tmp_path / "link.tgz", tmp_path / "out")
    _tar(tmp_path / "abs.tgz", lambda tf: _file(tf, "/tmp/abs.txt"))
    with pytest.raises(HmamlError, match=r"abs\.tgz: unsafe member '/tmp/abs\.txt'"):
        safe_extract(tmp_path / "abs.tgz", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
