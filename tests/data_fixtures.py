"""Data test helpers: real-data paths, synthetic dataset trees, an HTTP server with Range."""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
OMNIGLOT = SHARED / "omniglot"
EMNIST_ZIP = SHARED / "emnist" / "emnist.zip"
RAVI = SHARED / "mini_imagenet" / "splits" / "ravi"

#: sha256 of the shared copies, as listed in shared/data/README.md
SHARED_SHA256 = {
    "images_background.zip": "40aeb46d4dc1eaf84e5613fa36f9b0d2348478fd6c61356c813608234e38d88a",
    "images_evaluation.zip": "6e680d4cdf97e47032881da4cd1e338e22e9029d14809fe37c93eeba963ed2a8",
    "emnist.zip": "7a9c9eb837f6b83d0166fc8859e5902aa0db4c5b20751180ac6bf144591cfbdd",
}


def need(path: Path) -> Path:
    """Skip the test (with the reason) when a shared real-data file is absent."""
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    """A small random image (JPEG or PNG by suffix)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def make_class_tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (40, 30),
                    suffix: str = ".jpg") -> Path:
    """``root/<class>/<i>.jpg`` with ``counts[class]`` random images per class."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / name / f"{i:03d}{suffix}", size, seed=1000 * c + i)
    return root


def make_cub_tree(root: Path, n_classes: int = 8, per_class: int = 3) -> Path:
    """``root/CUB_200_2011/images/<NNN.Name>/*.jpg`` like the real archive."""
    names = {f"{i + 1:03d}.Bird_{i}": per_class for i in range(n_classes)}
    make_class_tree(root / "CUB_200_2011" / "images", names, size=(50, 37))
    return root


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves files by the last component of the URL path, honouring ``Range: bytes=N-``."""

    files: ClassVar[dict[str, Path]] = {}
    ranges: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        path = self.files.get(self.path.split("?")[0].rsplit("/", 1)[-1])
        if path is None:
            self.send_error(404)
            return
        size = path.stat().st_size
        header = self.headers.get("Range")
        self.ranges.append(header)
        start = 0
        if header:
            start = int(re.fullmatch(r"bytes=(\d+)-", header).group(1))
            if start >= size:
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        with open(path, "rb") as handle:
            handle.seek(start)
            shutil.copyfileobj(handle, self.wfile)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve_files(files: dict[str, Path]) -> Iterator[tuple[str, list[str | None]]]:
    """An HTTP server on 127.0.0.1 (random port): yields (base URL, Range headers received)."""
    handler = type("Handler", (_RangeHandler,), {"files": dict(files), "ranges": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.ranges
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
