"""Synthetic Omniglot-like characters: the default dataset that needs no download.

Each class is a prototype made of 2-4 pen strokes (chains of quadratic Bezier segments); each
instance re-draws the prototype with its own hand: control-point noise, a random affine map
(rotation, anisotropic scale, shear, translation), stroke width, and pixel noise. Instances of a
class clearly share a shape, yet nearest-class-mean on raw pixels is far from perfect, so a learned
embedding has something to learn.

Every class and every instance draws from its own ``numpy`` generator seeded by
``(seed, split, class, instance)``, so the output depends on nothing but these numbers: the same
seed gives byte-identical packs, whatever the number of worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

#: Bump when the drawing changes, so that packs made by another version get another fingerprint.
GLYPH_VERSION = 1
GLYPH_SIZE = 28
_SUPERSAMPLE = 4
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_SEGMENT_POINTS = 8


class GlyphRef(NamedTuple):
    """One instance of one synthetic class: what a glyph source lists instead of a file."""

    seed: int
    split: str
    class_index: int
    instance: int


def _prototype(rng: np.random.Generator) -> list[np.ndarray]:
    """Control points of a character: per stroke an array [2m+1, 2] (m quadratic segments)."""
    strokes = []
    for _ in range(rng.choice([2, 3, 4], p=[0.35, 0.4, 0.25])):
        n_seg = int(rng.integers(1, 3))
        point = rng.uniform(-0.75, 0.75, size=2)
        heading = rng.uniform(0, 2 * np.pi)
        points = [point]
        for _ in range(n_seg):
            for _ in range(2):
                heading += rng.normal(0.0, 0.9)
                step = rng.uniform(0.3, 0.7)
                point = np.clip(point + step * np.array([np.cos(heading), np.sin(heading)]),
                                -0.95, 0.95)
                points.append(point)
        strokes.append(np.asarray(points))
    return strokes


def _bezier_chain(ctrl: np.ndarray) -> np.ndarray:
    """Sample a chain of quadratic Bezier segments sharing end points: [points, 2]."""
    t = np.linspace(0.0, 1.0, _SEGMENT_POINTS)[:, None]
    p0, p1, p2 = ctrl[0:-1:2], ctrl[1::2], ctrl[2::2]  # [m, 2] each
    curve = ((1 - t) ** 2)[None] * p0[:, None] + (2 * (1 - t) * t)[None] * p1[:, None] \
        + (t**2)[None] * p2[:, None]  # [m, points, 2]
    return curve.reshape(-1, 2)


def _affine(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random 'hand': rotation, anisotropic scale, shear and translation."""
    angle = rng.normal(0.0, np.deg2rad(15))
    scale = rng.uniform(0.8, 1.1) * np.exp(rng.normal(0.0, 0.08, size=2))
    shear = rng.normal(0.0, 0.15)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(scale)
    return matrix, rng.normal(0.0, 0.08, size=2)


def render_instance(strokes: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Draw one jittered instance of a prototype: uint8 [28, 28], dark strokes on white."""
    matrix, shift = _affine(rng)
    big = GLYPH_SIZE * _SUPERSAMPLE
    width = rng.uniform(1.4, 2.6) * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(canvas)
    half, centre = 0.4 * big, big / 2
    for ctrl in strokes:
        noisy = ctrl + rng.normal(0.0, 0.08, size=ctrl.shape)
        pts = _bezier_chain(noisy) @ matrix.T + shift
        xy = pts * half + centre
        draw.line(xy.ravel().tolist(), fill=0, width=round(width))
        r = width / 2
        for x, y in xy.tolist():  # a round pen: discs at every vertex fill the joints
            draw.ellipse((x - r, y - r, x + r, y + r), fill=0)
    small = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)
    small += rng.normal(0.0, 12.0, size=small.shape)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def _generator(seed: int, split: str, class_index: int, *rest: int) -> np.random.Generator:
    return np.random.default_rng([GLYPH_VERSION, seed, _SPLIT_CODES[split], class_index, *rest])


@dataclass(frozen=True)
class GlyphLoader:
    """Renders a glyph class (its list of :class:`GlyphRef`) to uint8 [n, 28, 28, 1]."""

    def __call__(self, refs: tuple[GlyphRef, ...]) -> np.ndarray:
        first = refs[0]
        strokes = _prototype(_generator(first.seed, first.split, first.class_index))
        images = [render_instance(strokes, _generator(r.seed, r.split, r.class_index, r.instance))
                  for r in refs]
        return np.stack(images)[..., None]


def glyph_classes(split: str, n_classes: int, per_class: int, seed: int
                  ) -> list[tuple[str, tuple[GlyphRef, ...]]]:
    """The (name, refs) list of one split of a glyph set."""
    return [(f"glyph{c:05d}", tuple(GlyphRef(seed, split, c, i) for i in range(per_class)))
            for c in range(n_classes)]
