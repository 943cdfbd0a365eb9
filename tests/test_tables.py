"""Re-testing trained runs at other settings (``--override``) and the paper's Tables 3 and 4:
known answers from the runs' own evaluation, refusals that name the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hmaml.data.format import MANIFEST_NAME
from hmaml.train.loop import train
from hmaml.train.protocol import evaluate_run
from launch.evaluate import main as evaluate_main
from launch.tables import main as tables_main
from tests.stream_fixtures import write_pack
from tests.train_fixtures import tiny_config, tiny_pack  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def runs(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """A tiny trained HyperMAML run and a tiny whole-network MAML run."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in (("hypermaml", {}),
                        ("maml", {"method.name": "maml", "method.adapt": "all"})):
        cfg = tiny_config(tiny_pack, root / name, **{"train.mixed_precision": "no", **extra})
        train(cfg)
        out[name] = root / name
    return out


def test_override_tests_maml_at_other_inner_steps(runs, capsys):
    trained = evaluate_run(runs["maml"], 8, 1, write=False)
    same = evaluate_run(runs["maml"], 8, 1, ["method.inner_steps=1"], write=False)
    zero = evaluate_run(runs["maml"], 8, 1, ["method.inner_steps=0"], write=False)
    assert same["test_repeats"] == trained["test_repeats"]  # the run was trained at 1 step
    assert same["weight_update_norm"] == pytest.approx(trained["weight_update_norm"])
    assert zero["weight_update_norm"] == 0.0 and zero["bias_update_norm"] == 0.0
    assert zero["overrides"] == ["method.inner_steps=0"]
    assert evaluate_main(["--run", str(runs["maml"]), "--override", "method.inner_steps=2",
                          "--episodes", "8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "overrides: method.inner_steps=2" in out and " s)" in out
    assert json.loads((runs["maml"] / "evaluate.json").read_text())["overrides"] == [
        "method.inner_steps=2"]


@pytest.mark.parametrize("key", ["method.hn_width=8", "model.encoder=resnet12", "data.n_way=3"])
def test_override_refuses_keys_that_fix_parameter_shapes(runs, key, capsys):
    assert evaluate_main(["--run", str(runs["hypermaml"]), "--override", key]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --override {key}: ") and "fixes the shapes" in err
    assert err.count("\n") == 1


def test_steps_table_times_maml_per_step_count_beside_hypermaml(runs, tmp_path, capsys):
    assert tables_main(["steps", "--maml", str(runs["maml"]), "--hypermaml",
                        str(runs["hypermaml"]), "--steps", "0,1", "--episodes", "8",
                        "--repeats", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "steps.json").read_text())
    assert [(r["model"], r["steps"]) for r in saved["rows"]] == [
        ("MAML", 0), ("MAML", 1), ("HyperMAML", None)]
    assert all(r["seconds"] > 0 and r["repeats"] == 2 for r in saved["rows"])
    for row, run in ((saved["rows"][1], runs["maml"]), (saved["rows"][2], runs["hypermaml"])):
        direct = evaluate_run(run, 8, 2, write=False)
        assert row["acc"] == pytest.approx(np.mean([r["acc"] for r in direct["test_repeats"]]))
    assert (tmp_path / "steps.png").stat().st_size > 10_000
    assert "HyperMAML" in printed and "wrote" in printed


def test_norms_table_reports_each_runs_update_magnitudes(runs, capsys):
    assert tables_main(["norms", "--maml", str(runs["maml"]), "--hypermaml",
                        str(runs["hypermaml"]), "--episodes", "8", "--repeats", "2"]) == 0
    printed = capsys.readouterr().out
    hyper = evaluate_run(runs["hypermaml"], 8, 2, write=False)
    line = next(x for x in printed.splitlines() if x.startswith("HyperMAML"))
    assert f"{hyper['weight_update_norm']:.2f}" in line and "113.28" in line
    assert tables_main(["norms", "--maml", str(runs["hypermaml"]), "--hypermaml",
                        str(runs["hypermaml"])]) == 2
    assert "a hypermaml run; a maml run is needed here" in capsys.readouterr().err


def test_steps_table_works_for_84_px_natural_images_and_conv4pool(tmp_path, capsys):
    """Table 8's setting: RGB images stored at 126 px, the natural pipeline, Conv4Pool at 84 px."""
    pack = write_pack(tmp_path / "natural", {"train": [6] * 8, "val": [6] * 6, "test": [6] * 6},
                      size=126, channels=3)
    manifest = json.loads((pack / MANIFEST_NAME).read_text())
    manifest["image"] = {"size": 84, "channels": 3, "stored_size": 126, "pipeline": "natural"}
    (pack / MANIFEST_NAME).write_text(json.dumps(manifest))
    runs = {}
    for name, extra in (("hypermaml", {}),
                        ("maml", {"method.name": "maml", "method.adapt": "all"})):
        runs[name] = tmp_path / name
        train(tiny_config(pack, runs[name], **{"model.encoder": "conv4pool",
                                                 "data.augment": "natural", "data.n_query": 2,
                                                 "data.test_query": 2, "train.epochs": 2,
                                                 "train.episodes_per_epoch": 4,
                                                 "train.lr_milestones": "[]", **extra}))
        best = torch.load(runs[name] / "best.pt", weights_only=False)
        assert best["image"] == manifest["image"] and "conv4pool" in best["config_yaml"]
    assert tables_main(["steps", "--maml", str(runs["maml"]), "--hypermaml",
                        str(runs["hypermaml"]), "--steps", "0,2", "--episodes", "4",
                        "--repeats", "1", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "steps.json").read_text())
    assert [(r["model"], r["steps"]) for r in saved["rows"]] == [
        ("MAML", 0), ("MAML", 2), ("HyperMAML", None)]
    assert all(r["seconds"] > 0 and 0 <= r["acc"] <= 100 for r in saved["rows"])
    assert "wrote" in capsys.readouterr().out


def test_seeds_groups_runs_by_experiment_and_averages_over_seeds(runs, tiny_pack, tmp_path,  # noqa: F811
                                                                 capsys):
    """Two HyperMAML seeds and one MAML run of the same config name: two experiments, told apart
    by the keys that differ; the mean ± sample std over seeds is the seeds' test.json's."""
    second = tmp_path / "hypermaml_seed1"
    train(tiny_config(tiny_pack, second, **{"train.mixed_precision": "no", "seed": 1}))
    out = tmp_path / "report"
    assert tables_main(["seeds", str(runs["hypermaml"]), str(second), str(runs["maml"]),
                        "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    accs = [json.loads((r / "test.json").read_text())["test_acc"]
            for r in (runs["hypermaml"], second)]
    groups = json.loads((out / "seeds.json").read_text())["groups"]
    assert [len(g["runs"]) for g in groups] == [2, 1]
    assert [r["seed"] for r in groups[0]["runs"]] == [0, 1]
    assert groups[0]["mean"] == pytest.approx(np.mean(accs))
    assert groups[0]["std"] == pytest.approx(np.std(accs, ddof=1)) and groups[1]["std"] is None
    assert "method.name=hypermaml" in groups[0]["label"]
    assert "method.name=maml" in groups[1]["label"]
    assert f"{np.mean(accs):.2f} ± {np.std(accs, ddof=1):.2f} % over 2 seed(s) (0, 1)" in printed
    assert "one seed: no spread" in printed and " points" in printed
    assert (out / "seeds.png").stat().st_size > 10_000


def test_seeds_refuses_a_seed_twice_and_an_unfinished_run(runs, tmp_path, capsys):
    assert tables_main(["seeds", str(runs["hypermaml"]), str(runs["hypermaml"]),
                        "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the same experiment and seed 0; give each seed once" in err and err.count("\n") == 1
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["hypermaml"], unfinished)
    (unfinished / "test.json").unlink()
    assert tables_main(["seeds", str(runs["hypermaml"]), str(unfinished)]) == 2
    assert f"{unfinished}: not finished (epoch 3 of 3)" in capsys.readouterr().err
