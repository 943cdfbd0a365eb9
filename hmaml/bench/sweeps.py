"""Trials that share one GPU, run by the sweep executor as a user runs them.

- :func:`trials_throughput`: K trials at once on one GPU (``executor.trials_per_gpu: K``), for
  each K in turn: the aggregate training tasks/s over the window in which all K trained (each
  trial's history records every epoch's training time and end), against K = 1;
- :func:`paper_rows`: the paper's sweep (``configs/sweeps/paper_omni_emnist.yaml``) trained at
  the full budget, its trials packed on the GPU; mean ± std over seeds beside the paper.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

from hmaml.config import configs_dir
from hmaml.sweep import read_sweep_json, submit
from hmaml.train.rundir import RunDir


class PaperFigure(TypedDict):
    """A group's accuracy in the paper (mean, std) and the goal for its mean over seeds."""

    paper: tuple[float, float]
    goal: float | None


#: The paper's Table 9 (Omniglot -> EMNIST, 5-way, Conv4): mean ± std over its 5 test lists,
#: and the goal for the mean over seeds.
PAPER: dict[str, PaperFigure] = {"1shot": {"paper": (79.07, 1.09), "goal": 79.1},
                                 "5shot": {"paper": (89.22, 0.78), "goal": 89.2},
                                 "maml": {"paper": (74.81, 0.25), "goal": None}}


def sweep_file(name: str) -> Path:
    """A shipped sweep file (``configs/sweeps/<name>.yaml``)."""
    return configs_dir() / "sweeps" / f"{name}.yaml"


def _pack_overrides(packs: Path, gpu: int) -> list[str]:
    return [f"overrides.data.train_pack={packs / 'omniglot_nolatin'}",
            f"overrides.data.eval_pack={packs / 'emnist'}", "overrides.tracking.enabled=false",
            f"executor.visible_gpus=[{gpu}]", "executor.gpus_per_node=1"]


def common_window(histories: Sequence[list[dict[str, Any]]], episodes: int
                  ) -> dict[str, Any]:
    """Aggregate training tasks/s of trials that ran side by side: each trial's rate over its
    epochs that lie wholly inside the window in which every trial trained, summed."""
    spans = [[(row["time"] - row["epoch_s"], row["time"]) for row in history
              if "time" in row and "epoch_s" in row] for history in histories]
    if not spans or not all(spans):
        return {"overlap_s": 0.0, "aggregate_tasks_per_s": None,
                "why": "a trial recorded no epoch times"}
    start, end = max(s[0][0] for s in spans), min(s[-1][1] for s in spans)
    rates = []
    for trial in spans:
        inside = [(a, b) for a, b in trial if a >= start and b <= end]
        if inside:
            rates.append(episodes * len(inside) / sum(b - a for a, b in inside))
    if len(rates) < len(spans):
        return {"overlap_s": max(end - start, 0.0), "aggregate_tasks_per_s": None,
                "why": "the trials did not train side by side for a whole epoch each"}
    return {"overlap_s": round(end - start, 2), "aggregate_tasks_per_s": round(sum(rates), 1),
            "per_trial_tasks_per_s": round(statistics.fmean(rates), 1)}


def trial_failure(rd: RunDir) -> dict[str, Any]:
    """How far an unfinished trial got, and why it stopped (its trial record)."""
    progress, state = rd.read_progress() or {}, rd.read_trial() or {}
    return {"status": state.get("state", "not started"), "error": state.get("error"),
            "epoch": progress.get("epoch")}


