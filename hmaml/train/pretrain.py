"""Supervised pre-training of an encoder on the base classes: the pretrained backbone the paper
starts mini-ImageNet from (sections 4.1 and E.2), made here since no weights can be downloaded.

The encoder plus a linear layer learn to classify every image of the training split's classes
with cross-entropy (SGD with Nesterov momentum, the pack's training augmentation). Every
``eval.every`` epochs the encoder alone is validated as a ProtoNet on the few-shot validation
episodes (nearest class mean, no training), and the best one is written to ``encoder.pt`` in
the run folder, which ``model.init_from`` loads. Data-parallel over Accelerate's processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hmaml.allocator import keep_freed_memory
from hmaml.config import Config
from hmaml.data.format import ImageSpec
from hmaml.data.split import derive_seed, load_split
from hmaml.data.store import PackStore
from hmaml.data.transforms import build_transform
from hmaml.errors import HmamlError
from hmaml.log import LOGGER, show_bars
from hmaml.methods.protonet import ProtoNet
from hmaml.models import save_encoder
from hmaml.precision import resolve_precision
from hmaml.train.build import build_run_encoder, episodes_of, open_packs
from hmaml.train.engine import make_accelerator
from hmaml.train.evaluate import evaluate
from hmaml.train.rundir import RunDir
from hmaml.train.tracking import make_tracker

_PRETRAIN_AUGMENT = 5  # seed-sequence tag of the augmentation stream (see hmaml.data.split)


class ClassImages(Dataset):
    """Every image of a split (or split union) as ``(uint8 [H, W, C], class)``; the split is
    held in memory (mini-ImageNet's 64 classes at 126 px: 1.8 GB)."""

    def __init__(self, pack: PackStore, split: str) -> None:
        self.info, self.classes = load_split(pack, split)
        self.index = np.concatenate([np.stack([np.full(len(images), c), np.arange(len(images))],
                                              1) for c, images in enumerate(self.classes)])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[Tensor, int]:
        c, i = self.index[k]
        return torch.from_numpy(self.classes[c][i]), int(c)


class BaseClassifier(nn.Module):
    """The encoder and a linear layer over all base classes; the encoder runs as one task (its
    BatchNorm normalises with the mini-batch's statistics, as in every encoder call)."""

    def __init__(self, proto: ProtoNet, classes: int) -> None:
        super().__init__()
        self.proto = proto  # holds the encoder and its precision; also the validation method
        self.head = nn.Linear(proto.encoder.feat_dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.proto.encode(x.unsqueeze(0))[0])


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns."""

    encoder_path: str
    best_epoch: int
    best_val_acc: float
    wall_s: float


def pretrain(cfg: Config) -> PretrainResult:
    """Pre-train ``cfg.model.encoder`` on ``cfg.data.train_split`` of the training pack and
    write the best encoder (by ProtoNet validation accuracy) to ``<run_dir>/encoder.pt``.

    A run folder belongs to the config that made it (another is refused); re-running the same
    config trains again from the start.
    """
    keep_freed_memory()  # see hmaml.allocator
    start = time.perf_counter()
    rd = RunDir(cfg.run_dir)
    rd.check_config(cfg)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    packs = open_packs(cfg)
    data = ClassImages(packs.train, cfg.data.train_split)
    image: ImageSpec = data.info.image
    batch = cfg.pretrain.batch_size
    if len(data) < batch * accelerator.num_processes:
        raise HmamlError(f"pretrain.batch_size={batch}: the split {cfg.data.train_split!r} has "
                         f"only {len(data)} images for {accelerator.num_processes} process(es)")
    precision = resolve_precision(cfg.train.mixed_precision, accelerator.device,
                                  compiled=cfg.train.compile)
    proto = ProtoNet(build_run_encoder(cfg, image), cfg.data.n_way)
    proto.encoder_dtype = precision.dtype
    model = BaseClassifier(proto, len(data.info.names))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr,
                                momentum=cfg.pretrain.momentum, nesterov=cfg.pretrain.momentum > 0,
                                weight_decay=cfg.train.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.train.lr_milestones,
                                                    cfg.train.lr_gamma)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=cfg.data.workers, persistent_workers=cfg.data.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    model, optimizer = accelerator.prepare(model, optimizer)
    # batches stay on the CPU for the augmentation (its generators are CPU generators)
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    unwrapped: BaseClassifier = getattr(model, "module", model)
    transform = build_transform(cfg.data.augment, image.size, image.pipeline)
    val = episodes_of(cfg, packs, cfg.data.val_split, cfg.eval.val_episodes, cfg.data.n_query,
                      rank=accelerator.process_index, world=accelerator.num_processes)
    tracker = make_tracker(cfg, main)
    if main:
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_config(cfg)
        LOGGER.info(f"hmaml pretrain · {cfg.name}: {cfg.model.encoder} on {len(data)} images of "
                   f"{len(data.info.names)} classes ({cfg.data.train_split}), batch {batch} x "
                   f"{accelerator.num_processes} process(es), {len(loader)} steps per epoch, "
                   f"encoder precision {precision}\n  run dir: {rd.path}")
    tracker.start(cfg, rd.path, {"stage": "pretrain", "precision": precision.name})
    best_acc, best_epoch, history = -math.inf, 0, []
    for epoch in range(cfg.train.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, disable=not (main and show_bars(cfg.train.progress)), leave=False,
                   desc=f"pretrain epoch {epoch + 1}")
        for step, (images, labels) in enumerate(bar):
            generator = torch.Generator().manual_seed(derive_seed(
                _PRETRAIN_AUGMENT, cfg.seed, epoch, step, accelerator.process_index))
            x = transform(images.permute(0, 3, 1, 2).float().div_(255.0), generator)
            labels = labels.to(accelerator.device, non_blocking=True)
            logits = model(x.to(accelerator.device, non_blocking=True))
            loss = F.cross_entropy(logits, labels)
            if not torch.isfinite(loss):
                raise HmamlError(f"pretrain: non-finite loss at epoch {epoch + 1}, step "
                                 f"{step + 1}; lower train.lr (now {cfg.train.lr})")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        schedule.step()
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / seen,
                               "train_acc": 100.0 * correct / seen,
                               "lr": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.train.epochs:
            result = evaluate(unwrapped.proto, val, accelerator)
            row.update(val_acc=result.mean, val_ci95=result.ci95)
            if result.mean > best_acc:
                best_acc, best_epoch = result.mean, epoch + 1
                if main:
                    save_encoder(rd.encoder, unwrapped.proto.encoder,
                                 cfg.model.encoder, image.channels, image.size,
                                 {"config": cfg.name, "epoch": epoch + 1, "val_acc": result.mean,
                                  "classes": len(data.info.names), "pack": packs.train.location,
                                  "split": cfg.data.train_split})
        history.append(row)
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        if main:
            rd.write_history(history)
            LOGGER.info(f"epoch {epoch + 1:4d}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  "
                       f"acc {row['train_acc']:.2f}"
                       + (f"  val (ProtoNet) {row['val_acc']:.2f} ± {row['val_ci95']:.2f}"
                          if "val_acc" in row else ""))
    wall = time.perf_counter() - start
    if main:
        tracker.log_artifact(rd.encoder)
        tracker.log_artifact(rd.history)
        print(f"  best val (ProtoNet) {best_acc:.2f} % at epoch {best_epoch} · wall time "
                   f"{wall / 60:.1f} min · encoder {rd.encoder} (model.init_from={rd.encoder})")
    tracker.end("FINISHED")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return PretrainResult(str(rd.encoder), best_epoch, best_acc, wall)
