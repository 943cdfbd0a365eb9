"""The paper's analysis tables from trained runs: Table 3 (how far MAML and HyperMAML move the
classifier) and Tables 4 / 8 (test time and accuracy of MAML at K inner steps beside HyperMAML).

Both re-test the runs' best checkpoints on the fixed test episodes (``evaluate_run``), so the
figures are those of ``launch/evaluate.py``; the paper's figures are printed beside them (theirs
were measured on an RTX 2080, so only the ratios between rows compare across machines).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hmaml.data.store import read_manifest
from hmaml.errors import HmamlError
from hmaml.files import write_json_atomic
from hmaml.plots import plot_steps
from hmaml.train.protocol import evaluate_run
from hmaml.train.rundir import RunDir

#: Table 3 (Omniglot -> EMNIST 1-shot): mean norm of the classifier update, ± std.
PAPER_NORMS = {"MAML": {"weight": (2.53, 0.29), "bias": (1.47, 0.14)},
               "HyperMAML": {"weight": (113.28, 0.63), "bias": (27.72, 0.68)}}
#: Tables 4 and 8, by the evaluation pack's dataset: steps -> (seconds, accuracy %) of 600 test
#: tasks; the key ``None`` is HyperMAML.
PAPER_STEPS: dict[str, dict[int | None, tuple[float, float]]] = {
    "emnist": {0: (2.17, 19.98), 1: (5.16, 74.67), 2: (7.30, 74.69), 3: (8.87, 74.71),
               4: (10.79, 74.71), 5: (12.66, 74.71), 10: (22.60, 74.74), 25: (51.75, 74.78),
               50: (103.88, 74.82), 100: (212.62, 74.86), None: (8.21, 80.78)},
    "cub": {0: (4.15, 20.01), 1: (6.89, 47.99), 2: (9.44, 58.53), 3: (11.60, 61.54),
            4: (12.97, 62.18), 5: (15.00, 62.66), 6: (16.90, 62.77), 7: (19.07, 62.83),
            None: (8.46, 66.11)},
    "mini-imagenet": {0: (4.24, 20.10), 1: (8.48, 43.46), 2: (10.50, 48.71), 3: (13.17, 48.32),
                      4: (15.17, 48.82), 5: (17.29, 48.89), 6: (19.01, 48.80),
                      7: (20.55, 48.87), None: (11.11, 53.41)},
}
#: MAML's inner steps in Table 4, the default of ``launch/tables.py steps``.
STEPS = (0, 1, 2, 3, 4, 5, 10, 25, 50, 100)


def _method_of(run: str | Path, expected: str) -> RunDir:
    rd = RunDir(run)
    cfg = rd.stored_config()
    if cfg is None:
        raise HmamlError(f"{rd.path}: not a run directory (no {rd.config.name})")
    if cfg.method.name != expected:
        raise HmamlError(f"{rd.path}: a {cfg.method.name} run; a {expected} run is needed here")
    return rd


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def update_norms(maml_run: str | Path, hypermaml_run: str | Path, *, episodes: int | None,
                 repeats: int | None) -> list[dict[str, Any]]:
    """Table 3: per run, the mean over the test tasks of ``||W' - W||`` and ``||b' - b||`` of the
    classifier, mean ± std over the test repeats."""
    rows = []
    for model, run, method in (("MAML", maml_run, "maml"),
                               ("HyperMAML", hypermaml_run, "hypermaml")):
        rd = _method_of(run, method)
        summary = evaluate_run(rd.path, episodes, repeats, write=False)
        weight = _mean_std(summary["repeat_weight_update_norms"])
        bias = _mean_std(summary["repeat_bias_update_norms"])
        rows.append({"model": model, "run": str(rd.path), "weight": weight, "bias": bias,
                     "acc": summary["test_acc"], "acc_std": summary["test_std"],
                     "episodes": summary["test_episodes"],
                     "repeats": len(summary["test_repeats"]),
                     "paper": PAPER_NORMS[model]})
    return rows


def norms_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Table 3 as text, this run's figures beside the paper's."""
    lines = [f"{'':10} {'weight update':>22} {'bias update':>22}   "
             f"{'paper weight':>15} {'paper bias':>14}   test accuracy"]
    for r in rows:
        (w, ws), (b, bs) = r["weight"], r["bias"]
        (pw, pws), (pb, pbs) = r["paper"]["weight"], r["paper"]["bias"]
        lines.append(f"{r['model']:10} {w:14.2f} ± {ws:5.2f} {b:14.2f} ± {bs:5.2f}   "
                     f"{pw:7.2f} ± {pws:4.2f} {pb:7.2f} ± {pbs:4.2f}   "
                     f"{r['acc']:.2f} ± {r['acc_std']:.2f} %")
    n = rows[0]
    lines.append(f"(mean ± std over {n['repeats']} repeat(s) of {n['episodes']} test tasks)")
    return lines


