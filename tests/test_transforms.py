"""Tensor augmentation: known answers, bounds and determinism."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from hmaml.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    build_transform,
    center_crop,
    color_jitter,
    crop_boxes,
    crop_resize,
    grayscale,
    hflip,
    normalize,
    random_resized_crop,
    resize,
)
from hmaml.errors import HmamlError


def images(b: int = 6, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hflip_known_answer() -> None:
    x = torch.arange(6.0).view(1, 1, 2, 3)
    assert torch.equal(hflip(x, gen(), p=1.0), torch.tensor([[[[2.0, 1, 0], [5, 4, 3]]]]))
    assert torch.equal(hflip(x, gen(), p=0.0), x)
    batch = images(200)
    out = hflip(batch, gen())
    flipped = (out == batch.flip(-1)).flatten(1).all(1)
    kept = (out == batch).flatten(1).all(1)
    assert bool((flipped ^ kept).all()) and 70 < int(flipped.sum()) < 130


def test_full_area_crop_is_identity() -> None:
    x = images()
    out = random_resized_crop(x, 8, gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)
    mirrored = random_resized_crop(x, 8, gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    torch.testing.assert_close(mirrored, x.flip(-1), atol=1e-6, rtol=0)
    half = random_resized_crop(images(200), 8, gen(), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                               flip_p=0.5)
    flipped = (half - images(200).flip(-1)).abs().flatten(1).amax(1) < 1e-6
    assert 70 < int(flipped.sum()) < 130


def test_crop_resize_known_boxes() -> None:
    x = images(2)
    out = crop_resize(x, torch.tensor([[2, 4, 4, 4], [0, 0, 8, 8]]), 4)
    torch.testing.assert_close(out[0], x[0, :, 2:6, 4:8], atol=1e-6, rtol=0)  # same-size block
    ramp = (torch.arange(8.0) / 10).expand(1, 1, 8, 8)  # value = column / 10
    doubled = crop_resize(ramp, torch.tensor([[0, 0, 4, 4]]), 8)  # left half, 2x bilinear
    # Output pixel o samples column o/2 - 0.25: the image border clamps, the box edge does not.
    expected = torch.tensor([0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25]) / 10
    torch.testing.assert_close(doubled[0, 0], expected.expand(8, 8), atol=1e-6, rtol=0)


def test_crop_boxes_respect_scale_ratio_and_bounds() -> None:
    boxes = crop_boxes(84, 84, 2000, gen(), scale=(0.2, 0.9), ratio=(0.75, 4 / 3))
    top, left, h, w = boxes.T.double()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 84).all() and (left + w <= 84).all()
    area = h * w / 84**2
    assert area.min() > 0.18 and area.max() < 0.93  # within scale up to rounding of h and w
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4
    assert len(set(map(tuple, boxes.tolist()))) > 1000  # varied
    # No try can fit: the centred fallback with the nearest allowed ratio.
    fallback = crop_boxes(10, 40, 5, gen(), scale=(0.99, 1.0), ratio=(1.0, 1.0))
    assert fallback.tolist() == [[0, 15, 10, 10]] * 5


def test_jitter_factor_one_is_identity() -> None:
    x = images()
    ones = torch.ones(x.shape[0])
    for adjust in (adjust_brightness, adjust_contrast, adjust_saturation):
        torch.testing.assert_close(adjust(x, ones), x, atol=1e-6, rtol=0)
    assert torch.equal(color_jitter(x, gen()), x)


def test_jitter_known_answers() -> None:
    x = images()
    half, zero = torch.full((6,), 0.5), torch.zeros(6)
    torch.testing.assert_close(adjust_brightness(x, half), x * 0.5)
    gray = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    torch.testing.assert_close(adjust_saturation(x, zero), gray.expand_as(x))
    flat = adjust_contrast(x, zero)
    torch.testing.assert_close(flat, gray.mean((1, 2, 3), keepdim=True).expand_as(x))
    assert torch.equal(grayscale(x[:, :1]), x[:, :1])
    bright = adjust_brightness(x, torch.full((6,), 3.0))
    assert float(bright.max()) == 1.0  # clamped


def test_fused_jitter_equals_the_three_steps() -> None:
    x = 0.4 + 0.2 * images(50)  # mid-range: no step clips
    out = color_jitter(x, gen(3), brightness=0.3, contrast=0.3, saturation=0.3)
    draws = gen(3)
    b, c, s = (0.7 + 0.6 * torch.rand(50, generator=draws) for _ in range(3))
    steps = adjust_brightness(x, b)
    steps = adjust_contrast(steps, c)
    assert float(steps.min()) > 0 and float(steps.max()) < 1
    torch.testing.assert_close(out, adjust_saturation(steps, s), atol=1e-5, rtol=0)


def test_jitter_factors_in_range() -> None:
    x = torch.full((500, 1, 2, 2), 0.5)
    out = color_jitter(x, gen(), brightness=0.4)
    factors = out[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6
    assert factors.min() < 0.65 and factors.max() > 1.35


def test_same_generator_same_augmentation() -> None:
    augment = build_transform("natural", 12)
    x = images(16, size=20)
    a, b, c = augment(x, gen(5)), augment(x, gen(5)), augment(x, gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 3, 12, 12) and float(a.min()) >= 0 and float(a.max()) <= 1
    gray = build_transform("natural", 28)(images(4, c=1, size=28), gen())
    assert gray.shape == (4, 1, 28, 28)


def test_presets() -> None:
    x = images(3, size=28)
    assert torch.equal(build_transform(None, 28)(x, gen()), x)
    assert torch.equal(build_transform("none", 28)(x, gen()), x)
    small = build_transform(None, 14)(torch.full((2, 1, 28, 28), 0.25), gen())
    torch.testing.assert_close(small, torch.full((2, 1, 14, 14), 0.25))
    assert pickle.loads(pickle.dumps(build_transform("natural", 84))).keywords == {"size": 84}
    with pytest.raises(HmamlError, match="augment='strong' is not a known preset"):
        build_transform("strong", 84)


def test_resize_bounds() -> None:
    x = images(2, size=10)
    up = resize(x, 30)
    assert up.shape == (2, 3, 30, 30) and float(up.min()) >= 0 and float(up.max()) <= 1
    assert math.isclose(float(up.mean()), float(x.mean()), abs_tol=0.02)


def test_natural_pipeline_train_and_eval() -> None:
    """Natural packs: training crops from the stored image (126 px) to 84 px with augmentation,
    evaluation resizes to int(84 x 1.15) = 96 and centre-crops 84, without randomness; both
    are ImageNet-normalised, so a constant image of the channel means maps to zero."""
    x = images(8, size=126)
    train = build_transform("natural", 84, "natural")
    test = build_transform(None, 84, "natural")
    a, b = train(x, gen(1)), train(x, gen(2))
    assert a.shape == b.shape == (8, 3, 84, 84) and not torch.equal(a, b)
    e1, e2 = test(x, gen(1)), test(x.clone(), gen(2))
    assert e1.shape == (8, 3, 84, 84) and torch.equal(e1, e2)
    torch.testing.assert_close(e1, normalize(center_crop(resize(x, 96), 84).clone()))
    means = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 126, 126)
    torch.testing.assert_close(test(means.clone(), gen()), torch.zeros(2, 3, 84, 84))
    lowest = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    highest = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    for out in (a, e1):
        assert lowest - 1e-5 <= float(out.min()) and float(out.max()) <= highest + 1e-5
        assert float(out.min()) < -1 and float(out.max()) > 1  # not 0..1 any more
    white = test(torch.ones(1, 3, 126, 126), gen())
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(white[0, :, 0, 0], expected)


def test_center_crop_known_answer() -> None:
    x = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.equal(center_crop(x, 2), x[..., 2:4, 2:4])
    assert torch.equal(center_crop(torch.arange(25.0).view(1, 1, 5, 5), 2),
                       torch.arange(25.0).view(1, 1, 5, 5)[..., 2:4, 2:4])  # round(1.5) = 2
    with pytest.raises(ValueError, match="7 px from 6 x 6"):
        center_crop(x, 7)


def test_character_pipeline_is_not_normalised() -> None:
    x = images(3, c=1, size=28)
    assert torch.equal(build_transform(None, 28, "characters")(x, gen()), x)
    with pytest.raises(HmamlError, match=r"pipeline 'video' is unknown.*re-pack"):
        build_transform(None, 28, "video")
