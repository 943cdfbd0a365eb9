"""Use a trained run on your own few-shot task.

    run = hmaml.load_run("runs/omni_emnist1")          # the best checkpoint, as it was tested
    clf = run.adapt(["a1.png", "b1.png", ...], ["a", "b", ...])
    clf.predict(["q1.png", "q2.png"])                   # -> ["b", "a"]
    clf.predict_proba(["q1.png"])                       # -> tensor [1, N]

Adapting is what the method does at test time: one forward pass of the hypernetwork for
HyperMAML (no gradient), the run's inner steps for MAML, the prototypes for ProtoNet. Images are
read as the run's pack read its images (grey or RGB, resized to the stored side) and get the
pack's evaluation transform, so a task built from pack images gives exactly the method's logits.

Normalisation: every method was trained and tested with BatchNorm statistics of each image set
(``transductive``): the queries are normalised together, so a prediction depends on the other
queries. ``norm="support"`` normalises the queries with the support set's statistics instead, so
each image is classified on its own (one image at a time works); its accuracy: docs/tracking.md.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from hmaml.allocator import keep_freed_memory
from hmaml.config import Config, config_from_yaml
from hmaml.data.format import ImageSpec
from hmaml.data.sources.base import IMAGE_EXTENSIONS, ImageLoader
from hmaml.data.store import read_manifest
from hmaml.data.transforms import build_transform
from hmaml.errors import HmamlError
from hmaml.log import LOGGER
from hmaml.methods import Method
from hmaml.methods.base import QUERY_NORMS
from hmaml.precision import resolve_precision
from hmaml.tasks import TaskBatch
from hmaml.train.build import build_model
from hmaml.train.checkpoint import load_checkpoint, load_model_state
from hmaml.train.engine import pick_device
from hmaml.train.rundir import RunDir

#: An image given to the API: a file path, a PIL image or a uint8 array ``[H, W]``/``[H, W, C]``.
ImageLike = str | Path | Image.Image | np.ndarray
#: Most that an image side may be scaled up, and the most elongated shape, before it is refused.
MAX_UPSCALE = 4.0
MAX_ASPECT = 4.0
#: Queries per forward pass with ``norm="support"`` (each is classified on its own).
QUERY_CHUNK = 256


def _name(image: ImageLike, index: int) -> str:
    return str(image) if isinstance(image, str | Path) else f"image {index}"


def _pil(image: ImageLike, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise HmamlError(f"{where}: an array image must be uint8 [H, W] or [H, W, C], got "
                             f"{image.dtype} {tuple(image.shape)}")
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1
                               else image)
    path = Path(image)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HmamlError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return Image.open(io.BytesIO(data))  # the header only: decoded when converted
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise HmamlError(f"{path}: not a readable image ({exc})") from None


def read_images(images: Sequence[ImageLike], spec: ImageSpec) -> np.ndarray:
    """uint8 ``[n, S, S, C]`` at the pack's stored side ``S``, converted by the packs' own
    :class:`ImageLoader`; an image that would be scaled up more than :data:`MAX_UPSCALE` times
    or is more elongated than :data:`MAX_ASPECT` is refused."""
    side, out = spec.stored_size, []
    loader = ImageLoader(side, spec.channels)
    for i, image in enumerate(images):
        where = _name(image, i)
        img = _pil(image, where)
        w, h = img.size
        if min(w, h) * MAX_UPSCALE < side:
            raise HmamlError(f"{where}: {w}x{h} pixels is too small for this run's {side}x{side} "
                             f"images (more than {MAX_UPSCALE:g}x enlargement)")
        if max(w, h) > MAX_ASPECT * min(w, h):
            raise HmamlError(f"{where}: {w}x{h} pixels is too elongated to resize to a square "
                             f"(aspect ratio above {MAX_ASPECT:g})")
        try:
            out.append(loader.convert(img))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise HmamlError(f"{where}: not a readable image ({exc})") from None
    if not out:
        raise HmamlError("no images given")
    return np.stack(out)


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@dataclass
class Classifier:
    """A trained run adapted to one support set (see :meth:`TrainedRun.adapt`)."""

    run: TrainedRun
    support: np.ndarray  # uint8 [N*K, S, S, C], class-major
    classes: list[Hashable]
    shots: int

    def logits(self, images: Sequence[ImageLike]) -> Tensor:
        """Query logits ``[B, N]`` (fp32)."""
        query = read_images(images, self.run.image)
        if self.run.method.query_norm == "transductive":
            if len(query) < len(self.classes):
                LOGGER.warning("%d queries normalised together (transductive): with this few, "
                               "predictions are unreliable; use norm='support' (--norm support)",
                               len(query))
            return self.run.classify(self.support, query, self.shots)
        return torch.cat([self.run.classify(self.support, query[i:i + QUERY_CHUNK], self.shots)
                          for i in range(0, len(query), QUERY_CHUNK)])

    def predict_proba(self, images: Sequence[ImageLike]) -> Tensor:
        """Class probabilities ``[B, N]``, columns in :attr:`classes` order."""
        return torch.softmax(self.logits(images), dim=-1)

    def predict(self, images: Sequence[ImageLike]) -> list[Hashable]:
        """The most probable class of each image."""
        return [self.classes[int(i)] for i in self.logits(images).argmax(-1)]


class TrainedRun:
    """A run's best checkpoint, in the state it was tested in."""

    def __init__(self, cfg: Config, method: Method, image: ImageSpec,
                 device: torch.device) -> None:
        self.cfg, self.method, self.image, self.device = cfg, method, image, device
        self.n_way = cfg.data.n_way
        self.transform = build_transform(None, image.size, image.pipeline)

    def adapt(self, images: Sequence[ImageLike], labels: Sequence[Hashable]) -> Classifier:
        """Adapt to a support set: ``labels[i]`` is the class of ``images[i]``; classes are
        numbered in order of first appearance, and every class needs the same number of images
        (at least the run's K). The run was trained ``cfg.data.n_way``-way: exactly that many
        classes."""
        if len(images) != len(labels):
            raise HmamlError(f"{len(images)} images but {len(labels)} labels")
        classes = list(dict.fromkeys(labels))
        if len(classes) != self.n_way:
            raise HmamlError(f"{len(classes)} classes given; this run was trained "
                             f"{self.n_way}-way and classifies exactly {self.n_way} classes")
        members = {c: [i for i, label in enumerate(labels) if label == c] for c in classes}
        shots = {len(m) for m in members.values()}
        if len(shots) > 1:
            counts = ", ".join(f"{c}: {len(m)}" for c, m in members.items())
            raise HmamlError(f"every class needs the same number of support images ({counts})")
        if min(shots) < self.cfg.data.n_shot:
            short = next(c for c, m in members.items() if len(m) < self.cfg.data.n_shot)
            raise HmamlError(f"class {short!r}: {len(members[short])} images, fewer than the "
                             f"run's K = {self.cfg.data.n_shot} per class")
        order = [i for c in classes for i in members[c]]
        support = read_images([images[i] for i in order], self.image)
        return Classifier(self, support, classes, shots.pop())

    @torch.no_grad()
    def classify(self, support: np.ndarray, query: np.ndarray, shots: int) -> Tensor:
        """Logits ``[B, N]`` of ``query`` after adapting to ``support`` (uint8, class-major)."""
        x = torch.from_numpy(np.concatenate([support, query])).permute(0, 3, 1, 2)
        x = self.transform(x.float().div_(255.0), torch.Generator())
        s = len(support)
        batch = TaskBatch(support_x=x[:s].unsqueeze(0),
                          support_y=torch.arange(self.n_way).repeat_interleave(shots)[None],
                          query_x=x[s:].unsqueeze(0),
                          query_y=torch.zeros(1, len(query), dtype=torch.int64),  # unlabelled
                          n_way=self.n_way)
        return self.method(batch.to(self.device)).logits[0].float().cpu()


