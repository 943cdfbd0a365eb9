"""The training loop: meta-batches split across processes, exact resume, validation, test, MLflow.

One optimizer step consumes ``train.meta_batch`` tasks summed over all processes, split over any
number of processes by the distributed plan (:mod:`hmaml.train.plan`): each rank's share runs in
at most ``train.grad_accum`` micro-batches, each one vectorised forward pass, every task weighted
so that k processes and one process make the same update on the same tasks. An epoch is
``train.episodes_per_epoch`` tasks; the last step of an epoch takes the remainder rather than
dropping it. The engine is DDP, or DeepSpeed ZeRO-1/2 when ``accelerate launch`` was given a
DeepSpeed config (:mod:`hmaml.train.engine`); DeepSpeed checkpoints every rank's optimizer
partition through Accelerate.

Checkpoints are written atomically at the end of every epoch (and at a step boundary when a stop
is requested, e.g. SIGTERM from SLURM): re-running the same config on the same ``run_dir``
resumes exactly where it stopped, the data stream included (it is a pure function of seed,
rank, worker and epoch; a stop mid-epoch replays the epoch's batches up to the step reached).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from hmaml.allocator import keep_freed_memory
from hmaml.config import Config, fingerprint, to_yaml
from hmaml.data.stream import EpisodeStream, train_loader
from hmaml.errors import HmamlError
from hmaml.files import MB, DiskFullError, free_bytes, mount_point
from hmaml.log import LOGGER, show_bars
from hmaml.methods import Method, method_class
from hmaml.models import fused
from hmaml.plots import plot_learning_curve
from hmaml.precision import resolve_precision
from hmaml.tasks import TaskBatch
from hmaml.train.build import build_model, episodes_of, open_packs
from hmaml.train.checkpoint import (
    capture_rng,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from hmaml.train.engine import (
    agree,
    configure_deepspeed,
    engine_name,
    is_rank0,
    make_accelerator,
)
from hmaml.train.evaluate import evaluate
from hmaml.train.peers import Peers
from hmaml.train.plan import make_plan
from hmaml.train.protocol import TestReport, test_best
from hmaml.train.rundir import RunDir, Status, TrainResult, wall_time
from hmaml.train.tracking import make_tracker, ui_line


class NonFiniteError(HmamlError):
    """Training produced a NaN or inf; the last checkpoint written stays the last finite one."""


def optimizer_step(accelerator: Accelerator, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, micro_batches: list[TaskBatch],
                   weights: list[float], max_grad_norm: float | None = None
                   ) -> tuple[dict[str, float], str | None]:
    """One meta-update from this rank's micro-batches: this rank's loss and acc sums, and what
    went non-finite (``"loss"``, ``"gradient norm"``) if anything did, in which case nothing
    was stepped.

    ``weights[i]`` multiplies every task loss of micro-batch i: ``W / M`` for the step's M tasks
    on W ranks (DDP then averages over ranks), 0 for a padding micro-batch, whose tasks count
    in no metric. The gradient norm is the same on every rank after the all-reduce, so all ranks
    agree on a non-finite step; DeepSpeed steps inside the last backward, so there the ranks
    agree on the losses before it. Under fp16 the loss scaler owns gradient overflow.
    """
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    sums = {"loss": 0.0, "acc": 0.0, "weight_norm": 0.0, "bias_norm": 0.0, "tasks": 0.0}
    finite = True
    optimizer.zero_grad(set_to_none=True)
    for i, (batch, weight) in enumerate(zip(micro_batches, weights, strict=True)):
        last = i == len(micro_batches) - 1
        if deepspeed:  # Accelerate's DeepSpeed backward steps the engine at a sync point only
            accelerator.gradient_state._set_sync_gradients(last)
        sync = nullcontext() if last or deepspeed else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                out = model(batch)
            finite = finite and bool(torch.isfinite(out.task_loss.detach()).all())
            if deepspeed and last and not agree(accelerator, finite):
                return sums, "loss"
            accelerator.backward(out.task_loss.sum() * weight)
        if weight == 0.0:
            continue
        sums["tasks"] += batch.num_tasks
        sums["loss"] += float(out.task_loss.detach().sum())
        sums["acc"] += float(out.accuracy(batch.query_y).sum())
        if out.weight_update_norm is not None:
            sums["weight_norm"] += float(out.weight_update_norm.sum())
            sums["bias_norm"] += float(out.bias_update_norm.sum())
    if deepspeed:
        return sums, None
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    if not finite or (accelerator.mixed_precision != "fp16" and not torch.isfinite(norm)):
        return sums, "loss" if not finite else "gradient norm"
    for param in accelerator.unwrap_model(model).resting_parameters():
        param.grad = None  # reduced as zeros (no unused-parameter search), never stepped
    optimizer.step()
    return sums, None


class StopFlag:
    """Set by SIGTERM (SLURM preemption) or a caller's predicate; checked at step boundaries."""

    def __init__(self, predicate: Callable[[], bool] | None) -> None:
        self.predicate = predicate
        self.signalled = False
        self._previous: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or bool(self.predicate and self.predicate())


