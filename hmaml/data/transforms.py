"""Image augmentation on stacks of tensors, torch only (no torchvision).

Every transform takes a float batch ``[B, C, H, W]`` in 0..1 (at the pack's stored size) and a
``torch.Generator`` and draws its randomness per image from that generator only, so a stream
seeded the same way augments the same way. All of them are vectorised over the batch: one call
augments every image of a meta-batch of episodes (a few thousand images) without a Python loop
per image.

:func:`build_transform` chains them into a pack pipeline's training or evaluation transform
(see ``hmaml.data.format.PIPELINES``): characters stay 0..1; natural images get the CloserLook
pipeline and ImageNet mean/std normalisation, in training and evaluation alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from hmaml.errors import HmamlError

Transform = Callable[[Tensor, torch.Generator], Tensor]
"""``(images [B, C, H, W] float 0..1, generator) -> images [B, C, size, size] float 0..1``."""

PRESETS = ("none", "natural")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE = 1.15  # natural evaluation: resize to 1.15 x the input size, then centre-crop it
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL and torchvision use
_ATTEMPTS = 10  # random-resized-crop tries before its centre-crop fallback (torchvision's rule)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize to ``size`` x ``size`` (antialiased when shrinking); no-op at that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp_(0.0, 1.0)


def hflip(images: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = torch.rand(images.shape[0], generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def crop_boxes(height: int, width: int, n: int, generator: torch.Generator, *,
               scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Random-resized-crop boxes ``[n, 4]`` as integer (top, left, height, width).

    torchvision's rule, drawn for all images at once: up to ten tries of an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``; the first box that fits the image wins,
    and an image with no fitting try gets the largest centred box whose ratio lies in ``ratio``.
    """
    area = height * width
    target = area * _uniform(n * _ATTEMPTS, *scale, generator).view(n, _ATTEMPTS)
    log_r = _uniform(n * _ATTEMPTS, math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = log_r.view(n, _ATTEMPTS).exp()
    w = (target * aspect).sqrt().round()
    h = (target / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # index of the first fitting try (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fb_w, fb_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fb_w, fb_h = round(height * ratio[1]), height
    else:
        fb_w, fb_h = width, height
    ok = fits.any(1)
    w = torch.where(ok, w, torch.full_like(w, fb_w))
    h = torch.where(ok, h, torch.full_like(h, fb_h))
    u = torch.rand(2, n, generator=generator)
    top = torch.where(ok, (u[0] * (height - h + 1)).floor(), ((height - h) / 2).round())
    left = torch.where(ok, (u[1] * (width - w + 1)).floor(), ((width - w) / 2).round())
    return torch.stack([top, left, h, w], 1).long()


def crop_resize(images: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop each image to its box (top, left, height, width) and resize it to ``size``, bilinearly;
    mirror the images where ``flip`` (bool ``[B]``) is set.

    One ``grid_sample`` for the whole batch on a grid built by broadcasting (boxes are axis-aligned,
    so x depends on the column only and y on the row only; ``affine_grid`` would cost as much as
    the sampling). A box covering the whole image at the image's own size returns it unchanged.
    """
    b, _, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    u = (2 * torch.arange(size, dtype=images.dtype) + 1) / size - 1  # output pixel centres
    sx = w / width
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    gx = sx[:, None] * u + ((2 * left + w) / width - 1)[:, None]
    gy = (h / height)[:, None] * u + ((2 * top + h) / height - 1)[:, None]
    grid = torch.empty(b, size, size, 2, dtype=images.dtype)
    grid[..., 0] = gx[:, None, :]
    grid[..., 1] = gy[:, :, None]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def random_resized_crop(images: Tensor, size: int, generator: torch.Generator, *,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip_p: float = 0.0) -> Tensor:
    """Crop a random area fraction and aspect ratio of each image, resized to ``size``; with
    ``flip_p`` > 0 also mirror each image with that probability, at no extra cost (the flip is
    folded into the sampling grid)."""
    boxes = crop_boxes(images.shape[-2], images.shape[-1], images.shape[0], generator,
                       scale=scale, ratio=ratio)
    flip = torch.rand(images.shape[0], generator=generator) < flip_p if flip_p > 0 else None
    return crop_resize(images, boxes, size, flip)


def grayscale(images: Tensor) -> Tensor:
    """Luma ``[B, 1, H, W]`` of RGB images; a one-channel batch is returned as is."""
    if images.shape[1] == 1:
        return images
    gray = images[:, :1] * _GRAY[0]
    gray.add_(images[:, 1:2], alpha=_GRAY[1]).add_(images[:, 2:3], alpha=_GRAY[2])
    return gray


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * images + (1 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """Scale intensities by a per-image factor (1 = unchanged)."""
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its mean luma (1 = unchanged, 0 = flat grey)."""
    return _blend(images, grayscale(images).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each image with its own luma (1 = unchanged, 0 = greyscale)."""
    return _blend(images, grayscale(images), factor)


def color_jitter(images: Tensor, generator: torch.Generator, *, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0) -> Tensor:
    """Per-image brightness, contrast and saturation factors ``b, c, s`` uniform in
    ``[1-strength, 1+strength]``, applied as brightness, then contrast, then saturation.

    Fused into one affine map per image, clamped once: ``c·b·(s·x + (1-s)·gray(x)) +
    (1-c)·b·mean(gray(x))``, which is the three steps exactly when no intermediate value leaves
    0..1 (torchvision clamps after each step and shuffles their order per image; fusing saves
    most of the passes over a few thousand images).
    """
    n = images.shape[0]
    factors = []
    for strength in (brightness, contrast, saturation):
        if strength > 0:
            factors.append(_uniform(n, max(0.0, 1 - strength), 1 + strength, generator))
        else:
            factors.append(torch.ones(n))
    b, c, s = (f.to(images.dtype).view(-1, 1, 1, 1) for f in factors)
    if not (brightness or contrast or saturation):
        return images
    gray = grayscale(images)
    out = torch.lerp(gray.expand_as(images), images, s) if saturation else images.clone()
    out.mul_(c * b)
    if contrast:
        out.add_((1 - c) * b * gray.mean((1, 2, 3), keepdim=True))
    return out.clamp_(0.0, 1.0)


def center_crop(images: Tensor, size: int) -> Tensor:
    """The centred ``size`` x ``size`` window (torchvision's rounding of the offset)."""
    height, width = images.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"center_crop: {size} px from {height} x {width} images")
    top, left = round((height - size) / 2), round((width - size) / 2)
    return images[..., top:top + size, left:left + size]


def normalize(images: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """``(x - mean) / std`` per channel, in place."""
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return images.sub_(m).div_(s)


def natural(images: Tensor, generator: torch.Generator, size: int) -> Tensor:
    """The augmentation of the CUB / mini-ImageNet baselines: random-resized crop (area 8-100 %,
    ratio 3/4-4/3) to ``size`` with a horizontal flip half of the time, colour jitter 0.4 / 0.4 /
    0.4 (values stay 0..1)."""
    images = random_resized_crop(images, size, generator, flip_p=0.5)
    return color_jitter(images, generator, brightness=0.4, contrast=0.4, saturation=0.4)


def plain(images: Tensor, generator: torch.Generator, size: int) -> Tensor:
    """No augmentation: only a resize when the images' size differs from ``size``."""
    return resize(images, size)


def natural_train(images: Tensor, generator: torch.Generator, size: int) -> Tensor:
    """The natural pipeline in training: :func:`natural`, then ImageNet normalisation."""
    return normalize(natural(images, generator, size))


def natural_eval(images: Tensor, generator: torch.Generator, size: int) -> Tensor:
    """The natural pipeline in evaluation (and training without augmentation), no randomness:
    resize to ``int(1.15 * size)``, centre-crop ``size``, ImageNet normalisation."""
    return normalize(center_crop(resize(images, int(size * EVAL_RESIZE)), size).contiguous())


_PIPELINES: dict[tuple[str, str], Callable[..., Tensor]] = {
    ("characters", "none"): plain,
    ("characters", "natural"): natural,
    ("natural", "none"): natural_eval,
    ("natural", "natural"): natural_train,
}


def build_transform(augment: str | None, size: int, pipeline: str = "characters") -> Transform:
    """The transform of a pack ``pipeline`` to input size ``size``, with the ``augment`` preset
    (``None``/``"none"``: the evaluation transform; ``"natural"``: the natural augmentation).

    A ``functools.partial`` of a module function, so a dataset holding it pickles into spawned
    DataLoader workers.
    """
    name = augment or "none"
    if name not in PRESETS:
        raise HmamlError(f"augment={name!r} is not a known preset; choose one of "
                         f"{', '.join(PRESETS)}")
    if (pipeline, name) not in _PIPELINES:
        raise HmamlError(f"image pipeline {pipeline!r} is unknown (a pack written by another "
                         "hmaml version?); re-pack the dataset")
    return partial(_PIPELINES[pipeline, name], size=size)
