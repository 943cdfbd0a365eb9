"""A sweep's Optuna search: trials asked and told through the study (values from each trial's
test.json), a seeded sampler that repeats itself, the median pruner stopping a bad trial from
its own process (state ``pruned``, not ``failed``), MLflow child runs under the search's parent,
the summary (table, best so far, importances), resubmission that continues without running a
trial twice (a trial left half-trained is resumed from its folder), and refusals of bad specs.
tests/test_slurm.py runs a search on the real SLURM of CI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from hmaml.errors import HmamlError
from hmaml.sweep import submit
from hmaml.sweep.job import TrialJob
from hmaml.sweep.report import read_sweep_json, status_table
from tests.sweep_fixtures import FORCED_BAD, child_runs, run_artifacts, search_body, write_sweep
from tests.train_fixtures import tiny_pack

__all__ = ["tiny_pack"]  # the fixture, re-exported for pytest


def study(folder: Path) -> optuna.Study:
    info = read_sweep_json(folder / "out")
    return optuna.load_study(study_name=info["search"]["study"],
                             storage=info["search"]["storage"])


def test_a_search_asks_tells_and_prunes_a_bad_trial(tmp_path: Path, tiny_pack: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    path = write_sweep(tmp_path, search_body(**FORCED_BAD), pack=tiny_pack, tracking_uri=uri)
    lines: list[str] = []
    out = submit(path, cluster="debug", echo=lines.append)
    assert list(out["submitted"]) == ["t000", "t001", "t002"]
    assert any(line.startswith("[t002] pruned after epoch 2 (val ") for line in lines), lines
    trials = study(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    for t in trials[:2]:  # the study holds each trial's best validation accuracy
        test = json.loads((tmp_path / "out" / f"t{t.number:03d}" / "test.json").read_text())
        assert t.value == pytest.approx(test["best_val_acc"])
        assert sorted(t.intermediate_values) == [1, 2, 3]
    pruned = tmp_path / "out" / "t002"
    assert not (pruned / "test.json").exists()
    assert json.loads((pruned / "trial.json").read_text())["state"] == "pruned"
    assert json.loads((pruned / "progress.json").read_text())["status"] == "pruned"
    assert sorted(trials[2].intermediate_values) == [1, 2]  # stopped after epoch 2 of 3
    _, states = status_table(tmp_path / "out")
    assert [s["state"] for s in states] == ["finished", "finished", "pruned"]

    parent = out["parent_run_id"]
    children = {c["name"]: c for c in child_runs(uri, parent)}
    assert sorted(children) == ["t000", "t001", "t002"]
    assert children["t002"]["status"] == "KILLED"
    assert children["t002"]["tags"]["pruned_at_epoch"] == "2"
    assert children["t001"]["tags"]["optuna.trial"] == str(trials[1]._trial_id)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Search: 3 of 3 trials, 2 complete (maximize best_val_acc)" in summary
    assert "| t002 | pruned |" in summary
    assert (tmp_path / "out" / "search.png").stat().st_size > 0
    assert {"summary.md", "search.png"} <= set(run_artifacts(uri, parent))

    # submitting again adds no trial and runs none
    again = submit(path, cluster="debug")
    assert again["submitted"] == {} and len(study(tmp_path).trials) == 3


@pytest.mark.parametrize(("pruner", "described"), [
    ({"name": "percentile", "percentile": 50, "startup_trials": 1},
     "pruner percentile (best 50 %, startup 1 trials, warm-up 0 epochs)"),
    ({"name": "hyperband", "min_epochs": 2, "reduction_factor": 3},
     "pruner hyperband (2 to 3 epochs, reduction factor 3)"),
])
def test_the_percentile_and_hyperband_pruners_stop_the_trial_that_learns_nothing(
        tmp_path: Path, tiny_pack: Path, capsys: pytest.CaptureFixture[str],
        pruner: dict[str, Any], described: str) -> None:
    """The same three trials as above under Optuna's other pruners, each built alike in the
    driver and in the trial. Hyperband counts its rungs up to the config's 3 epochs: from 2
    epochs by a factor of 3 that is one bracket (rungs at epochs 2 and 6), so the bad trial meets
    the good ones at epoch 2 (where the median pruner stops it too) whatever bracket a trial's
    number would hash to."""
    path = write_sweep(tmp_path, search_body(**{**FORCED_BAD, "pruner": pruner}),
                       pack=tiny_pack)
    submit(path, cluster="local", dry_run=True)
    assert described in capsys.readouterr().out
    submit(path, cluster="debug")
    trials = study(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert max(trials[2].intermediate_values) < 3  # stopped before its last epoch


def test_a_seeded_sampler_asks_for_the_same_trials(tmp_path: Path, tiny_pack: Path) -> None:
    body = search_body(space={"train.lr": {"loguniform": [1e-3, 1e-1]},
                              "method.hn_width": {"choice": [16, 32]}},
                       sampler={"seed": 7})
    body["search"]["n_trials"] = 2
    body["overrides"]["train.epochs"] = 1
    params = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        submit(write_sweep(tmp_path / name, body, pack=tiny_pack), cluster="debug")
        params.append([t.params for t in study(tmp_path / name).trials])
    assert params[0] == params[1] and params[0][0] != params[0][1]


def test_resubmitting_resumes_a_half_trained_trial_and_asks_for_the_rest(
        tmp_path: Path, tiny_pack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_sweep(tmp_path, search_body(space={"train.lr": {"loguniform": [1e-3, 1e-1]}}),
                       pack=tiny_pack)
    calls = {"n": 0}

    def stop_after_a_few_steps(self: TrialJob, guard: Any) -> bool:
        calls["n"] += 1
        return calls["n"] > 3  # the first trial stops within its second epoch: preempted

    monkeypatch.setattr(TrialJob, "stop_requested", stop_after_a_few_steps)
    first = submit(path, cluster="debug")
    assert list(first["submitted"]) == ["t000"]  # a preempted trial ends this submission
    (t0,) = study(tmp_path).trials
    assert t0.state.name == "RUNNING"
    progress = json.loads((tmp_path / "out" / "t000" / "progress.json").read_text())
    assert progress["status"] == "preempted" and 0 < progress["epoch"] < 3

    monkeypatch.undo()
    second = submit(path, cluster="debug")
    assert list(second["submitted"]) == ["t000", "t001", "t002"]
    trials = study(tmp_path).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert trials[0].params == t0.params  # the same trial, resumed, not asked again
    history = [json.loads(line) for line in
               (tmp_path / "out" / "t000" / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3]  # each epoch trained once


@pytest.mark.parametrize(("search", "extra", "message"), [
    ({"space": {"train.lr": {"uniform": [0.001, 0.1]}}}, {"seeds": [0, 1]},
     "search cannot be combined with seeds"),
    ({"space": {}}, {}, "search.space is empty"),
    ({"space": {"train.lr": {"uniform": [0.001, 0.1]}}, "metric": "val"}, {},
     "search.metric='val' is not one of"),
    ({"space": {"train.lr": {"uniform": [0.001, 0.1]}}, "metric": "test_acc",
      "pruner": {}}, {}, "search.metric must be best_val_acc"),
    ({"space": {"train.lr_milestones": {"choice": [[1], [2]]}}}, {},
     "Optuna chooses among numbers"),
    ({"space": {"train.lr": {"uniform": [0.001, 0.1]}}, "pruner": {"name": "asha"}}, {},
     "search.pruner.name='asha' is not one of median, percentile, hyperband"),
    ({"space": {"train.lr": {"uniform": [0.001, 0.1]}},
      "pruner": {"name": "percentile", "percentile": 100}}, {},
     "search.pruner.percentile=100 must be in (0, 100)"),
    ({"space": {"train.epochs": {"choice": [2, 3]}}, "pruner": {"name": "hyperband"}}, {},
     "search.space may not vary train.epochs"),
    ({"space": {"train.lr": {"uniform": [0.001, 0.1]}}, "enqueue": [{"train.gamma": 1}]}, {},
     "search.enqueue[0]: 'train.gamma' is not a key of search.space"),
    ({"space": {"train.lr": {"uniform": [-1.0, 0.1]}}}, {},
     "search trial t000: .*train.lr=-1.0 must be > 0"),
    ({"space": {"train.lr": {"uniform": [0.001, 0.1]}}, "sampler": {"kind": "tpe"}}, {},
     "unknown key 'search.sampler.kind'"),
])
def test_bad_search_specs_are_refused_naming_the_key(
        tmp_path: Path, tiny_pack: Path, search: dict, extra: dict, message: str) -> None:
    body = {**search_body(**search), **extra}
    with pytest.raises(HmamlError, match=message if ".*" in message else _escape(message)):
        submit(write_sweep(tmp_path, body, pack=tiny_pack), cluster="debug")
    assert not (tmp_path / "out").exists()  # nothing ran


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_dry_run_describes_the_search(tmp_path: Path, tiny_pack: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_sweep(tmp_path, search_body(**FORCED_BAD), pack=tiny_pack)
    assert submit(path, cluster="local", dry_run=True)["dry_run"]
    out = capsys.readouterr().out
    assert "an Optuna search of 3 trials of tiny, 1 at a time" in out
    assert "maximize best_val_acc; sampler tpe (seed 0); pruner median (startup 1" in out
    assert "train.lr: loguniform [1e-09, 0.05]" in out
    assert not (tmp_path / "out").exists()


def test_a_shipped_sweep_is_found_by_its_name_from_any_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A wheel's user has no configs/sweeps folder: ``--sweep search_quickstart`` is the shipped
    file (its ``base: quickstart`` the shipped config); a file of that name here comes first."""
    monkeypatch.chdir(tmp_path)
    submit("search_quickstart", cluster="local", dry_run=True)
    assert "an Optuna search of 12 trials of quickstart, 2 at a time" in capsys.readouterr().out
    (tmp_path / "search_quickstart.yaml").write_text("base: quickstart\nseeds: [0]\n")
    submit("search_quickstart.yaml", cluster="debug", dry_run=True)
    assert "Optuna" not in capsys.readouterr().out


def test_the_shipped_search_loads_and_first_tries_the_quickstarts_own_settings() -> None:
    from hmaml.config import load_config
    from hmaml.sweep import load_sweep
    from tests.train_fixtures import ROOT

    sweep = load_sweep(ROOT / "configs" / "sweeps" / "search_quickstart.yaml")
    search = sweep.spec.search
    assert search is not None and (search.n_trials, search.parallel) == (12, 2)
    base = load_config("quickstart")
    assert search.enqueue == [{"train.lr": base.train.lr, "method.hn_width": base.method.hn_width,
                               "method.inner_lr": base.method.inner_lr}]