class Trainer:
    """Holds the state of one training run; :func:`train` is the entry point."""

    def __init__(self, cfg: Config, rd: RunDir, accelerator: Accelerator, stop: StopFlag) -> None:
        self.cfg, self.rd, self.accelerator, self.stop = cfg, rd, accelerator, stop
        self.on_validation: Callable[[int, float], bool] | None = None  # a search's pruner
        self.started = time.perf_counter()
        # seconds the run spent in earlier processes (None: a checkpoint that did not record
        # them) and how many processes it took, so a resumed run reports its whole time
        self.earlier_s: float | None = 0.0
        self.processes = 1
        self.main = accelerator.is_main_process
        data, train = cfg.data, cfg.train
        self.world = accelerator.num_processes
        engine = engine_name(accelerator)
        self.deepspeed = engine.startswith("DeepSpeed")
        if self.deepspeed and train.nonfinite == "skip":
            raise HmamlError("train.nonfinite=skip cannot work under DeepSpeed (it steps inside "
                             "the backward pass); use train.nonfinite=stop")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.plan = make_plan(cfg, self.world, nodes=max(self.world // local, 1), engine=engine)
        self.steps = self.plan.rank_steps(accelerator.process_index)
        self.packs = open_packs(cfg)
        self.precision = resolve_precision(train.mixed_precision, accelerator.device,
                                           compiled=train.compile)
        self.method: Method = build_model(cfg, self.packs.image, self.precision, accelerator.device)
        if self.deepspeed:  # DeepSpeed flattens parameters through views of contiguous memory
            for param in self.method.parameters():
                param.data = param.data.contiguous()
        # fused: one kernel for all parameters on CUDA (CPU keeps the default, same figures)
        self.optimizer = torch.optim.Adam(self.method.parameters(), lr=train.lr,
                                          weight_decay=train.weight_decay,
                                          fused=accelerator.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(train.lr_milestones), gamma=train.lr_gamma)
        self.epoch, self.resume_step = 0, 0
        self.best_val, self.best_epoch, self.best_p = -1.0, -1, 1.0
        self.skipped_in_a_row = 0
        self.history: list[dict[str, Any]] = []
        self.tracker = make_tracker(cfg, self.main)
        zero_state = self._maybe_resume()
        if self.deepspeed:
            configure_deepspeed(accelerator, self.plan, train.max_grad_norm)
        self.model, self.optimizer = accelerator.prepare(self.method, self.optimizer)
        if zero_state is not None:
            accelerator.load_state(str(zero_state))
        self.train_data = train_loader(
            self.packs.train, data.train_split, n_way=data.n_way, n_shot=data.n_shot,
            n_query=data.n_query, tasks_per_batch=1, episodes=train.episodes_per_epoch,
            seed=cfg.seed, rank=accelerator.process_index, world_size=self.world,
            epoch=self.epoch, workers=data.workers, augment=data.augment,
            buffer_mb=data.buffer_mb, image_size=self.packs.image.size,
            batches=[mb.tasks for step in self.steps for mb in step])
        self.val_data = episodes_of(cfg, self.packs, data.val_split, cfg.eval.val_episodes,
                                    data.n_query, rank=accelerator.process_index,
                                    world=self.world)

    # ------------------------------------------------------------------ state on disk
    def _maybe_resume(self) -> Path | None:
        """Load the checkpoint if there is one; returns the DeepSpeed state folder to load
        after ``prepare`` (the optimizer partitions), if the checkpoint has one."""
        path = self.rd.checkpoint
        if not path.is_file():
            return None
        state = load_checkpoint(path, fingerprint(self.cfg))
        zero = state.get("zero_state")
        if bool(zero) != self.deepspeed:
            raise HmamlError(f"{path} was written {'with' if zero else 'without'} DeepSpeed and "
                             f"cannot resume {'without' if zero else 'with'} it: relaunch with "
                             "the accelerate config it was made with")
        load_model_state(self.method, state["model"], path)
        if not zero:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the schedule is the config's, which may differ from the checkpoint's only in the
        # milestones still to come (a milestone m acts after the m-th epoch)
        passed = self.scheduler.last_epoch
        wanted = [m for m in self.cfg.train.lr_milestones if m <= passed]
        if sorted(wanted) != sorted(m for m in self.scheduler.milestones.elements() if m <= passed):
            raise HmamlError(f"{path}: train.lr_milestones {list(self.cfg.train.lr_milestones)} "
                             f"changes the learning rate of the {passed} epochs already trained; "
                             f"only milestones after epoch {passed} may be added or moved")
        self.scheduler.milestones = Counter(self.cfg.train.lr_milestones)
        self.scheduler.gamma = self.cfg.train.lr_gamma
        restore_rng(state["rng"])
        self.epoch = int(state["stream"]["epoch"])
        self.resume_step = int(state["stream"]["step"])
        self.best_val, self.best_epoch = float(state["best_val_acc"]), int(state["best_epoch"])
        self.best_p = float(state.get("best_p", 1.0))
        earlier = state.get("run_s")
        self.earlier_s = None if earlier is None else float(earlier)
        self.processes = int(state.get("processes", 1)) + 1
        self.history = [row for row in self.rd.read_history()
                        if row["epoch"] <= self.epoch]  # rows are 1-based
        return self.rd.path / zero if zero else None

    def _state(self, epoch: int, step: int, *, full: bool, zero: str | None = None
               ) -> dict[str, Any]:
        """The contents of ``checkpoint.pt`` (``full``: optimizer, schedule, random state and
        stream position to resume from) or of ``best.pt`` (weights and what selected them)."""
        state: dict[str, Any] = {
            "model": self.accelerator.unwrap_model(self.model).state_dict(),
            "optimizer": {}, "scheduler": {}, "rng": {},
            "stream": {"epoch": epoch, "step": step}, "epoch": epoch,
            "best_val_acc": self.best_val, "best_epoch": self.best_epoch, "best_p": self.best_p,
            "config_yaml": to_yaml(self.cfg), "fingerprint": fingerprint(self.cfg),
            "image": self.packs.image.as_dict(), "zero_state": zero,
            "run_s": self.run_seconds(), "processes": self.processes}
        if full:
            state.update(optimizer={} if self.deepspeed else self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), rng=capture_rng())
        return state

    def checkpoint_bytes(self) -> int:
        """A checkpoint's size: the last one written, else the parameters and Adam's two
        moments of each (what the first checkpoint will hold, give or take its small keys)."""
        if self.rd.checkpoint.is_file():
            return self.rd.checkpoint.stat().st_size
        return 3 * sum(p.numel() * p.element_size() for p in self.method.parameters())

    def training_rate(self) -> float | None:
        """Training tasks per second over the epochs trained (their training time alone);
        None when an epoch of the history did not record its time (an older run)."""
        seconds = [row["epoch_s"] for row in self.history if row.get("epoch_s") is not None]
        if not seconds or len(seconds) < len(self.history):
            return None
        return len(seconds) * self.cfg.train.episodes_per_epoch / sum(seconds)

    def run_seconds(self) -> float | None:
        """Seconds the run has taken so far over all its processes; a process's time after its
        last checkpoint (an extended run's first test) is not part of the run."""
        if self.earlier_s is None:
            return None
        return self.earlier_s + time.perf_counter() - self.started

    def _save(self, epoch: int, step: int) -> None:
        """Checkpoint: the next thing to run is ``step`` of ``epoch``.

        Under DeepSpeed every rank writes its optimizer partition through Accelerate into a
        folder named by the position; ``checkpoint.pt`` (written atomically last) names the
        folder it goes with, so a crash at any point leaves a consistent pair.
        """
        zero = None
        if self.deepspeed:
            zero = self.rd.zero_state(epoch, step)
            self.accelerator.save_state(str(zero))
        self.accelerator.wait_for_everyone()
        if self.main:
            save_checkpoint(self.rd.checkpoint, self._state(
                epoch, step, full=True, zero=zero.name if zero else None))
            for old in self.rd.zero_states():
                if zero is None or old != zero:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _save_best(self, epoch: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.main:
            save_checkpoint(self.rd.best, self._state(epoch + 1, 0, full=False))

    def pruned(self, epoch: int, val_acc: float) -> bool:
        """Whether the search's pruner stops the trial after this validation (rank 0 asks it;
        every rank stops at the same epoch)."""
        if self.on_validation is None:
            return False
        return not agree(self.accelerator, not (self.main and self.on_validation(epoch, val_acc)))

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: all ranks must stop at the same step, or the
        others would wait forever in the next all-reduce (SLURM signals may reach one rank)."""
        return not agree(self.accelerator, not self.stop())

    def progress(self, status: Status, error: str | None = None) -> None:
        if self.main:
            self.rd.write_progress(self.epoch, self.cfg.train.epochs, status,
                                   self.best_val if self.best_epoch >= 0 else None, error)

    # ------------------------------------------------------------------ the loop
    def run_epoch(self, epoch: int, start_step: int) -> dict[str, float] | None:
        """Train one epoch from ``start_step``; None when a stop was requested."""
        method = self.accelerator.unwrap_model(self.model)
        method.set_epoch(epoch)
        cast(EpisodeStream, self.train_data.dataset).set_epoch(epoch)  # train_loader's dataset
        totals = {"loss": 0.0, "acc": 0.0, "weight_norm": 0.0, "bias_norm": 0.0, "tasks": 0.0,
                  "skipped_steps": 0.0}
        batches: Iterator[TaskBatch] = iter(self.train_data)
        bar = tqdm(total=len(self.steps), initial=start_step,
                   disable=not (self.main and show_bars(self.cfg.train.progress)),
                   desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", leave=False,
                   dynamic_ncols=True)
        for step, micro_plan in enumerate(self.steps):
            micro = [next(batches) for _ in micro_plan]
            if step < start_step:  # replaying a stopped epoch: the stream is deterministic
                continue
            micro = [b.to(self.accelerator.device, non_blocking=True) for b in micro]
            weight = self.plan.weight(step)
            metrics, nonfinite = optimizer_step(
                self.accelerator, self.model, self.optimizer, micro,
                [0.0 if mb.padding else weight for mb in micro_plan],
                self.cfg.train.max_grad_norm)
            if nonfinite is not None:
                self._nonfinite(epoch, step, nonfinite)
                totals["skipped_steps"] += 1.0
            else:
                self.skipped_in_a_row = 0
                for key, value in metrics.items():
                    totals[key] += value
            bar.update(1)
            if metrics["tasks"]:
                bar.set_postfix(loss=f"{metrics['loss'] / metrics['tasks']:.3f}",
                                acc=f"{metrics['acc'] / metrics['tasks']:.3f}")
            if self.stop_agreed() and step + 1 < len(self.steps):
                bar.close()
                self._save(epoch, step + 1)
                return None
        bar.close()
        reduced = self.accelerator.reduce(torch.tensor(list(totals.values()), dtype=torch.float64,
                                               device=self.accelerator.device), reduction="sum")
        totals = dict(zip(totals, reduced.tolist(), strict=True))
        skipped = totals.pop("skipped_steps") / self.world  # every rank counted each one
        n = max(totals.pop("tasks"), 1.0)
        metrics = {f"train_{k}": v / n for k, v in totals.items()}
        metrics["train_acc"] *= 100.0  # percent, like every accuracy the run reports
        if self.cfg.train.nonfinite == "skip":
            metrics["train_skipped_steps"] = skipped
        return metrics | {"p": float(method.p)}

    def _nonfinite(self, epoch: int, step: int, what: str) -> None:
        """Stop on a non-finite step (``train.nonfinite``: stop), or count it (skip) and stop
        after ``train.nonfinite_patience`` in a row."""
        train = self.cfg.train
        where = f"epoch {epoch + 1}, step {step + 1}: the training {what} is not finite"
        keep = (f"the last finite checkpoint, {self.rd.checkpoint}, is kept" if
                self.rd.checkpoint.is_file() else "no checkpoint was written")
        if train.nonfinite == "stop":
            raise NonFiniteError(f"{where}; training stopped ({keep}); lower train.lr, set "
                                 "train.max_grad_norm, or train.nonfinite=skip")
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= train.nonfinite_patience:
            raise NonFiniteError(f"{where}, {self.skipped_in_a_row} steps in a row "
                                 f"(train.nonfinite_patience={train.nonfinite_patience}); "
                                 f"training stopped ({keep})")

    def fit(self) -> Status:
        """Train until the configured epochs are done or a stop arrives."""
        cfg = self.cfg
        while self.epoch < cfg.train.epochs:
            epoch, start = self.epoch, self.resume_step
            lr = self.optimizer.param_groups[0]["lr"]
            began = time.perf_counter()
            metrics = self.run_epoch(epoch, start)
            if metrics is None:
                self.progress(Status.PREEMPTED)
                return Status.PREEMPTED
            self.scheduler.step()
            # the epoch's training alone (validation, checkpoints and start-up excluded), and
            # when it ended: trials that share a GPU are compared over their common window
            metrics.update(lr=lr, epoch_s=time.perf_counter() - began, time=time.time())
            pruned = False
            if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.train.epochs:
                val = evaluate(self.model, self.val_data, self.accelerator)
                pruned = self.pruned(epoch + 1, val.mean)
                metrics["val_acc"] = val.mean
                metrics["val_ci95"] = val.ci95
                p = metrics["p"]
                # once epochs in the tested form exist (HyperMAML: p = 0), only they can be
                # the best: the test is of that form, so it is selected as such
                tested = self.method.tested_at
                if (tested(p), val.mean) > (tested(self.best_p), self.best_val):
                    self.best_val, self.best_epoch, self.best_p = val.mean, epoch, p
                    self._save_best(epoch)
                    self.tracker.set_tags({"milestone.best_epoch": epoch + 1})
            self.epoch, self.resume_step = epoch + 1, 0
            self._record(epoch, metrics)
            self._save(self.epoch, 0)
            if pruned and self.epoch < cfg.train.epochs:
                self.progress(Status.PRUNED)
                return Status.PRUNED
            self.progress(Status.RUNNING)
            if self.stop_agreed() and self.epoch < cfg.train.epochs:
                self.progress(Status.PREEMPTED)
                return Status.PREEMPTED
        return Status.FINISHED

    def _record(self, epoch: int, metrics: dict[str, float]) -> None:
        row = {"epoch": epoch + 1, **metrics}
        self.history.append(row)
        if self.main:
            self.rd.write_history(self.history)
            # MLflow stamps every metric with its own time
            self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "time"},
                                     step=epoch + 1)
            self.tracker.set_tags(milestones(self.cfg, epoch))
            val = f"  val {metrics['val_acc']:.2f}%" if "val_acc" in metrics else ""
            LOGGER.info(f"epoch {epoch + 1:4d}/{self.cfg.train.epochs}  loss "
                        f"{metrics['train_loss']:.4f}  acc {metrics['train_acc']:.2f}%"
                        f"{val}  p {metrics['p']:.2f}  lr {metrics['lr']:.2e}")

    def test(self) -> TestReport:
        """Test the best checkpoint (validated, hence what is reported) by the test protocol."""
        method = self.accelerator.unwrap_model(self.model)
        reached_p0 = bool(self.history) and method.tested_at(self.history[-1]["p"])
        return test_best(self.model, method, self.cfg, self.packs, self.accelerator, self.rd.best,
                         reached_p0)


def milestones(cfg: Config, epoch: int) -> dict[str, int]:
    """Milestone tags reached at the end of ``epoch`` (0-based): the method's own (HyperMAML:
    warm-up and switch ends) and the LR drops."""
    done = epoch + 1
    tags = method_class(cfg.method.name).milestones(cfg.method, done)
    for i, milestone in enumerate(cfg.train.lr_milestones):
        if done == milestone:
            tags[f"milestone.lr_drop_{i + 1}"] = done
    return tags


def _header(trainer: Trainer, changes: list[str]) -> str:
    cfg, accelerator = trainer.cfg, trainer.accelerator
    tm, em = trainer.packs.train_manifest, trainer.packs.eval_manifest
    lines = [
        f"hmaml · {cfg.name}: {cfg.method.name} + {cfg.model.encoder}, {cfg.data.n_way}-way "
        f"{cfg.data.n_shot}-shot",
        f"  processes {accelerator.num_processes} on {accelerator.device} ({trainer.plan.engine}), "
        f"encoder precision {trainer.precision}, host {socket.gethostname()}",
        f"  {keep_freed_memory()}" + (f"; encoder blocks: {fused.status()}"
                                      if accelerator.device.type == "cpu" else ""),
        f"  data: {tm.dataset} {cfg.data.train_split} {tm.split_classes(cfg.data.train_split)} "
        f"classes -> {em.dataset} {cfg.data.val_split} {em.split_classes(cfg.data.val_split)} / "
        f"{cfg.data.test_split} {em.split_classes(cfg.data.test_split)} classes",
        *(f"  {key} read from {pack.location}" + (f", cached in {pack.cache_dir}"
                                                  if pack.cache_dir else "")
          for key, pack in (("train pack", trainer.packs.train),
                            ("eval pack", trainer.packs.eval)) if pack.remote),
        f"  budget: {cfg.train.epochs} epochs x {cfg.train.episodes_per_epoch} episodes",
        *(f"  {line}" for line in trainer.plan.lines()[1:]),
        f"  run dir: {trainer.rd.path}",
    ]
    free, need = free_bytes(trainer.rd.path), 2 * trainer.checkpoint_bytes()
    if free < need:
        lines.append(f"  warning: {free / MB:.1f} MB free on {mount_point(trainer.rd.path)}, "
                     f"less than two checkpoints ({need / MB:.1f} MB: a checkpoint is replaced "
                     "by writing the new one beside it); the run stops with an error when the "
                     "disk is full, and resumes once space is freed")
    if trainer.epoch or trainer.resume_step:
        lines.append(f"  resuming at epoch {trainer.epoch + 1}, step {trainer.resume_step}")
    if changes:
        lines.append(f"  changed since the run began: {'; '.join(changes)}")
    return "\n".join(lines)


def train(cfg: Config, *, parent_run_id: str | None = None,
          stop_requested: Callable[[], bool] | None = None,
          tags: dict[str, str] | None = None,
          on_validation: Callable[[int, float], bool] | None = None) -> TrainResult:
    """Train, validate and test one config; resumes from ``cfg.run_dir`` when it holds a run.

    A run folder belongs to the config that made it (another is refused, naming the keys)
    and to one process group at a time (rank 0 holds its lock). A finished run returns its
    stored result, printed; one extended by a larger ``train.epochs`` trains on. A stop request
    (SIGTERM or ``stop_requested()``) checkpoints and returns PREEMPTED; a non-finite loss or
    gradient raises :class:`NonFiniteError` with the run marked FAILED.
    ``on_validation(epoch, val_acc)`` (a search's pruner, asked on rank 0 after each
    validation) returning True ends the run PRUNED: checkpointed, not tested.
    """
    rd = RunDir(cfg.run_dir)
    changes = rd.check_config(cfg)
    stored = rd.read_test()
    if stored is not None and stored.get("epoch", 0) >= cfg.train.epochs:
        if is_rank0():
            print("\n".join([f"{rd.path} is finished (re-running does not train it again):",
                             *stored.get("lines", [])]))
        return TrainResult(Status.FINISHED, str(rd.path), int(stored["epoch"]),
                           stored.get("mlflow_run_id"), stored)
    with ExitStack() as stack:
        if is_rank0():
            stack.enter_context(rd.lock())
        return _train(cfg, rd, changes, parent_run_id, stop_requested, tags, on_validation)


def _train(cfg: Config, rd: RunDir, changes: list[str], parent_run_id: str | None,
           stop_requested: Callable[[], bool] | None, tags: dict[str, str] | None,
           on_validation: Callable[[int, float], bool] | None) -> TrainResult:
    start = time.perf_counter()
    keep_freed_memory()  # before the first step's activations: see hmaml.allocator
    accelerator = make_accelerator(cfg)
    peers = Peers.gather(accelerator.process_index, accelerator.num_processes,
                         cfg.train.dist_timeout_s)
    if accelerator.is_main_process:
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_config(cfg)
    with StopFlag(stop_requested) as stop, peers.named("while the run started"):
        trainer = Trainer(cfg, rd, accelerator, stop)
        trainer.on_validation = on_validation  # every rank agrees on what rank 0 is told
        if accelerator.is_main_process:
            LOGGER.info(_header(trainer, changes))
        run_tags = {"world_size": accelerator.num_processes, "engine": trainer.plan.engine,
                    "precision": trainer.precision.name,
                    "train_pack.manifest_sha256": trainer.packs.train_manifest.sha256,
                    "eval_pack.manifest_sha256": trainer.packs.eval_manifest.sha256,
                    **(tags or {})}
        run_id = trainer.tracker.start(cfg, rd.path, run_tags, parent_run_id=parent_run_id)
        try:
            status = trainer.fit()
            if status == Status.PREEMPTED:
                trainer.tracker.end("KILLED")
                return TrainResult(status, str(rd.path), trainer.epoch, run_id)
            if status == Status.PRUNED:
                trainer.tracker.set_tags({"pruned_at_epoch": trainer.epoch})
                trainer.tracker.end("KILLED")
                LOGGER.info(f"pruned by the search after epoch {trainer.epoch} (val "
                            f"{trainer.history[-1].get('val_acc', float('nan')):.2f} %)")
                return TrainResult(status, str(rd.path), trainer.epoch, run_id)
            report = trainer.test()
        except Exception as raised:
            # a collective that lost its peer: named (the ranks lost), and resumable
            exc = peers.explain(raised, f"in epoch {trainer.epoch + 1}" if trainer.epoch <
                                cfg.train.epochs else "after the last epoch")
            # on a full disk even progress.json may not fit: the error itself is what counts
            with contextlib.suppress(DiskFullError):
                trainer.progress(Status.FAILED, str(exc) if isinstance(exc, HmamlError) else
                                 f"{type(exc).__name__}: {exc}")
            trainer.tracker.set_tags({"failure": str(exc)[:500]})
            trainer.tracker.end("FAILED")
            if exc is not raised:
                raise exc from raised
            raise
        except BaseException:  # an exit inside a signal handler (submitit's requeue), Ctrl-C:
            trainer.tracker.end("FAILED")  # the run is not finished, nor known to be broken
            raise
    summary = {"status": Status.FINISHED.value, **report.as_json(),
               "best_val_acc": trainer.best_val, "epoch": trainer.epoch,
               "train_tasks_per_s": trainer.training_rate(),
               "wall_s": trainer.run_seconds(), "process_wall_s": time.perf_counter() - start,
               "processes": trainer.processes, "run_dir": str(rd.path),
               "mlflow_run_id": run_id, "lines": report.lines()}
    if accelerator.is_main_process:
        _finish(trainer, report, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(Status.FINISHED, str(rd.path), trainer.epoch, run_id, summary)


def _finish(trainer: Trainer, report: TestReport, summary: dict[str, Any]) -> None:
    """Write the test files and plot, log them, print the closing summary."""
    rd, tracker = trainer.rd, trainer.tracker
    curve = plot_learning_curve(trainer.history, rd.learning_curve) if trainer.history else None
    tracker.log_metrics({"test_acc": report.mean, "test_std": report.std,
                         "test_ci95": report.ci95, "tested_p": report.tested_p,
                         "best_val_acc": trainer.best_val,
                         **({} if summary["wall_s"] is None else
                            {"wall_min": summary["wall_s"] / 60})},
                        step=trainer.epoch)
    tracker.set_tags({"test.tested_p": report.tested_p, "test.repeats": len(report.repeats),
                      "test.reached_p0": report.reached_p0})
    rd.write_test(summary, [[round(float(a), 6) for a in r.accuracies]
                            for r in report.repeats])
    for path in (rd.config, rd.test, rd.test_accuracies, rd.history):
        tracker.log_artifact(path)
    if curve is not None:
        tracker.log_artifact(curve)
    if trainer.cfg.tracking.log_checkpoint and rd.best.is_file():
        tracker.log_artifact(rd.best, "checkpoints")
    # imports mlflow: only once a tracked run logs its model
    from hmaml.mlflow_model import log_run_model

    model = (log_run_model(tracker, rd.path, trainer.cfg.tracking.register)
             if trainer.cfg.tracking.log_model else None)
    tracker.end("FINISHED")
    trainer.progress(Status.FINISHED)
    print("\n".join([
        *report.lines(),
        f"  best val {trainer.best_val:.2f} % · {wall_time(summary)} · run {rd.path} · "
        f"checkpoint {rd.best} · MLflow run {summary['mlflow_run_id'] or 'off'}",
        *([f"  {model}"] if model else []),
        *mlflow_lines(tracker)]))


def mlflow_lines(tracker: Any) -> list[str]:
    """Where to look at the run in the MLflow UI (nothing when tracking is off)."""
    link = getattr(tracker, "link", None)
    return [f"  {ui_line(tracker.uri, link)}"] if link else []


__all__ = ["NonFiniteError", "Trainer", "optimizer_step", "train"]
