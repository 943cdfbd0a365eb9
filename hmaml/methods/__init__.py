"""Few-shot methods behind one interface, built by name from the ``method`` config section."""

from __future__ import annotations

from typing import Any

from hmaml.errors import HmamlError
from hmaml.methods.base import Method, MethodOutput
from hmaml.methods.hypermaml import HyperMAML, maml_weight
from hmaml.methods.maml import MAML
from hmaml.methods.protonet import ProtoNet
from hmaml.models import Encoder

#: ``method.name`` -> the class; each builds itself from its config section (``from_config``)
#: and owns its rules (milestones, the form it is tested in).
METHODS: dict[str, type[Method]] = {"hypermaml": HyperMAML, "maml": MAML, "protonet": ProtoNet}


def method_class(name: str) -> type[Method]:
    """The class of ``method.name``, or a one-line error naming the choices."""
    if name not in METHODS:
        raise HmamlError(f"method.name: unknown method {name!r}; choose one of "
                         f"{', '.join(METHODS)}")
    return METHODS[name]


def build_method(cfg: Any, encoder: Encoder, n_way: int) -> Method:
    """The method ``cfg.name`` with the hyperparameters of the ``method`` config section."""
    return method_class(cfg.name).from_config(cfg, encoder, n_way)


__all__ = [
    "MAML",
    "METHODS",
    "HyperMAML",
    "Method",
    "MethodOutput",
    "ProtoNet",
    "build_method",
    "maml_weight",
    "method_class",
]
