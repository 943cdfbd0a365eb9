"""What a run is built from: its packs, its method, its evaluation episodes.

One place for the training loop and ``launch/evaluate.py`` alike, so that a run is tested after
training exactly as it is re-tested later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hmaml.config import Config
from hmaml.data.eval_lists import EvalLoader, eval_loader
from hmaml.data.format import MANIFEST_NAME, ImageSpec, Manifest
from hmaml.data.store import PackStore, RemotePolicy
from hmaml.errors import HmamlError
from hmaml.methods import Method, build_method
from hmaml.models import ENCODERS, Encoder, build_encoder, load_encoder
from hmaml.precision import Precision


@dataclass(frozen=True)
class Packs:
    """The training and evaluation packs of a config (local or remote), their manifests read
    once."""

    train: PackStore
    eval: PackStore
    train_manifest: Manifest
    eval_manifest: Manifest

    @property
    def image(self) -> ImageSpec:
        """Image size and channels, which fix the encoder's shapes (the training pack's)."""
        return self.train_manifest.image


def open_packs(cfg: Config, *, train: bool = True) -> Packs:
    """Read both manifests and check that the config's splits are there (one line if not)."""
    data = cfg.data
    policy = RemotePolicy(retries=data.read_retries, timeout=data.read_timeout_s)
    train_pack = PackStore.of(data.train_pack, cache_dir=data.cache_dir, policy=policy)
    eval_pack = train_pack if not data.eval_pack else \
        PackStore.of(data.eval_pack, cache_dir=data.cache_dir, policy=policy)
    train_manifest = train_pack.read_manifest()
    eval_manifest = train_manifest if eval_pack == train_pack else eval_pack.read_manifest()
    wanted = [(train_pack, train_manifest, [data.train_split] if train else []),
              (eval_pack, eval_manifest, [data.val_split, data.test_split])]
    for pack, manifest, splits in wanted:
        for split in splits:
            try:
                manifest.split_classes(split)
            except HmamlError as exc:
                raise HmamlError(f"{pack.where(MANIFEST_NAME)}: {exc}") from None
    return Packs(train_pack, eval_pack, train_manifest, eval_manifest)


def build_run_encoder(cfg: Config, image: ImageSpec) -> Encoder:
    """The config's encoder for the training pack's ``image`` spec, initialised from
    ``cfg.seed`` by ``model.init``, or loaded from ``model.init_from`` when set (training and
    pre-training start alike)."""
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(cfg.model.encoder, image.channels, image.size, cfg.model.init)
    if cfg.model.init_from:
        load_encoder(encoder, cfg.model.init_from, cfg.model.encoder, image.channels,
                     image.size)
    return encoder


def build_model(cfg: Config, image: ImageSpec, precision: Precision,
                device: torch.device) -> Method:
    """The config's method on :func:`build_run_encoder`'s encoder, its encoder running in
    ``precision``, its queries normalised per ``eval.query_norm``, compiled for ``device`` with
    ``train.compile``."""
    method = build_method(cfg.method, build_run_encoder(cfg, image), cfg.data.n_way)
    method.encoder_dtype = precision.dtype
    method.query_norm = cfg.eval.query_norm
    if cfg.train.compile:
        compile_method(method, device)
    return method


def compile_method(method: Method, device: torch.device) -> None:
    """``torch.compile`` in place (parameter names, checkpoints and DDP stay as they are); on
    CUDA with CUDA graphs: a training step of small tasks is bound by kernel launches there
    (H100, HyperMAML, 32 tasks, bf16: 4,903 tasks/s against 1,984 compiled without graphs)."""
    method.compile(mode="reduce-overhead" if device.type == "cuda" else None)


#: Live activations of the widest size during an evaluation forward (a layer's input, its
#: convolution and normalisation outputs), each counted at 4 bytes (fp32; bf16 halves it).
_LIVE_ACTIVATIONS = 3


def eval_tasks_per_batch(cfg: Config, packs: Packs, n_query: int) -> int:
    """``eval.tasks_per_batch``, or when unset as many tasks (1 to 100) as keep the widest
    activation of one evaluation forward within about ``eval.memory_mb``."""
    if cfg.eval.tasks_per_batch is not None:
        return cfg.eval.tasks_per_batch
    image = packs.image
    per_image = ENCODERS[cfg.model.encoder].widest_activation(image.channels, image.size)
    images = cfg.data.n_way * max(cfg.data.n_shot, n_query)  # support and query run apart
    per_task = images * per_image * 4 * _LIVE_ACTIVATIONS
    return max(1, min(100, int(cfg.eval.memory_mb * 2**20 // per_task)))


def episodes_of(cfg: Config, packs: Packs, split: str, episodes: int, n_query: int, *,
                rank: int, world: int, repeat: int = 0) -> EvalLoader:
    """This rank's share of the fixed episodes of ``split`` (repeat ``repeat``)."""
    data = cfg.data
    return eval_loader(packs.eval, split, n_way=data.n_way, n_shot=data.n_shot,
                       n_query=n_query, n_episodes=episodes, seed=cfg.eval.seed, rank=rank,
                       world_size=world,
                       tasks_per_batch=eval_tasks_per_batch(cfg, packs, n_query),
                       image_size=packs.image.size, repeat=repeat)


__all__ = ["Packs", "build_model", "build_run_encoder", "compile_method", "episodes_of",
           "eval_tasks_per_batch", "open_packs"]
