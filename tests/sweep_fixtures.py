"""Sweep test helpers: a seconds-long base config and sweep files written next to it."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

# Two epochs of two steps, a 4-episode validation and test: a trial trains in ~2 s.
TINY = {
    "base": "quickstart",
    "data": {"workers": 0, "n_query": 2, "test_query": 2},
    "method": {"hn_width": 16, "warmup_start": 1, "warmup_len": 1},
    "train": {"epochs": 2, "episodes_per_epoch": 4, "meta_batch": 2, "grad_accum": 1,
              "lr_milestones": [], "progress": False},
    "eval": {"val_episodes": 4, "test_episodes": 4, "tasks_per_batch": 4},
}


# A search's trials: three epochs validated after each, so a trial can be pruned after its second.
SEARCH_EPOCHS = {"train.epochs": 3, "eval.every": 1, "train.episodes_per_epoch": 8,
                 "eval.val_episodes": 16}
#: Two good trials, then one that cannot learn: the median pruner (one finished trial first)
#: stops it after its second validation.
FORCED_BAD = {"space": {"train.lr": {"loguniform": [1e-9, 0.05]}},
              "enqueue": [{"train.lr": 0.01}, {"train.lr": 0.01}, {"train.lr": 1e-9}],
              "pruner": {"startup_trials": 1}}


def search_body(n_trials: int = 3, parallel: int = 1, **search: Any) -> dict[str, Any]:
    """A sweep body of an Optuna search over the tiny config (``search`` adds its keys)."""
    return {"overrides": dict(SEARCH_EPOCHS),
            "search": {"n_trials": n_trials, "parallel": parallel, **search}}


def write_sweep(folder: Path, body: dict[str, Any], pack: Path | None = None,
                tracking_uri: str | None = None) -> Path:
    """``folder/tiny.yaml`` (the base) and ``folder/sweep.yaml`` (``base: tiny`` + ``body``).

    The sweep's trials land in ``folder/out``; tracking is off unless ``tracking_uri`` is given.
    """
    base = json.loads(json.dumps(TINY))
    base["data"]["train_pack"] = str(pack or folder / "no_pack")
    base["tracking"] = ({"uri": tracking_uri, "log_checkpoint": False} if tracking_uri
                        else {"enabled": False})
    (folder / "tiny.yaml").write_text(json.dumps(base))  # JSON is YAML
    sweep = {"base": "tiny", "sweep_dir": str(folder / "out"), **body}
    path = folder / "sweep.yaml"
    path.write_text(json.dumps(sweep))
    return path


def fake_slurm(folder: Path) -> Path:
    """A ``bin`` folder with ``srun`` and an ``sbatch`` that keeps the scripts it is given."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    scripts = folder / "sbatch_scripts"
    scripts.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\nfor a; do last="$a"; done\ncp "$last" "{scripts}/"\n'
                      'echo "Submitted batch job 4242"\n')
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    for exe in (sbatch, srun):
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return scripts


def child_runs(uri: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The runs nested under ``parent_run_id``: id, name, status, params, metrics and tags."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10_000)
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             "params": dict(r.data.params), "metrics": dict(r.data.metrics),
             "tags": dict(r.data.tags)} for r in runs]


def run_artifacts(uri: str, run_id: str) -> list[str]:
    """Paths of the files logged at the top level of a run's artifacts."""
    from mlflow import MlflowClient

    return sorted(f.path for f in MlflowClient(tracking_uri=uri).list_artifacts(run_id))
