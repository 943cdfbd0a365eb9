"""Atomic checkpoints for exact resume, readable with ``torch.load(weights_only=True)``.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values (dict, list,
tuple, str, int, float, bool, None), so loading it never unpickles code. It is written to a
temporary file in the same folder, fsynced and renamed over the old one: a crash mid-write leaves
the previous checkpoint untouched. A config fingerprint (see :func:`hmaml.config.fingerprint`)
guards against resuming with a model or optimizer of another shape.
"""

from __future__ import annotations

import io
import random
from collections import Counter, OrderedDict
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from hmaml.config import fingerprint_diff
from hmaml.errors import HmamlError
from hmaml.files import write_bytes_atomic
from hmaml.methods import Method

FORMAT = 1

#: What :func:`save_checkpoint` needs in ``state`` (extra keys of plain types are kept as well).
REQUIRED_KEYS = (
    "model",  # model state_dict
    "optimizer",  # optimizer state_dict
    "scheduler",  # LR scheduler state_dict
    "rng",  # capture_rng()
    "stream",  # data-stream position, e.g. {"epoch": 3, "step": 12}
    "epoch",  # epochs completed
    "best_val_acc",
    "best_epoch",
    "config_yaml",  # hmaml.config.to_yaml(cfg)
    "fingerprint",  # hmaml.config.fingerprint(cfg)
)

_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype)


def hmaml_version() -> str:
    try:
        return metadata.version("hmaml")
    except metadata.PackageNotFoundError:
        return "unknown"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format and hmaml version) atomically to ``path``."""
    path = Path(path)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {', '.join(missing)}")
    _check_plain(state, "state")
    payload = {**state, "format": FORMAT, "hmaml_version": hmaml_version()}
    return write_bytes_atomic(path, serialized(payload), durable=True)


def serialized(payload: dict[str, Any]) -> bytes:
    """``torch.save`` of ``payload`` in memory: written in one piece afterwards, so that a full
    disk is met by a plain write (a named error with the size needed) rather than inside torch's
    zip writer, and the run knows a checkpoint's size before the disk does."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_checkpoint(path: str | Path, expected_fingerprint: str | None) -> dict[str, Any]:
    """Read a checkpoint on CPU; refuse a missing, corrupt or incompatible one with HmamlError.

    ``expected_fingerprint=None`` skips the shape check (e.g. to read the stored config first).
    """
    path = Path(path)
    if not path.is_file():
        raise HmamlError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HmamlError(f"checkpoint {path} is corrupt or truncated ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise HmamlError(f"checkpoint {path} is not an hmaml checkpoint of format {FORMAT} "
                         f"(found {found!r})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise HmamlError(f"checkpoint {path} lacks {', '.join(missing)}")
    if expected_fingerprint is not None and state["fingerprint"] != expected_fingerprint:
        diff = "; ".join(fingerprint_diff(expected_fingerprint, state["fingerprint"]))
        raise HmamlError(f"checkpoint {path} was made by an incompatible config "
                         f"(checkpoint -> config: {diff})")
    return state


def capture_rng() -> dict[str, Any]:
    """This process's random states (python, numpy legacy global, torch CPU and CUDA)."""
    version, internal, gauss = random.getstate()
    # legacy=True gives MT19937's state as a tuple (a dict only where np.random.set_bit_generator
    # installed another bit generator, which hmaml never does)
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float],
                                              np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "python": (version, tuple(internal), gauss),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set every random state saved by :func:`capture_rng` (CUDA only when both have it)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that ``weights_only`` loading would reject, before anything is written."""
    if isinstance(value, (dict, OrderedDict, Counter)):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint {where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"checkpoint {where}: {type(value).__name__} cannot be loaded with "
                        f"weights_only=True; store tensors or plain values")


def load_model_state(model: torch.nn.Module, state_dict: dict[str, Any], path: str | Path
                     ) -> None:
    """Load weights, turning a layout mismatch (e.g. a checkpoint of another hmaml version)
    into a one-line error naming the checkpoint and the first keys at fault."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise HmamlError(f"checkpoint {path} does not fit this model: "
                         f"{detail.split(':', 1)[-1].strip()[:300]}") from None


def restore_best(method: Method, path: str | Path, expected_fingerprint: str) -> int:
    """Load a best-epoch checkpoint into ``method`` and put it in that epoch's state (the
    warm-up weight p it was validated with); returns the 0-based best epoch."""
    state = load_checkpoint(path, expected_fingerprint)
    load_model_state(method, state["model"], path)
    best_epoch = int(state["best_epoch"])
    method.set_epoch(best_epoch)
    return best_epoch