def trials_throughput(counts: Sequence[int], trial_overrides: Sequence[str], packs: Path,
                      gpu: int, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """For each K in ``counts``: K trials of omni_emnist1 (seeds 0..K-1, with
    ``trial_overrides``) through the local executor, all K on GPU ``gpu`` at once."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "trials.yaml"
    base.write_text("base: omni_emnist1\nexecutor: {cluster: local}\n")
    rows: dict[str, Any] = {}
    for k in counts:
        sweep_dir = workdir / f"trials_{k}"
        began = time.perf_counter()
        submit(base, cluster="local", echo=log, overrides=[
            f"sweep_dir={sweep_dir}", f"seeds=[{','.join(map(str, range(k)))}]",
            f"executor.trials_per_gpu={k}", *_pack_overrides(packs, gpu),
            *(f"overrides.{o}" for o in trial_overrides)])
        wall = time.perf_counter() - began
        records = read_sweep_json(sweep_dir)["trials"]
        histories = [RunDir(r["run_dir"]).read_history() for r in records]
        stored = RunDir(records[0]["run_dir"]).stored_config()
        episodes = stored.train.episodes_per_epoch if stored is not None else 0
        rows[str(k)] = {"wall_s": round(wall, 1), **common_window(histories, episodes)}
        failed = {r["name"]: trial_failure(RunDir(r["run_dir"])) for r in records
                  if not RunDir(r["run_dir"]).test.is_file()}
        if failed:
            rows[str(k)]["unfinished"] = failed
        log(f"trials K={k}: {rows[str(k)]}")
    alone = rows.get("1", {}).get("aggregate_tasks_per_s")
    for row in rows.values():
        if alone and row.get("aggregate_tasks_per_s"):
            row["over_one_trial"] = round(row["aggregate_tasks_per_s"] / alone, 2)
    return {"what": f"K trials of omni_emnist1 ({' '.join(trial_overrides)}) on one GPU at "
                    "once through the local executor (executor.trials_per_gpu: K); aggregate "
                    "training tasks/s while all K trained", "trials": rows}


def paper_rows(name: str, extra: Sequence[str], packs: Path, gpu: int, workdir: Path,
               out_dir: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the shipped sweep ``name`` on GPU ``gpu`` (its trials packed as the file says) and
    report each trial and each variant's mean ± std over seeds beside the paper."""
    sweep_dir = workdir / name
    began = time.perf_counter()
    submit(sweep_file(name), cluster="local", echo=log,
           overrides=[f"sweep_dir={sweep_dir}", *_pack_overrides(packs, gpu), *extra])
    wall = time.perf_counter() - began
    trials: dict[str, Any] = {}
    groups: dict[str, list[float]] = {}
    for record in read_sweep_json(sweep_dir)["trials"]:
        rd = RunDir(record["run_dir"])
        test = rd.read_test()
        if test is None:
            trials[record["name"]] = trial_failure(rd)
            continue
        trials[record["name"]] = {
            key: test.get(key) for key in ("test_acc", "test_std", "best_val_acc", "epoch",
                                           "wall_s", "train_tasks_per_s")}
        group = str(record["axes"].get("variant", "maml"))
        groups.setdefault(group, []).append(float(test["test_acc"]))
    rows = {}
    for group, accs in groups.items():
        paper = PAPER.get(group)
        goal = paper["goal"] if paper is not None else None
        mean = statistics.fmean(accs)
        rows[group] = {"seeds": len(accs), "test_acc_mean": round(mean, 2),
                       "test_acc_std": round(statistics.stdev(accs), 2) if len(accs) > 1
                       else None, "paper": paper["paper"] if paper is not None else None,
                       "goal": goal, "goal_met": None if goal is None else mean >= goal}
    if out_dir is not None:
        for suffix in ("md", "png"):  # the table and its plot (the CSV stays in the sweep)
            summary = sweep_dir / f"summary.{suffix}"
            if summary.is_file():
                shutil.copy(summary, out_dir / f"{name}_summary.{suffix}")
    return {"sweep": name, "overrides": list(extra), "wall_s": round(wall, 1),
            "trials": trials, "rows": rows}


__all__ = ["PAPER", "PaperFigure", "common_window", "paper_rows", "sweep_file",
           "trials_throughput"]
