"""The paper's analysis tables from trained runs: Table 3 (how far MAML and HyperMAML move the
classifier) and Tables 4 / 8 (test time and accuracy of MAML at K inner steps beside HyperMAML),
and the comparison over seeds that every claim here rests on (:func:`seed_groups`).

Tables 3 and 4 re-test the runs' best checkpoints on the fixed test episodes
(``evaluate_run``), so the figures are those of ``launch/evaluate.py``; the paper's figures are
printed beside them (theirs were measured on an RTX 2080, so only the ratios between rows compare
across machines). The comparison over seeds reads the runs' own ``test.json`` and history.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hmaml.config import flatten
from hmaml.data.store import read_manifest
from hmaml.errors import HmamlError
from hmaml.files import write_json_atomic
from hmaml.plots import plot_seeds, plot_steps
from hmaml.train.protocol import evaluate_run
from hmaml.train.rundir import MAY_CHANGE, NOT_COMPARED, RunDir

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
#: Config keys that do not make two runs different experiments: the seed, where a run is, and how
#: it is watched or fed (a longer run or another validation cadence is another experiment).
NOT_THE_EXPERIMENT = ("seed", *NOT_COMPARED,
                      *(k for k in MAY_CHANGE if k not in ("train.epochs", "eval.every")))


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


def update_norm_rows(maml_run: str | Path, hypermaml_run: str | Path, *, episodes: int | None,
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
    maml_cfg = maml.stored_config()
    assert maml_cfg is not None  # _method_of has read it
    data = maml_cfg.data
    dataset = read_manifest(data.eval_pack or data.train_pack).dataset
    paper = PAPER_STEPS.get(dataset, {})
    rows = []
    for model, run, k in [*(("MAML", maml.path, k) for k in steps),
                          ("HyperMAML", hyper.path, None)]:
        overrides = [] if k is None else [f"method.inner_steps={k}"]
        summary = evaluate_run(run, episodes, repeats, overrides, untimed_batch=True, write=False)
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


def _experiment(key: str) -> bool:
    return not any(key == k or (k.endswith(".") and key.startswith(k))
                   for k in NOT_THE_EXPERIMENT)


def _finished_run(run: str | Path) -> tuple[RunDir, dict[str, str], dict[str, Any]]:
    rd = RunDir(run)
    cfg = rd.stored_config()
    if cfg is None:
        raise HmamlError(f"{rd.path}: not a run directory (no {rd.config.name})")
    test = rd.read_test()
    if test is None or test.get("status") != "finished":
        progress = rd.read_progress() or {}
        raise HmamlError(f"{rd.path}: not finished (epoch {progress.get('epoch', 0)} of "
                         f"{progress.get('epochs', cfg.train.epochs)}); a comparison over seeds "
                         "needs every seed's test")
    return rd, flatten(cfg), test


def seed_groups(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Group finished runs by experiment (configs equal but for :data:`NOT_THE_EXPERIMENT`) and
    give each group's test accuracy as mean ± sample std over its seeds' means.

    Runs of one name with different configs form separate groups, labelled with the keys that
    tell them apart, so a seed of another experiment is never averaged in; a seed given twice
    for one experiment is refused (it would shrink the std).
    """
    if not runs:
        raise HmamlError("seeds: name one or more run directories")
    groups: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for run in runs:
        rd, flat, test = _finished_run(run)
        key = tuple(sorted((k, v) for k, v in flat.items() if _experiment(k)))
        group = groups.setdefault(key, {"name": flat["name"], "config": dict(key), "runs": []})
        seed = int(flat["seed"])
        twin = next((r["run"] for r in group["runs"] if r["seed"] == seed), None)
        if twin is not None:
            raise HmamlError(f"{rd.path} and {twin}: the same experiment and seed {seed}; give "
                             "each seed once")
        repeats = [r["ci95"] for r in test.get("test_repeats", [])]
        history = rd.read_history()
        group["runs"].append({
            "run": str(rd.path), "seed": seed, "test_acc": test["test_acc"],
            "test_std": test["test_std"], "lists": len(repeats),
            "list_ci95": [min(repeats), max(repeats)] if repeats else None,
            "best_epoch": test["best_epoch"], "best_val_acc": test["best_val_acc"],
            "epochs": test["epoch"], "wall_s": test.get("wall_s"),
            "processes": test.get("processes", 1),
            "val": [(row["epoch"], row["val_acc"]) for row in history if "val_acc" in row]})
    out = list(groups.values())
    for group in out:
        group["runs"].sort(key=lambda r: r["seed"])
        accs = [r["test_acc"] for r in group["runs"]]
        group["mean"] = float(np.mean(accs))
        group["std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else None
        twins = [g for g in out if g["name"] == group["name"]]
        differ = sorted({k for g in twins for k, v in g["config"].items()
                         if any(o["config"].get(k) != v for o in twins)})
        config = group["config"]
        told = ", ".join(f"{k}={config.get(k)}" for k in differ)
        group["label"] = f"{group['name']} ({told})" if differ else group["name"]
    return out


def _wall(run: dict[str, Any]) -> str:
    if run["wall_s"] is None:
        return f"? ({run['processes']} processes)"
    return f"{run['wall_s'] / 60:.1f} min" + (
        f" ({run['processes']} processes)" if run["processes"] > 1 else "")


def seeds_lines(groups: Sequence[dict[str, Any]]) -> list[str]:
    """The comparison as text: one line a run, then each experiment's mean ± std over seeds."""
    width = max(len(g["label"]) for g in groups)
    lines = [f"{'experiment':{width}}  seed  {'test % (lists)':>15}  {'list CI95':>11}  "
             f"{'best epoch (val %)':>18}  wall"]
    for g in groups:
        for r in g["runs"]:
            ci = "" if r["list_ci95"] is None else \
                f"±{r['list_ci95'][0]:.2f}–{r['list_ci95'][1]:.2f}"
            lines.append(f"{g['label']:{width}}  {r['seed']:4d}  {r['test_acc']:7.2f} ± "
                         f"{r['test_std']:4.2f}  {ci:>11}  "
                         f"{r['best_epoch']:>5d}/{r['epochs']} ({r['best_val_acc']:.2f})  "
                         f"{_wall(r)}")
    for g in groups:
        spread = "one seed: no spread" if g["std"] is None else f"± {g['std']:.2f}"
        lines.append(f"{g['label']}: {g['mean']:.2f} {spread} % over {len(g['runs'])} seed(s) "
                     f"({', '.join(str(r['seed']) for r in g['runs'])})")
    if len(groups) == 2:
        a, b = groups
        lines.append(f"{a['label']} - {b['label']}: {a['mean'] - b['mean']:+.2f} points")
    lines.append("(a run: mean ± std over its test lists; an experiment: mean ± sample std over "
                 "its seeds' means)")
    return lines


def seeds_report(runs: Sequence[str | Path], out_dir: str | Path) -> list[dict[str, Any]]:
    """:func:`seed_groups`, written to ``seeds.json`` and drawn in ``seeds.png`` (validation
    accuracy against epoch: each seed thin, the mean over seeds thick)."""
    groups = seed_groups(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "seeds.json", {"groups": groups})
    plot_seeds(groups, out / "seeds.png")
    return groups
