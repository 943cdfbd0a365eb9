"""HyperMAML training system.

``hmaml.load_run(RUN)`` (see :mod:`hmaml.predict`) is imported on first use, so that ``import
hmaml`` (and every ``hmaml --help``) does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_run"]


def __getattr__(name: str) -> Any:
    if name == "load_run":
        from hmaml.predict import load_run

        return load_run
    raise AttributeError(f"module 'hmaml' has no attribute {name!r}")
