"""What a sweep has done: trial states from run directories, the status table and the summary."""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hmaml.config import override_text
from hmaml.errors import HmamlError, first_line
from hmaml.plots import plot_bars, plot_search
from hmaml.sweep.spec import _name_value
from hmaml.train.rundir import RunDir
from hmaml.train.tracking import Tracker, ui_line

SWEEP_JSON = "sweep.json"
STATES = ("pending", "running", "preempted", "requeued", "finished", "pruned", "failed")
SUMMARY_FILES = ("summary.md", "summary.csv", "summary.png")


# --- sweep directory ------------------------------------------------------------------------


def read_sweep_json(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_JSON
    try:
        return json.loads(path.read_text())
    except OSError:
        raise HmamlError(f"{sweep_dir}: not a sweep directory (no {SWEEP_JSON})") from None
    except json.JSONDecodeError as exc:
        raise HmamlError(f"{path}: unreadable ({exc.msg})") from None



def trial_state(run_dir: str | Path) -> dict[str, Any]:
    """State, epoch, epochs, best val and test accuracy of one trial, from its run directory."""
    rd = RunDir(run_dir)
    out: dict[str, Any] = {"state": "pending", "epoch": None, "epochs": None,
                           "best_val_acc": None, "test_acc": None, "test_ci": None,
                           "error": None}
    progress = rd.read_progress()
    if progress:
        out.update(epoch=progress.get("epoch"), epochs=progress.get("epochs"),
                   best_val_acc=progress.get("best_val_acc"))
        if progress.get("status") in STATES:
            out["state"] = progress["status"]
    marker = rd.read_trial()  # written by the job: running, preempted, failed, …
    if marker and marker.get("state") in STATES:
        out["state"] = marker["state"]
        out["error"] = marker.get("error")
    test = rd.read_test()
    if test:
        out.update(state="finished", test_acc=test.get("test_acc"), test_ci=test.get("test_ci"),
                   best_val_acc=test.get("best_val_acc", out["best_val_acc"]))
    return out


def _test_of(record: dict[str, Any]) -> dict[str, Any] | None:
    rd = RunDir(record["run_dir"])
    return rd.read_test()



# --- status and summary ---------------------------------------------------------------------


def status_table(sweep_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """The per-trial table printed by ``--status`` and its rows."""
    info = read_sweep_json(sweep_dir)
    rows = []
    for record in info["trials"]:
        state = trial_state(record["run_dir"])
        rows.append({"trial": record["name"], **state})
    table = [["trial", "state", "epoch", "best val", "test acc"]]
    for row in rows:
        epoch = f"{row['epoch']}/{row['epochs']}" if row["epochs"] else "-"
        test = (f"{row['test_acc']:.2f} ± {row['test_ci']:.2f}"
                if row["test_acc"] is not None else "-")
        table.append([row["trial"], row["state"], epoch, _pct(row["best_val_acc"]), test])
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    footer = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"{_text_table(table)}\n{footer}", rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_rows(info: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per axis point (seeds pooled) of the finished trials, and the axis keys.

    With one finished seed the ± is the test's 95 % CI over its episodes; with several it is
    1.96 · sd / sqrt(n) over the seeds' test accuracies.
    """
    trials = info["trials"]
    axis_keys = [k for k in (trials[0]["axes"] if trials else {}) if k != "seed"]
    groups: dict[str, dict[str, Any]] = {}
    for record in trials:
        point = {k: record["axes"][k] for k in axis_keys}
        group = groups.setdefault(json.dumps(point, sort_keys=True),
                                  {"point": point, "total": 0, "results": []})
        group["total"] += 1
        test = _test_of(record)
        if test and test.get("test_acc") is not None:
            group["results"].append(test)
    rows = []
    for group in groups.values():
        results = group["results"]
        row: dict[str, Any] = {**group["point"], "seeds": f"{len(results)}/{group['total']}"}
        if results:
            accs = [float(r["test_acc"]) for r in results]
            mean = sum(accs) / len(accs)
            if len(accs) > 1:
                sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
                ci, over = 1.96 * sd / math.sqrt(len(accs)), "seeds"
            else:
                ci, over = float(results[0].get("test_ci") or 0.0), "episodes"
            row.update(test_acc=mean, ci95=ci, ci_over=over,
                       best_val_acc=_mean([r.get("best_val_acc") for r in results]),
                       wall_min=_mean([None if r.get("wall_s") is None else r["wall_s"] / 60
                                      for r in results]))
        else:
            row.update(test_acc=None, ci95=None, ci_over=None, best_val_acc=None, wall_min=None)
        rows.append(row)
    return axis_keys, rows


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize(sweep_dir: str | Path, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """(Re)build summary.md/.csv/.png in the sweep dir, print it, log it to the parent run."""
    sweep_dir = Path(sweep_dir)
    info = read_sweep_json(sweep_dir)
    axis_keys, rows = summary_rows(info)
    states = [trial_state(r["run_dir"])["state"] for r in info["trials"]]
    done = sum(s == "finished" for s in states)
    # a grid is complete when every trial finished; a search when it holds its n_trials and
    # none is left to run (a pruned or failed trial is not run again)
    search = info.get("search")
    complete = done == len(states) if not search else \
        len(states) >= search["n_trials"] and all(s in ("finished", "pruned", "failed")
                                                  for s in states)
    columns = [*axis_keys, "seeds", "test acc (%)", "± 95% CI", "CI over", "best val (%)",
               "wall (min)"]
    table = [columns] + [[*(_shown(r[k]) for k in axis_keys), r["seeds"],
                          _num(r["test_acc"]), _num(r["ci95"]), r["ci_over"] or "-",
                          _num(r["best_val_acc"]), _num(r["wall_min"], 1)] for r in rows]
    head = f"sweep {info['name']}: {done} of {len(states)} trials finished"
    echo(f"{head}\n{_text_table(table)}")

    md = [f"# {head}", "", _markdown(table), "", "## Trials", ""]
    trial_rows = [["trial", "state", "test acc (%)", "± 95% CI", "best val (%)"]]
    for record, state in zip(info["trials"], states, strict=True):
        test = _test_of(record) or {}
        trial_rows.append([record["name"], state, _num(test.get("test_acc")),
                           _num(test.get("test_ci")), _num(test.get("best_val_acc"))])
    md.append(_markdown(trial_rows))
    extra: list[Path] = []
    if info.get("search"):
        lines, extra = search_summary(info, sweep_dir)
        md += ["", *lines]
        echo("\n".join(line for line in lines if not line.startswith(("#", "!"))).strip())
    (sweep_dir / "summary.md").write_text("\n".join(md) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*axis_keys, "seeds", "test_acc", "ci95", "ci_over", "best_val_acc",
                     "wall_min"])
    for r in rows:
        writer.writerow([*(override_text(r[k]) for k in axis_keys), r["seeds"],
                         *("" if r[k] is None else r[k] for k in
                           ("test_acc", "ci95", "ci_over", "best_val_acc", "wall_min"))])
    (sweep_dir / "summary.csv").write_text(buffer.getvalue())
    _plot(axis_keys, rows, sweep_dir / "summary.png", info["name"])
    paths = [sweep_dir / name for name in SUMMARY_FILES] + extra
    if info.get("parent_run_id"):
        tracker = Tracker(consequence="the summary stays in the sweep folder")
        if tracker.attach(info["tracking_uri"], info["parent_run_id"]):
            for path in paths:
                tracker.log_artifact(path)
            if complete:
                tracker.end("FINISHED")
            if tracker.link:
                echo(ui_line(info["tracking_uri"], tracker.link))
    champion = None
    if info.get("register") and complete:
        champion = move_alias(info, echo)
    return {"rows": rows, "finished": done, "trials": len(states), "files": paths,
            "champion": champion}


def move_alias(info: dict[str, Any], echo: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Point the sweep's ``register.alias`` of ``register.name`` at the finished trial with the
    best validation accuracy (chosen on validation, as the checkpoints were: the test decides
    nothing). A trial's existing version is reused; a store that fails costs a warning."""
    from hmaml.mlflow_model import register_model

    name, alias = info["register"]["name"], info["register"]["alias"]
    best = None
    for record in info["trials"]:
        test = _test_of(record) or {}
        run_id, val = test.get("mlflow_run_id"), test.get("best_val_acc")
        if run_id and val is not None and (best is None or val > best[1]):
            best = (record, val, test)
    if best is None:
        echo(f"no finished trial has an MLflow run: alias {alias} of {name} not moved")
        return None
    record, val, test = best
    try:
        version = register_model(info["tracking_uri"], test["mlflow_run_id"], name, alias,
                                 reuse=True)
    except Exception as exc:  # the summary stands without the alias
        warnings.warn(f"alias {alias} of {name} not moved ({type(exc).__name__}: "
                      f"{first_line(exc)})", RuntimeWarning, stacklevel=2)
        return None
    echo(f"{alias}: trial {record['name']} (best val {val:.2f} %, test "
         f"{_num(test.get('test_acc'))} %) is models:/{name}@{alias} (version {version})")
    return {"trial": record["name"], "version": version, "model": f"models:/{name}@{alias}"}


def search_summary(info: dict[str, Any], sweep_dir: Path) -> tuple[list[str], list[Path]]:
    """The study's side of a search's summary: each trial's Optuna state and value, the best
    trial, parameter importances (Optuna's fANOVA, with 3 or more finished trials) and
    ``search.png`` (value and best so far against trial)."""
    import optuna

    search = info["search"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=search["study"], storage=search["storage"])
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    metric, maximize = search["metric"], search["direction"] == "maximize"
    lines = [f"## Search: {len(trials)} of {search['n_trials']} trials, {len(complete)} "
             f"complete ({search['direction']} {metric})", ""]
    if complete:
        best = study.best_trial
        lines.append(f"best: t{best.number:03d}, {metric} = {best.value:.4g} ("
                     + ", ".join(f"{k}={param_text(v)}" for k, v in best.params.items()) + ")")
        lines.append("")
    keys = list(study.trials[0].distributions) if trials else []
    table = [["trial", "optuna state", metric, *keys]]
    table += [[f"t{t.number:03d}", t.state.name.lower(), _num(t.value, 4),
               *(param_text(t.params.get(k)) for k in keys)] for t in trials]
    lines.append(_markdown(table))
    if len(complete) >= 3 and keys:
        try:
            importances = optuna.importance.get_param_importances(study)
        except Exception as exc:  # too few distinct values: the summary stands without it
            lines += ["", f"parameter importances: not computed ({first_line(exc, 200)})"]
        else:
            lines += ["", "parameter importances (fANOVA):", "",
                      _markdown([["parameter", "importance"],
                                 *([k, f"{v:.3f}"] for k, v in importances.items())])]
    out = sweep_dir / "search.png"
    plot_search([t.number for t in trials],
                [t.value if t.state == optuna.trial.TrialState.COMPLETE else None
                 for t in trials],
                [t.number for t in trials if t.state == optuna.trial.TrialState.PRUNED],
                metric, maximize, out, f"{info['name']}: {metric}")
    lines += ["", "![search](search.png)"]
    return lines, [out]


def param_text(value: Any) -> str:
    """A search parameter as the search prints it: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """An axis value in the printed table: a search's floats to 4 significant digits (the CSV
    keeps them whole)."""
    return f"{value:.4g}" if isinstance(value, float) else override_text(value)


def _plot(axis_keys: list[str], rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """Test accuracy per axis point with its 95 % CI as error bars."""
    labels = [", ".join(_name_value(r[k]) if k == "variant" else f"{k.rsplit('.', 1)[-1]}="
                        f"{_name_value(r[k])}" for k in axis_keys) or "all" for r in rows]
    plot_bars(labels, [r["test_acc"] for r in rows], [r["ci95"] for r in rows], out, title)

