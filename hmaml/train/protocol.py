"""The test protocol: the best checkpoint, the method as it is tested, R independent lists.

The paper tests 600 episodes five times on independent episode lists and reports the mean of the
five means ± their standard deviation; the few-shot literature's usual ± is instead one list's
95 % confidence interval (1.96·σ/√n). Both are reported: ``eval.test_repeats`` lists, their mean
± std, and each list's own mean ± CI. HyperMAML is always tested with the hypernetwork alone
(p = 0), whatever p its best epoch was validated with; the report says which p that was, and
whether training ever reached p = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hmaml.allocator import keep_freed_memory
from hmaml.config import FINGERPRINT_KEYS, Config, config_from_yaml, fingerprint
from hmaml.errors import HmamlError
from hmaml.methods import Method
from hmaml.precision import resolve_precision
from hmaml.train.build import Packs, build_model, episodes_of, eval_tasks_per_batch, open_packs
from hmaml.train.checkpoint import restore_best
from hmaml.train.engine import make_accelerator
from hmaml.train.evaluate import EvalResult, evaluate
from hmaml.train.rundir import RunDir


@dataclass
class TestReport:
    """The repeats of one test and what was tested."""

    repeats: list[EvalResult]
    tested_p: float
    best_epoch: int  # 1-based
    best_epoch_p: float
    reached_p0: bool

    @property
    def mean(self) -> float:
        return float(np.mean([r.mean for r in self.repeats]))

    @property
    def std(self) -> float:
        return float(np.std([r.mean for r in self.repeats]))

    @property
    def ci95(self) -> float:
        """The mean of the repeats' 95 % CIs (one repeat: its CI)."""
        return float(np.mean([r.ci95 for r in self.repeats]))

    def as_json(self) -> dict[str, Any]:
        norms = [r.weight_update_norm for r in self.repeats]
        weight_norms = [n for n in norms if n is not None]
        return {
            "test_acc": self.mean, "test_std": self.std, "test_ci": self.ci95,
            "test_episodes": int(self.repeats[0].accuracies.size),
            "test_repeats": [{"acc": r.mean, "ci95": r.ci95} for r in self.repeats],
            "tested_p": self.tested_p, "best_epoch": self.best_epoch,
            "best_epoch_p": self.best_epoch_p, "reached_p0": self.reached_p0,
            "weight_update_norm": None if None in norms else float(np.mean(weight_norms)),
            "bias_update_norm": None if norms[0] is None else float(
                np.mean([r.bias_update_norm for r in self.repeats])),
            "repeat_weight_update_norms": norms,
            "repeat_bias_update_norms": [r.bias_update_norm for r in self.repeats],
            "test_seconds": [r.seconds for r in self.repeats],
        }

    def lines(self) -> list[str]:
        """The printed result: the number claimed and what it is a number of."""
        n, episodes = len(self.repeats), self.repeats[0].accuracies.size
        if n == 1:
            head = f"test: {self.mean:.2f} ± {self.ci95:.2f} % (95 % CI over {episodes} episodes)"
        else:
            cis = [r.ci95 for r in self.repeats]
            head = (f"test: {self.mean:.2f} ± {self.std:.2f} % (mean ± std over {n} repeats of "
                    f"{episodes} episodes; each repeat's 95 % CI ±{min(cis):.2f} to "
                    f"±{max(cis):.2f})")
        lines = [f"{head}, tested at p = {self.tested_p:g}, best epoch {self.best_epoch} "
                 f"(validated at p = {self.best_epoch_p:.3g})"]
        if not self.reached_p0:
            lines.append(f"  note: training never reached p = 0 (the best epoch was validated "
                         f"at p = {self.best_epoch_p:.3g}); this tests a hypernetwork that was "
                         "still being switched in")
        return lines