def steps_table(maml_run: str | Path, hypermaml_run: str | Path, *, steps: Sequence[int],
                episodes: int | None, repeats: int | None, out_dir: str | Path
                ) -> list[dict[str, Any]]:
    """Tables 4 / 8: seconds and accuracy of the test tasks for MAML at each number of inner
    steps and for HyperMAML, each mean ± std over the repeats (every evaluation after an untimed
    warm-up batch); writes ``steps.json`` and ``steps.png`` into ``out_dir``."""
    if not steps or any(k < 0 for k in steps):
        raise HmamlError(f"--steps {list(steps)}: need one or more step counts >= 0")
    maml, hyper = _method_of(maml_run, "maml"), _method_of(hypermaml_run, "hypermaml")
    data = maml.stored_config().data
    dataset = read_manifest(data.eval_pack or data.train_pack).dataset
    paper = PAPER_STEPS.get(dataset, {})
    rows = []
    for model, run, k in [*(("MAML", maml.path, k) for k in steps),
                          ("HyperMAML", hyper.path, None)]:
        overrides = [] if k is None else [f"method.inner_steps={k}"]
        summary = evaluate_run(run, episodes, repeats, overrides, warmup=True, write=False)
        seconds = _mean_std(summary["test_seconds"])
        rows.append({"model": model, "steps": k, "seconds": seconds[0],
                     "seconds_std": seconds[1], "acc": summary["test_acc"],
                     "acc_std": summary["test_std"], "ci95": summary["test_ci"],
                     "episodes": summary["test_episodes"],
                     "repeats": len(summary["test_repeats"]),
                     "paper_seconds": paper.get(k, (None, None))[0],
                     "paper_acc": paper.get(k, (None, None))[1]})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "steps.json", {"maml_run": str(maml.path),
                                           "hypermaml_run": str(hyper.path),
                                           "dataset": dataset, "rows": rows})
    plot_steps(rows, out / "steps.png",
               title=f"{dataset}: {rows[0]['episodes']} test tasks x {rows[0]['repeats']}")
    return rows


def steps_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Tables 4 / 8 as text, the paper's figures beside when it has that dataset."""
    lines = [f"{'model':10} {'steps':>5} {'seconds':>17} {'accuracy %':>17}   "
             f"{'paper s':>8} {'paper %':>8}"]
    for r in rows:
        paper = ("" if r["paper_seconds"] is None
                 else f"{r['paper_seconds']:8.2f} {r['paper_acc']:8.2f}")
        lines.append(f"{r['model']:10} {'-' if r['steps'] is None else r['steps']:>5} "
                     f"{r['seconds']:9.2f} ± {r['seconds_std']:5.2f} "
                     f"{r['acc']:9.2f} ± {r['acc_std']:5.2f}   {paper}")
    n = rows[0]
    lines.append(f"(mean ± std over {n['repeats']} repeat(s) of {n['episodes']} test tasks; "
                 "seconds exclude start-up and a warm-up batch)")
    return lines
