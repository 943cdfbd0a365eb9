"""Few-shot methods behind one interface, built by name from the ``method`` config section."""

from __future__ import annotations

from typing import Any

from hmaml.errors import HmamlError
from hmaml.methods.base import Method, MethodOutput
from hmaml.methods.hypermaml import HyperMAML, maml_weight
from hmaml.methods.maml import MAML
from hmaml.methods.protonet import ProtoNet
from hmaml.models import Encoder

METHODS = ("hypermaml", "maml", "protonet")


def build_method(cfg: Any, encoder: Encoder, n_way: int) -> Method:
    """The method ``cfg.name`` with the hyperparameters of the ``method`` config section."""
    if cfg.name == "protonet":
        return ProtoNet(encoder, n_way)
    if cfg.name == "maml":
        return MAML(encoder, n_way, cfg.inner_steps, cfg.inner_lr, cfg.first_order, cfg.adapt)
    if cfg.name == "hypermaml":
        return HyperMAML(encoder, n_way, cfg.hn_depth, cfg.hn_width, cfg.enhance, cfg.switch,
                         cfg.warmup_start, cfg.warmup_len, cfg.inner_steps, cfg.inner_lr,
                         cfg.first_order)
    raise HmamlError(f"method.name: unknown method {cfg.name!r}; choose one of "
                     f"{', '.join(METHODS)}")


__all__ = [
    "MAML",
    "METHODS",
    "HyperMAML",
    "Method",
    "MethodOutput",
    "ProtoNet",
    "build_method",
    "maml_weight",
]