def test_best(model: Any, method: Method, cfg: Config, packs: Packs, accelerator, best: Path,
              reached_p0: bool, episodes: int | None = None, repeats: int | None = None,
              untimed_batch: bool = False) -> TestReport:
    """Test the best checkpoint in ``best`` (loaded into ``method``, which ``model`` wraps).

    ``untimed_batch`` first classifies one untimed batch of the timed batches' shape, so that the
    repeats' ``seconds`` exclude one-time kernel set-up (Tables 4 and 8)."""
    best_epoch = restore_best(method, best, fingerprint(cfg))
    best_p = method.p
    method.set_tested()
    if untimed_batch:
        batch = eval_tasks_per_batch(cfg, packs, cfg.data.test_query)
        evaluate(model, episodes_of(cfg, packs, cfg.data.test_split,
                                    batch * accelerator.num_processes, cfg.data.test_query,
                                    rank=accelerator.process_index,
                                    world=accelerator.num_processes), accelerator)
    results = [evaluate(model, episodes_of(cfg, packs, cfg.data.test_split,
                                           episodes or cfg.eval.test_episodes,
                                           cfg.data.test_query, rank=accelerator.process_index,
                                           world=accelerator.num_processes, repeat=r),
                        accelerator)
               for r in range(repeats or cfg.eval.test_repeats)]
    return TestReport(results, method.p, best_epoch + 1, best_p,
                      reached_p0)


def evaluate_run(run_dir: str | Path, episodes: int | None = None,
                 repeats: int | None = None, overrides: Sequence[str] = (), *,
                 untimed_batch: bool = False, write: bool = True) -> dict[str, Any]:
    """Re-test a run's best checkpoint (under ``accelerate launch`` too: episodes split across
    processes, results gathered); writes (with ``write``) and returns ``evaluate.json``.

    ``overrides`` (``key=value``) change how the trained model is tested, e.g.
    ``method.inner_steps=10`` for a MAML run (Tables 4 and 8); keys that fix parameter shapes
    are refused. ``untimed_batch`` first adapts one untimed batch, so that ``test_seconds`` exclude
    one-time kernel set-up.
    """
    keep_freed_memory()  # see hmaml.allocator
    rd = RunDir(run_dir)
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in FINGERPRINT_KEYS:  # the keys that fix the trained parameters' shapes
            raise HmamlError(f"--override {item}: {key} fixes the shapes of the trained "
                             f"parameters and cannot change at test time (fixed: "
                             f"{', '.join(FINGERPRINT_KEYS)})")
    if not rd.config.is_file():
        raise HmamlError(f"{rd.path}: not a run directory (no {rd.config.name})")
    # the checkpoint holds every weight: the encoder file of model.init_from is not needed
    cfg = config_from_yaml(rd.config.read_text(), str(rd.config),
                           [*overrides, "model.init_from=null"])
    if not rd.best.is_file():
        raise HmamlError(f"{rd.path}: no {rd.best.name} yet (the run has not validated an "
                         "epoch)")
    packs = open_packs(cfg, train=False)
    accelerator = make_accelerator(cfg, training=False)
    method = build_model(cfg, packs.image,
                         resolve_precision(cfg.train.mixed_precision, accelerator.device,
                                           compiled=cfg.train.compile),
                         accelerator.device)
    # one process: prepare() would only move the model there, after 0.7 s of looking for
    # DTensor parameters (a tenth of a 600-task evaluation on 2 cores)
    model = accelerator.prepare(method) if accelerator.num_processes > 1 else \
        method.to(accelerator.device)
    progress = rd.read_progress() or {}
    method.set_epoch(max(int(progress.get("epoch", cfg.train.epochs)) - 1, 0))
    reached = method.in_tested_form
    report = test_best(model, method, cfg, packs, accelerator, rd.best, reached, episodes,
                       repeats, untimed_batch)
    summary = {"run_dir": str(rd.path), "overrides": list(overrides), **report.as_json(),
               "lines": report.lines()}
    if write and accelerator.is_main_process:
        rd.write_evaluation(summary)
    return summary


__all__ = ["TestReport", "evaluate_run", "test_best"]
