"""Packs read from elsewhere: an HTTP server on 127.0.0.1 (healthy, cutting connections, stalling,
dying mid-shard), a ``pipe:`` command and an fsspec URL give exactly the local pack's data, and a
failing source stops with one line naming the URL after bounded retries."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest
import torch

from hmaml.data.eval_lists import eval_loader
from hmaml.data.format import MANIFEST_NAME, sha256_file
from hmaml.data.pack import verify_pack
from hmaml.data.store import PackStore, RemotePolicy, read_manifest
from hmaml.data.stream import EpisodeStream
from hmaml.errors import HmamlError
from hmaml.train.loop import train
from tests.train_fixtures import tiny_config, tiny_pack  # noqa: F401 -- fixture

FAST = RemotePolicy(retries=2, timeout=1.0, backoff=0.01)


class Faults:
    """What the server does wrong: cut ``cuts`` responses after ``cut_at`` bytes, or stall."""

    def __init__(self) -> None:
        self.cuts, self.cut_at, self.stall, self.requests = 0, 0, False, []


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single byte ranges (``bytes=N-``) and injected faults (a cut closes the
    connection once the file's byte ``cut_at`` is reached)."""

    faults: Faults

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        self.faults.requests.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.faults.stall and path.suffix == ".tar":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(5)
            return
        if self.faults.cuts and path.suffix == ".tar":
            self.faults.cuts -= 1
            self.wfile.write(body[: max(0, self.faults.cut_at - start)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def served(tiny_pack: Path) -> Iterator[tuple[str, Faults]]:  # noqa: F811
    faults = Faults()
    handler = partial(type("Handler", (RangeHandler,), {"faults": faults}),
                      directory=str(tiny_pack.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/{tiny_pack.name}", faults
    server.shutdown()
    server.server_close()


def batches(pack: object, **kw: object) -> list[torch.Tensor]:
    stream = EpisodeStream(pack, "train", n_way=5, n_shot=1, n_query=2, tasks_per_batch=2,
                           episodes=6, seed=3, buffer_mb=0.1, **kw)  # classes stream
    assert not stream.fits
    return [torch.cat([b.support_x.flatten(), b.query_x.flatten()]) for b in stream.batches(0, 1)]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_http_pack_streams_the_local_batches(tiny_pack: Path, served) -> None:  # noqa: F811
    url, faults = served
    local = batches(tiny_pack)
    assert read_manifest(url) == read_manifest(tiny_pack)
    assert same(batches(PackStore.of(url, policy=FAST)), local)
    assert any(path.endswith(".tar") for path, _ in faults.requests)  # read over HTTP
    # A cut connection is resumed at its byte (a range request), with the same result.
    faults.cuts, faults.cut_at, faults.requests = 2, 5000, []
    assert same(batches(PackStore.of(url, policy=FAST)), local)
    assert ("bytes=5000-" in {r for _, r in faults.requests})  # cut twice, third read heals
    # Evaluation lists and the full verification read the same bytes.
    remote = eval_loader(PackStore.of(url, policy=FAST), "val", n_way=5, n_shot=1, n_query=2,
                         n_episodes=4)
    here = eval_loader(tiny_pack, "val", n_way=5, n_shot=1, n_query=2, n_episodes=4)
    for r, h in zip(remote, here, strict=True):
        assert torch.equal(r.tasks.query_x, h.tasks.query_x)
    assert verify_pack(url, full=True) == read_manifest(tiny_pack)


def test_a_cut_that_never_heals_fails_naming_the_url(served) -> None:
    url, faults = served
    faults.cuts, faults.cut_at = 100, 1000
    with pytest.raises(HmamlError, match=rf"{url}/train-000000\.tar: read failed at byte 1000 "
                                         r"of \d+ after 2 retries"):
        batches(PackStore.of(url, policy=FAST))


def test_a_stalled_server_times_out_instead_of_hanging(served) -> None:
    url, faults = served
    faults.stall = True
    start = time.monotonic()
    with pytest.raises(HmamlError, match=rf"{url}/train-000000\.tar: read failed .*timed out"):
        batches(PackStore.of(url, policy=RemotePolicy(retries=1, timeout=0.5, backoff=0.01)))
    assert time.monotonic() - start < 4  # two reads of 0.5 s each, not the server's 5 s stall


SERVER = """
import os, sys
from pathlib import Path
from http.server import SimpleHTTPRequestHandler, HTTPServer
class H(SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if path.suffix == ".tar":
            self.wfile.write(data[:len(data) // 3]); self.wfile.flush()
            os._exit(0)  # the server dies mid-shard
        self.wfile.write(data)
s = HTTPServer(("127.0.0.1", 0), lambda *a: H(*a, directory=sys.argv[1]))
print(s.server_port, flush=True)
s.serve_forever()
"""


def test_a_server_dying_mid_shard_stops_the_run_with_the_url(tiny_pack: Path,  # noqa: F811
                                                             tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tiny_pack.parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{proc.stdout.readline().strip()}/{tiny_pack.name}"
        cfg = tiny_config(url, tmp_path / "run", **{"data.read_retries": 2,
                                                    "data.read_timeout_s": 2})
        start = time.monotonic()
        with pytest.raises(HmamlError, match=rf"^{url}/(train|val)-000000\.tar: read failed at "
                                             r"byte \d+ of \d+ after 2 retries \(.*refused.*\)$"):
            train(cfg)
        assert time.monotonic() - start < 30
        assert proc.wait(timeout=5) == 0  # it did die, mid-shard
    finally:
        proc.kill()


def test_a_training_run_from_http_equals_the_local_run(tiny_pack: Path, served,  # noqa: F811
                                                       tmp_path: Path) -> None:
    url, _ = served
    cache = tmp_path / "cache"
    local = train(tiny_config(tiny_pack, tmp_path / "local"))
    remote = train(tiny_config(url, tmp_path / "remote", **{"data.cache_dir": cache}))
    assert local.test["test_acc"] == remote.test["test_acc"]
    for name in ("history.jsonl",):
        rows = [json.loads(x) for x in (tmp_path / "local" / name).read_text().splitlines()]
        again = [json.loads(x) for x in (tmp_path / "remote" / name).read_text().splitlines()]
        assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in again]
    manifest = read_manifest(tiny_pack)
    folder = PackStore.of(url, cache_dir=cache).cache_folder(manifest)
    cached = sorted(p.name for p in folder.iterdir())
    assert cached == sorted([MANIFEST_NAME] + [s.file for split in manifest.splits.values()
                                               for s in split.shards])
    shard = folder / "train-000000.tar"
    assert sha256_file(shard) == sha256_file(tiny_pack / shard.name)


def test_a_cached_shard_is_checked_and_fetched_again_when_wrong(tiny_pack: Path,  # noqa: F811
                                                                served, tmp_path: Path,
                                                                caplog) -> None:
    url, faults = served
    store = PackStore.of(url, cache_dir=tmp_path, policy=FAST)
    local = batches(tiny_pack)
    assert same(batches(store), local)
    shard = store.cache_folder(read_manifest(tiny_pack)) / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # same size, other content: only the sha256 sees it
    shard.write_bytes(bytes(data))
    faults.requests = []
    assert same(batches(store), local)
    assert "shard sha256" in caplog.text and "fetching it again" in caplog.text
    assert any(path.endswith("train-000000.tar") for path, _ in faults.requests)
    faults.requests = []
    assert same(batches(store), local)  # now from the cache alone
    assert not any(path.endswith(".tar") for path, _ in faults.requests)


def test_pipe_and_fsspec_locations_read_the_same_pack(tiny_pack: Path) -> None:  # noqa: F811
    local = batches(tiny_pack)
    assert same(batches(f"pipe:cat {tiny_pack}/{{file}}"), local)
    memory = fsspec.filesystem("memory")
    for path in tiny_pack.iterdir():
        memory.pipe(f"/packs/glyphs/{path.name}", path.read_bytes())
    assert same(batches("memory://packs/glyphs"), local)
    with pytest.raises(HmamlError, match=r"pipe:cat /x: a pipe: pack location needs '\{file\}'"):
        PackStore.of("pipe:cat /x")
    with pytest.raises(HmamlError, match=r"pipe:false .*manifest\.json: read failed"):
        read_manifest(PackStore.of("pipe:false {file}", policy=FAST))


def test_a_missing_remote_pack_says_so(served) -> None:
    url, _ = served
    with pytest.raises(HmamlError, match=rf"{url}/nothing/manifest\.json: HTTP 404"):
        read_manifest(f"{url}/nothing")
