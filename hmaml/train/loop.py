"""The training loop: meta-batches split across processes, exact resume, validation, test, MLflow.

One optimizer step consumes ``train.meta_batch`` tasks summed over all processes, split over any
number of processes by the distributed plan (:mod:`hmaml.train.plan`): each rank's share runs in
at most ``train.grad_accum`` micro-batches, each one vectorised forward pass, every task weighted
so that k processes and one process make the same update on the same tasks. An epoch is
``train.episodes_per_epoch`` tasks; the last step of an epoch takes the remainder rather than
dropping it. The engine is DDP, or DeepSpeed ZeRO-1/2 when ``accelerate launch`` was given a
DeepSpeed config; DeepSpeed checkpoints every rank's optimizer partition through Accelerate.

Checkpoints are written atomically at the end of every epoch (and at a step boundary when a stop
is requested, e.g. SIGTERM from SLURM): re-running the same config on the same ``run_dir``
resumes exactly where it stopped, the data stream included (it is a pure function of seed,
rank, worker and epoch; a stop mid-epoch replays the epoch's batches up to the step reached).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hmaml.config import Config, fingerprint, to_yaml
from hmaml.data.episodes import EvalLoader, eval_loader, train_loader
from hmaml.data.format import MANIFEST_NAME, read_manifest
from hmaml.errors import HmamlError
from hmaml.evaluate import EvalResult, evaluate
from hmaml.files import write_json_atomic
from hmaml.methods import Method, build_method
from hmaml.models import build_encoder
from hmaml.tasks import TaskBatch
from hmaml.train.checkpoint import (
    capture_rng,
    load_checkpoint,
    load_model_state,
    restore_best,
    restore_rng,
    save_checkpoint,
)
from hmaml.train.plan import Plan, make_plan
from hmaml.train.tracking import make_tracker, plot_learning_curve

CHECKPOINT, BEST, TEST, PROGRESS, HISTORY = ("checkpoint.pt", "best.pt", "test.json",
                                             "progress.json", "history.jsonl")
ZERO_PREFIX = "zero-state-"  # DeepSpeed's per-rank optimizer partitions, one folder per position


def deepspeed_requested() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it says so in the env)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: Config):
    """The Accelerator for this process, checked against what the launcher intended.

    On CPU, Accelerate needs ``cpu=True`` for DDP ranks to form a (gloo) process group; without
    it every rank silently trains alone. But ``cpu=True`` silently turns DeepSpeed into DDP, so
    DeepSpeed on CPU gets ``cpu=False`` with gloo named explicitly. The checks against
    ``WORLD_SIZE`` and the engine asked for make every such fallback loud.
    """
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = not torch.cuda.is_available()
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed = deepspeed_requested()
    if deepspeed:
        check_engine("DeepSpeed", cfg.train.mixed_precision, on_cpu)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and expected > 1 else []
    accelerator = Accelerator(cpu=on_cpu and not deepspeed,
                              mixed_precision=cfg.train.mixed_precision, kwargs_handlers=handlers)
    if accelerator.num_processes != expected:
        raise HmamlError(f"launched as {expected} processes (WORLD_SIZE) but Accelerate formed "
                         f"a group of {accelerator.num_processes}: on CPU use "
                         "configs/accelerate/cpu2.yaml or torchrun")
    if deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise HmamlError(f"DeepSpeed was asked for but Accelerate set up "
                         f"{accelerator.distributed_type}; is the deepspeed extra installed?")
    return accelerator


def check_engine(engine: str, precision: str, on_cpu: bool) -> None:
    """Refuse an engine/precision/device combination that cannot work, in one line."""
    if engine.startswith("DeepSpeed") and on_cpu and precision != "no":
        raise HmamlError(f"train.mixed_precision={precision} under DeepSpeed on CPU is not "
                         "supported by DeepSpeed (dtype mismatch); use train.mixed_precision=no "
                         "or plain DDP")


def engine_name(accelerator) -> str:
    """'single', 'DDP' or 'DeepSpeed ZeRO-<stage>' for the header, the plan and MLflow."""
    from accelerate import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "DDP" if accelerator.num_processes > 1 else "single"


def configure_deepspeed(accelerator, plan: Plan, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed config from hmaml's own keys, before ``prepare``.

    hmaml runs its micro-batches itself and marks the last one as the accumulation boundary,
    so DeepSpeed accumulates nothing of its own (one hmaml step is one DeepSpeed step);
    clipping comes from ``train.max_grad_norm`` alone (0 disables it in DeepSpeed), never from
    Accelerate's default of 1.0; the micro-batch size is the largest one of the plan.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    micro = max(len(mb.tasks) for mb in plan.rank_steps(0)[0])
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro * plan.processes
    ds["gradient_clipping"] = float(max_grad_norm or 0.0)
    accelerator.gradient_accumulation_steps = 1


def optimizer_step(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: list[TaskBatch], weights: list[float],
                   max_grad_norm: float | None = None) -> dict[str, float]:
    """One meta-update from this rank's micro-batches; returns this rank's loss and acc sums.

    ``weights[i]`` multiplies every task loss of micro-batch i: ``W / M`` for the step's M tasks
    on W ranks (DDP then averages over ranks), 0 for a padding micro-batch, whose tasks count
    in no metric. Under DeepSpeed the last backward is the accumulation boundary, where
    DeepSpeed clips and steps.
    """
    from accelerate import DistributedType

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    loss_sum = acc_sum = w_sum = b_sum = tasks = 0.0
    optimizer.zero_grad(set_to_none=True)
    for i, (batch, weight) in enumerate(zip(micro_batches, weights, strict=True)):
        last = i == len(micro_batches) - 1
        if deepspeed:  # Accelerate's DeepSpeed backward steps the engine at a sync point only
            accelerator.gradient_state._set_sync_gradients(last)
        sync = nullcontext() if last or deepspeed else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                out = model(batch)
            accelerator.backward(out.task_loss.sum() * weight)
        if weight == 0.0:
            continue
        tasks += batch.num_tasks
        loss_sum += float(out.task_loss.detach().sum())
        acc_sum += float(out.accuracy(batch.query_y).sum())
        if out.weight_update_norm is not None:
            w_sum += float(out.weight_update_norm.sum())
            b_sum += float(out.bias_update_norm.sum())
    if not deepspeed:
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return {"loss": loss_sum, "acc": acc_sum, "weight_norm": w_sum, "bias_norm": b_sum,
            "tasks": tasks}


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


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Trainer:
    """Holds the state of one training run; :func:`train` is the entry point."""

    def __init__(self, cfg: Config, accelerator, stop: StopFlag) -> None:
        self.cfg, self.acc, self.stop = cfg, accelerator, stop
        self.run_dir = Path(cfg.run_dir)
        self.main = accelerator.is_main_process
        data, train = cfg.data, cfg.train
        self.world = accelerator.num_processes
        self.deepspeed = engine_name(accelerator).startswith("DeepSpeed")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.plan = make_plan(cfg, self.world, nodes=max(self.world // local, 1),
                              engine=engine_name(accelerator))
        self.steps = self.plan.rank_steps(accelerator.process_index)
        self.eval_pack = Path(data.eval_pack or data.train_pack)
        self.train_manifest = read_manifest(data.train_pack)
        self.eval_manifest = read_manifest(self.eval_pack)
        for pack, manifest, splits in ((data.train_pack, self.train_manifest, [data.train_split]),
                                       (self.eval_pack, self.eval_manifest,
                                        [data.val_split, data.test_split])):
            for split in splits:
                if split not in manifest["splits"]:
                    raise HmamlError(f"{pack}/{MANIFEST_NAME}: no split {split!r} (it has "
                                     f"{', '.join(manifest['splits'])})")
        image = self.train_manifest["image"]
        torch.manual_seed(cfg.seed)
        encoder = build_encoder(cfg.model.encoder, image["channels"], image["size"])
        self.method: Method = build_method(cfg.method, encoder, data.n_way)
        if self.deepspeed:  # DeepSpeed flattens parameters through views of contiguous memory
            for param in self.method.parameters():
                param.data = param.data.contiguous()
        self.optimizer = torch.optim.Adam(self.method.parameters(), lr=train.lr,
                                          weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(train.lr_milestones), gamma=train.lr_gamma)
        self.epoch, self.resume_step = 0, 0
        self.best_val, self.best_epoch = -1.0, -1
        self.history: list[dict[str, Any]] = []
        self.tracker = make_tracker(cfg, self.main)
        zero_state = self._maybe_resume()
        if self.deepspeed:
            configure_deepspeed(accelerator, self.plan, train.max_grad_norm)
        self.model, self.optimizer = accelerator.prepare(self.method, self.optimizer)
        if zero_state is not None:
            accelerator.load_state(str(zero_state))
        self.train_data = train_loader(
            data.train_pack, data.train_split, n_way=data.n_way, n_shot=data.n_shot,
            n_query=data.n_query, tasks_per_batch=1, episodes=train.episodes_per_epoch,
            seed=cfg.seed, rank=accelerator.process_index, world_size=self.world,
            epoch=self.epoch, workers=data.workers, augment=data.augment,
            buffer_mb=data.buffer_mb, image_size=image["size"],
            batches=[mb.tasks for step in self.steps for mb in step])
        self.val_data = self._eval_loader(data.val_split, cfg.eval.val_episodes, data.n_query)

    # ------------------------------------------------------------------ setup helpers
    def _eval_loader(self, split: str, episodes: int, n_query: int, seed_offset: int = 0
                     ) -> EvalLoader:
        cfg = self.cfg
        return eval_loader(self.eval_pack, split, n_way=cfg.data.n_way, n_shot=cfg.data.n_shot,
                           n_query=n_query, n_episodes=episodes, seed=cfg.eval.seed + seed_offset,
                           rank=self.acc.process_index, world_size=self.world,
                           tasks_per_batch=cfg.eval.tasks_per_batch,
                           image_size=self.train_manifest["image"]["size"])

    def _maybe_resume(self) -> Path | None:
        """Load the checkpoint if there is one; returns the DeepSpeed state folder to load
        after ``prepare`` (the optimizer partitions), if the checkpoint has one."""
        path = self.run_dir / CHECKPOINT
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
        # the schedule is the config's, even when it changed since the checkpoint was written
        self.scheduler.milestones = Counter(self.cfg.train.lr_milestones)
        self.scheduler.gamma = self.cfg.train.lr_gamma
        restore_rng(state["rng"])
        self.epoch = int(state["stream"]["epoch"])
        self.resume_step = int(state["stream"]["step"])
        self.best_val, self.best_epoch = float(state["best_val_acc"]), int(state["best_epoch"])
        history = self.run_dir / HISTORY
        if history.is_file():
            rows = [json.loads(line) for line in history.read_text().splitlines() if line]
            self.history = [row for row in rows if row["epoch"] < self.epoch]
        return self.run_dir / zero if zero else None

    def _save(self, epoch: int, step: int) -> None:
        """Checkpoint: the next thing to run is ``step`` of ``epoch``.

        Under DeepSpeed every rank writes its optimizer partition through Accelerate into a
        folder named by the position; ``checkpoint.pt`` (written atomically last) names the
        folder it goes with, so a crash at any point leaves a consistent pair.
        """
        zero = None
        if self.deepspeed:
            zero = f"{ZERO_PREFIX}{epoch:06d}-{step:06d}"
            self.acc.save_state(str(self.run_dir / zero))
        self.acc.wait_for_everyone()
        if self.main:
            save_checkpoint(self.run_dir / CHECKPOINT, {
                "model": self.acc.unwrap_model(self.model).state_dict(),
                "optimizer": {} if self.deepspeed else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": capture_rng(),
                "stream": {"epoch": epoch, "step": step},
                "epoch": epoch,
                "best_val_acc": self.best_val,
                "best_epoch": self.best_epoch,
                "config_yaml": to_yaml(self.cfg),
                "fingerprint": fingerprint(self.cfg),
                "zero_state": zero,
            })
            for old in self.run_dir.glob(f"{ZERO_PREFIX}*"):
                if old.name != zero:
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop: all ranks must stop at the same step, or the
        others would wait forever in the next all-reduce (SLURM signals may reach one rank)."""
        if self.world == 1:
            return self.stop()
        flag = torch.tensor([float(self.stop())], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def _progress(self, status: str) -> None:
        if self.main:
            write_json_atomic(self.run_dir / PROGRESS, {
                "epoch": self.epoch, "epochs": self.cfg.train.epochs, "status": status,
                "best_val_acc": self.best_val if self.best_epoch >= 0 else None})

    # ------------------------------------------------------------------ the loop
    def run_epoch(self, epoch: int, start_step: int) -> dict[str, float] | None:
        """Train one epoch from ``start_step``; None when a stop was requested."""
        method = self.acc.unwrap_model(self.model)
        method.set_epoch(epoch)
        self.train_data.dataset.set_epoch(epoch)
        totals = {"loss": 0.0, "acc": 0.0, "weight_norm": 0.0, "bias_norm": 0.0, "tasks": 0.0}
        batches: Iterator[TaskBatch] = iter(self.train_data)
        bar = tqdm(total=len(self.steps), initial=start_step, disable=not self.main
                   or not self.cfg.train.progress, desc=f"epoch {epoch + 1}/"
                   f"{self.cfg.train.epochs}", leave=False, dynamic_ncols=True)
        for step, micro_plan in enumerate(self.steps):
            micro = [next(batches) for _ in micro_plan]
            if step < start_step:  # replaying a stopped epoch: the stream is deterministic
                continue
            micro = [b.to(self.acc.device, non_blocking=True) for b in micro]
            weight = self.plan.weight(step)
            metrics = optimizer_step(self.acc, self.model, self.optimizer, micro,
                                     [0.0 if mb.padding else weight for mb in micro_plan],
                                     self.cfg.train.max_grad_norm)
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
        reduced = self.acc.reduce(torch.tensor(list(totals.values()), dtype=torch.float64,
                                               device=self.acc.device), reduction="sum")
        totals = dict(zip(totals, reduced.tolist(), strict=True))
        n = max(totals.pop("tasks"), 1.0)
        metrics = {f"train_{k}": v / n for k, v in totals.items()}
        metrics["train_acc"] *= 100.0  # percent, like every accuracy the run reports
        return metrics | {"p": method_p(method)}

    def fit(self) -> str:
        """Train until the configured epochs are done or a stop arrives; 'finished'/'preempted'."""
        cfg = self.cfg
        while self.epoch < cfg.train.epochs:
            epoch, start = self.epoch, self.resume_step
            lr = self.optimizer.param_groups[0]["lr"]
            metrics = self.run_epoch(epoch, start)
            if metrics is None:
                self._progress("preempted")
                return "preempted"
            self.scheduler.step()
            metrics["lr"] = lr
            if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.train.epochs:
                val = evaluate(self.model, self.val_data, self.acc)
                metrics["val_acc"] = val.mean
                metrics["val_ci95"] = val.ci95
                if val.mean > self.best_val:
                    self.best_val, self.best_epoch = val.mean, epoch
                    self._save_best(epoch)
                    self.tracker.set_tags({"milestone.best_epoch": epoch + 1})
            self.epoch, self.resume_step = epoch + 1, 0
            self._record(epoch, metrics)
            self._save(self.epoch, 0)
            self._progress("running")
            if self.stop_agreed() and self.epoch < cfg.train.epochs:
                self._progress("preempted")
                return "preempted"
        return "finished"

    def _save_best(self, epoch: int) -> None:
        self.acc.wait_for_everyone()
        if self.main:
            model = self.acc.unwrap_model(self.model)
            save_checkpoint(self.run_dir / BEST, {
                "model": model.state_dict(), "optimizer": {}, "scheduler": {}, "rng": {},
                "stream": {"epoch": epoch + 1, "step": 0}, "epoch": epoch + 1,
                "best_val_acc": self.best_val, "best_epoch": epoch,
                "config_yaml": to_yaml(self.cfg), "fingerprint": fingerprint(self.cfg)})

    def _record(self, epoch: int, metrics: dict[str, float]) -> None:
        row = {"epoch": epoch + 1, **metrics}
        self.history.append(row)
        if self.main:
            with open(self.run_dir / HISTORY, "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in self.history)
            self.tracker.log_metrics(metrics, step=epoch + 1)
            self.tracker.set_tags(milestones(self.cfg, epoch))
            if self.cfg.train.progress:
                val = f"  val {metrics['val_acc']:.2f}%" if "val_acc" in metrics else ""
                tqdm.write(f"epoch {epoch + 1:4d}/{self.cfg.train.epochs}  loss "
                           f"{metrics['train_loss']:.4f}  acc {metrics['train_acc']:.2f}%"
                           f"{val}  p {metrics['p']:.2f}  lr {metrics['lr']:.2e}")

    def test(self, episodes: int | None = None, seed_offset: int = 0) -> EvalResult:
        """Test the best checkpoint (validated, hence what is reported) on the fixed episodes."""
        cfg = self.cfg
        best = self.run_dir / BEST
        method = self.acc.unwrap_model(self.model)
        if best.is_file():
            restore_best(method, best, fingerprint(cfg))
        loader = self._eval_loader(cfg.data.test_split, episodes or cfg.eval.test_episodes,
                                   cfg.data.test_query, seed_offset)
        return evaluate(self.model, loader, self.acc)


def method_p(method: Method) -> float:
    """The MAML weight of the warm-up switch (0 for methods without one)."""
    return float(getattr(method, "p", 0.0))


def milestones(cfg: Config, epoch: int) -> dict[str, int]:
    """Milestone tags reached at the end of ``epoch`` (0-based): warm-up/switch end, LR drops."""
    done = epoch + 1
    tags: dict[str, int] = {}
    method = cfg.method
    if cfg.method.name == "hypermaml" and method.switch:
        if done == method.warmup_start:
            tags["milestone.warmup_end"] = done
        if done == method.warmup_start + method.warmup_len:
            tags["milestone.switch_end"] = done
    for i, milestone in enumerate(cfg.train.lr_milestones):
        if done == milestone:
            tags[f"milestone.lr_drop_{i + 1}"] = done
    return tags


def _header(trainer: Trainer) -> str:
    cfg, acc = trainer.cfg, trainer.acc
    tm, em = trainer.train_manifest, trainer.eval_manifest
    count = lambda m, s: len(m["splits"][s]["classes"])  # noqa: E731
    lines = [
        f"hmaml · {cfg.name}: {cfg.method.name} + {cfg.model.encoder}, {cfg.data.n_way}-way "
        f"{cfg.data.n_shot}-shot",
        f"  processes {acc.num_processes} on {acc.device} ({trainer.plan.engine}), "
        f"mixed precision {cfg.train.mixed_precision}, host {socket.gethostname()}",
        f"  data: {tm['dataset']} {cfg.data.train_split} {count(tm, cfg.data.train_split)} "
        f"classes -> {em['dataset']} {cfg.data.val_split} {count(em, cfg.data.val_split)} / "
        f"{cfg.data.test_split} {count(em, cfg.data.test_split)} classes",
        f"  budget: {cfg.train.epochs} epochs x {cfg.train.episodes_per_epoch} episodes",
        *(f"  {line}" for line in trainer.plan.lines()[1:]),
        f"  run dir: {trainer.run_dir}",
    ]
    if trainer.epoch or trainer.resume_step:
        lines.append(f"  resuming at epoch {trainer.epoch + 1}, step {trainer.resume_step}")
    return "\n".join(lines)


def train(cfg: Config, *, parent_run_id: str | None = None,
          stop_requested: Callable[[], bool] | None = None,
          tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train, validate and test one config; resumes from ``cfg.run_dir`` when it holds a run.

    Returns the test summary (``status`` 'finished'), or ``status`` 'preempted' after a stop
    request (SIGTERM or ``stop_requested()``) with a checkpoint written.
    """
    run_dir = Path(cfg.run_dir)
    done = run_dir / TEST
    if done.is_file():  # finished: return its result, if this config could have made it
        load_checkpoint(run_dir / CHECKPOINT, fingerprint(cfg))
        return json.loads(done.read_text())
    start = time.perf_counter()
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    with StopFlag(stop_requested) as stop:
        trainer = Trainer(cfg, accelerator, stop)
        if accelerator.is_main_process:
            tqdm.write(_header(trainer))
        run_tags = {"world_size": accelerator.num_processes, "engine": trainer.plan.engine,
                    "train_pack.manifest_sha256": _file_sha256(
                        Path(cfg.data.train_pack) / MANIFEST_NAME),
                    "eval_pack.manifest_sha256": _file_sha256(trainer.eval_pack / MANIFEST_NAME),
                    **(tags or {})}
        run_id = trainer.tracker.start(cfg, run_dir, run_tags, parent_run_id=parent_run_id)
        try:
            status = trainer.fit()
            if status == "preempted":
                trainer.tracker.end("KILLED")
                return {"status": "preempted", "epoch": trainer.epoch, "run_dir": str(run_dir),
                        "mlflow_run_id": run_id}
            result = trainer.test()
        except BaseException:
            trainer.tracker.end("FAILED")
            raise
    wall = time.perf_counter() - start
    summary = {"status": "finished", "test_acc": result.mean, "test_ci": result.ci95,
               "test_episodes": int(result.accuracies.size),
               "best_val_acc": trainer.best_val, "best_epoch": trainer.best_epoch + 1,
               "epoch": trainer.epoch, "wall_s": wall, "run_dir": str(run_dir),
               "mlflow_run_id": run_id, "weight_update_norm": result.weight_update_norm,
               "bias_update_norm": result.bias_update_norm}
    if accelerator.is_main_process:
        _finish(trainer, result, summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _finish(trainer: Trainer, result: EvalResult, summary: dict[str, Any]) -> None:
    """Write the test files and plot, log them, print the closing summary."""
    run_dir, tracker = trainer.run_dir, trainer.tracker
    write_json_atomic(run_dir / "test_accuracies.json",
                {"accuracies": [round(float(a), 6) for a in result.accuracies]})
    curve = plot_learning_curve(trainer.history, run_dir / "learning_curve.png") \
        if trainer.history else None
    tracker.log_metrics({"test_acc": result.mean, "test_ci95": result.ci95}, step=trainer.epoch)
    write_json_atomic(run_dir / TEST, summary)
    for name in ("config.yaml", TEST, "test_accuracies.json", HISTORY):
        tracker.log_artifact(run_dir / name)
    if curve is not None:
        tracker.log_artifact(curve)
    if trainer.cfg.tracking.log_checkpoint and (run_dir / BEST).is_file():
        tracker.log_artifact(run_dir / BEST, "checkpoints")
    tracker.end("FINISHED")
    write_json_atomic(run_dir / PROGRESS, {
        "epoch": trainer.epoch, "epochs": trainer.cfg.train.epochs, "status": "finished",
        "best_val_acc": trainer.best_val})
    tqdm.write(
        f"test: {result.mean:.2f} ± {result.ci95:.2f} % over {result.accuracies.size} episodes "
        f"(best epoch {summary['best_epoch']}, val {trainer.best_val:.2f} %)\n"
        f"  wall time {summary['wall_s'] / 60:.1f} min · run {run_dir} · checkpoint "
        f"{run_dir / BEST} · MLflow run {summary['mlflow_run_id'] or 'off'}"
        f"{' in ' + str(tracker.uri) if getattr(tracker, 'uri', None) else ''}")


__all__ = ["Trainer", "make_accelerator", "optimizer_step", "train"]
