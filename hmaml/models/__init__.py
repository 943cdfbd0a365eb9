"""Encoders chosen by name."""

from __future__ import annotations

import torch

from hmaml.errors import HmamlError
from hmaml.models.backbones import Conv4, Conv4Pool, Encoder, Pixels, ResNet10, ResNet12
from hmaml.models.init import INITS, init_encoder, load_encoder, save_encoder

ENCODERS: dict[str, type[Encoder]] = {
    "conv4": Conv4,
    "conv4pool": Conv4Pool,
    "resnet10": ResNet10,
    "resnet12": ResNet12,
    "pixels": Pixels,
}


def build_encoder(name: str, in_channels: int, image_size: int,
                  init: str = "authors") -> Encoder:
    """The encoder called ``name`` for images of ``in_channels`` x ``image_size`` px, its
    weights drawn by the ``init`` scheme (:data:`hmaml.models.init.INITS`).

    Its convolution weights are channels-last, like the activations (see ``Encoder.forward``):
    on CPU that makes a Conv4 forward pass about 1.7x faster.
    """
    try:
        cls = ENCODERS[name]
    except KeyError:
        raise HmamlError(f"model.encoder: unknown encoder {name!r}; "
                         f"choose one of {', '.join(ENCODERS)}") from None
    encoder = cls(in_channels, image_size)
    init_encoder(encoder, init)
    # torch's stub of Module.to lacks the memory_format keyword that it takes
    return encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


__all__ = ["ENCODERS", "INITS", "Encoder", "build_encoder", "load_encoder", "save_encoder"]