def run_image_spec(state: dict[str, Any], cfg: Config) -> ImageSpec:
    """The run's image spec: saved in its checkpoint, or (older runs) its training pack's."""
    if "image" in state:
        return ImageSpec(**state["image"])
    try:
        return read_manifest(cfg.data.train_pack).image
    except HmamlError as exc:
        raise HmamlError(f"the checkpoint predates saved image specs and the run's training "
                         f"pack cannot be read: {exc}") from None


def load_run(run: str | Path, *, norm: str = "transductive",
             device: str | None = None) -> TrainedRun:
    """A run folder's best checkpoint, ready to :meth:`~TrainedRun.adapt`; ``norm`` is how
    queries are normalised (see the module docstring), ``device`` defaults to the run's
    ``train.device`` rule (cuda, then mps, then cpu)."""
    keep_freed_memory()  # see hmaml.allocator
    if norm not in QUERY_NORMS:
        raise HmamlError(f"norm={norm!r}: choose one of {', '.join(QUERY_NORMS)}")
    rd = RunDir(run)
    if not rd.best.is_file():
        raise HmamlError(f"{rd.path}: no {rd.best.name} (not a run folder, or the run has not "
                         "validated an epoch yet)")
    state = load_checkpoint(rd.best, None)
    cfg = config_from_yaml(state["config_yaml"], str(rd.best),
                           ["model.init_from=null", f"eval.query_norm={norm}"])
    image = run_image_spec(state, cfg)
    where = torch.device(device or pick_device(cfg.train.device))
    precision = resolve_precision(cfg.train.mixed_precision, where, compiled=cfg.train.compile)
    method = build_model(cfg, image, precision, where)
    load_model_state(method, state["model"], rd.best)
    method.set_epoch(int(state["best_epoch"]))
    method.set_tested()
    method.to(where).eval()
    return TrainedRun(cfg, method, image, where)


__all__ = ["Classifier", "TrainedRun", "image_files", "load_run", "read_images", "run_image_spec"]
