"""Where an encoder's first weights come from: an initialisation scheme (``model.init``) or an
encoder file written by pre-training (``model.init_from``).

The scheme changes accuracy by points at the paper's budgets, so it is a named config value
rather than whatever the layer constructors happen to draw.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hmaml.errors import HmamlError
from hmaml.files import write_bytes_atomic
from hmaml.models.norm import TaskBatchNorm2d, TaskConv2d

ENCODER_FORMAT = "hmaml-encoder-1"

#: ``authors``: the HyperMAML / CloserLook code's ``init_layer``: every convolution weight
#: ~ normal(0, sqrt(2 / (k_h * k_w * C_out))) (He, fan-out), BatchNorm weight 1 and bias 0.
#: ``torch``: PyTorch's constructor defaults (Kaiming-uniform with a = sqrt(5), std ~= 0.024 for
#: a 64 -> 64 3x3 convolution against the authors' ~= 0.059).
INITS = ("authors", "torch")


@torch.no_grad()
def init_encoder(encoder: nn.Module, scheme: str) -> None:
    """Re-draw ``encoder``'s weights in place with ``scheme`` (one of :data:`INITS`)."""
    if scheme == "torch":
        return
    if scheme != "authors":
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {', '.join(INITS)}")
    for module in encoder.modules():
        if isinstance(module, TaskConv2d):
            kh, kw = module.kernel_size
            module.weight.normal_(0.0, math.sqrt(2.0 / (kh * kw * module.out_channels)))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, TaskBatchNorm2d):
            module.weight.fill_(1.0)
            module.bias.zero_()


def save_encoder(path: str | Path, encoder: nn.Module, name: str, in_channels: int,
                 image_size: int, info: dict[str, Any] | None = None) -> None:
    """Write ``encoder``'s weights with what they fit (its name, input channels and size), so
    that :func:`load_encoder` can refuse them for another encoder; atomic and durable."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    payload = {"format": ENCODER_FORMAT, "encoder": name, "in_channels": in_channels,
               "image_size": image_size, "state_dict": state, "info": info or {}}
    buffer = io.BytesIO()  # saved whole first: a full disk then names the size needed
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue(), durable=True)


def load_encoder(encoder: nn.Module, path: str | Path, name: str, in_channels: int,
                 image_size: int) -> dict[str, Any]:
    """Copy the weights of an encoder file (``model.init_from``) into ``encoder`` exactly;
    refuse a file of another encoder, input or shapes, naming them. Returns its ``info``."""
    path = Path(path)
    key = f"model.init_from={path}"
    if not path.is_file():
        raise HmamlError(f"{key}: no such file; make it with launch/pretrain.py (e.g. "
                         "python launch/pretrain.py --config mini_pretrain)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: not an encoder file
        raise HmamlError(f"{key}: not a readable encoder file ({type(exc).__name__})") from exc
    if not isinstance(saved, dict) or saved.get("format") != ENCODER_FORMAT:
        raise HmamlError(f"{key}: not an hmaml encoder file (write it with launch/pretrain.py)")
    if saved["encoder"] != name:
        raise HmamlError(f"{key}: holds a {saved['encoder']!r} encoder, the config builds "
                         f"model.encoder={name!r}")
    made_for = (saved["in_channels"], saved["image_size"])
    if made_for != (in_channels, image_size):
        raise HmamlError(f"{key}: trained on {made_for[0]}-channel {made_for[1]} px images, the "
                         f"config's pack has {in_channels}-channel {image_size} px images")
    own, theirs = encoder.state_dict(), saved["state_dict"]
    if set(own) != set(theirs):
        missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        raise HmamlError(f"{key}: parameters differ (missing {missing[:3]}, unexpected "
                         f"{extra[:3]})")
    wrong = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if tuple(theirs[k].shape) != tuple(v.shape)]
    if wrong:
        raise HmamlError(f"{key}: shapes differ from the config's encoder (file vs config): "
                         + "; ".join(wrong[:3]) + (f" and {len(wrong) - 3} more"
                                                   if len(wrong) > 3 else ""))
    encoder.load_state_dict(theirs)  # the checks above leave nothing for it to refuse
    return dict(saved.get("info", {}))
