"""A trained run as an MLflow model: logged at the end of training and registered with its tags;
the pyfunc model, ``hmaml predict --model`` and ``load_run(...).adapt(...)`` give the same
probabilities; ``hmaml register`` logs a model a run lacks and moves aliases; a sweep moves its
alias to the best trial; a real ``mlflow models serve`` answers tasks and refuses bad ones with a
400 and one line, and keeps serving."""

from __future__ import annotations

import csv
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

import hmaml
from hmaml.commands.predict import main as predict_main
from hmaml.commands.register import main as register_main
from hmaml.config import load_config
from hmaml.data.split import load_split
from hmaml.errors import HmamlError
from hmaml.mlflow_model import encode_image, example_task, served, task_frame
from hmaml.sweep import submit
from hmaml.train.loop import train
from tests.sweep_fixtures import write_sweep
from tests.train_fixtures import tiny_config, tiny_pack

__all__ = ["tiny_pack"]  # the fixture, re-exported for pytest

LABELS = [f"class{c}" for c in range(5)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(autouse=True)
def fluent_store(store: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.pyfunc.load_model``) on this module's store, then back."""
    mlflow.set_tracking_uri(store)
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def registered(tiny_pack: Path, store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HyperMAML run, tracked, whose model was registered as ``tiny`` at the end."""
    run_dir = tmp_path_factory.mktemp("runs") / "tracked"
    result = train(tiny_config(tiny_pack, run_dir, **{
        "tracking.enabled": True, "tracking.uri": store, "tracking.system_metrics": False,
        "tracking.log_checkpoint": False, "tracking.register": "tiny"}))
    assert result.status.value == "finished"
    return run_dir


@pytest.fixture(scope="module")
def task(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A 5-way 1-shot task of test classes as PNG files: support/<class>/a.png and 3 queries a
    class (the same layout ``hmaml predict`` reads)."""
    _, classes = load_split(tiny_pack, "test")
    root = tmp_path_factory.mktemp("task")
    queries = []
    for c, label in enumerate(LABELS):
        (root / "support" / label).mkdir(parents=True)
        Image.fromarray(classes[c][0][..., 0]).save(root / "support" / label / "a.png")
        for i in (1, 2, 3):
            queries.append(root / f"q{c}{i}.png")
            Image.fromarray(classes[c][i][..., 0]).save(queries[-1])
    return root / "support", queries


def support_files(support: Path) -> list[Path]:
    return [support / label / "a.png" for label in LABELS]


def expected(run_dir: Path, task: tuple[Path, list[Path]], norm: str = "transductive"
             ) -> torch.Tensor:
    support, queries = task
    return hmaml.load_run(run_dir, norm=norm).adapt(support_files(support), LABELS
                                                   ).predict_proba(queries)


def test_a_finished_run_is_a_registered_version_with_its_tags(registered: Path,
                                                              store: str) -> None:
    test = json.loads((registered / "test.json").read_text())
    client = MlflowClient(store, registry_uri=store)
    (version,) = client.search_model_versions("name = 'tiny'")
    assert version.run_id == test["mlflow_run_id"]
    tags = version.tags
    assert float(tags["test_acc"]) == pytest.approx(test["test_acc"], abs=1e-4)
    assert tags["method"] == "hypermaml" and tags["dataset"] == "glyphs"
    run_tags = client.get_run(version.run_id).data.tags
    assert tags.get("commit") == run_tags.get("mlflow.source.git.commit")
    info = mlflow.models.get_model_info(f"models:/tiny/{version.version}")
    assert [c["name"] for c in info.signature.inputs.to_dict()] == ["support", "labels", "query"]
    assert info.signature.params.to_dict()[0]["name"] == "norm"


@pytest.mark.parametrize("norm", ["transductive", "support"])
def test_the_pyfunc_model_gives_load_runs_probabilities(registered: Path, store: str, task,
                                                       norm: str) -> None:
    support, queries = task
    model = mlflow.pyfunc.load_model("models:/tiny/1")
    frame = task_frame(support_files(support), LABELS, queries)
    answer = model.predict(frame, params={"norm": norm})
    want = expected(registered, task, norm)
    assert answer["classes"][0] == LABELS
    torch.testing.assert_close(torch.tensor(answer["probabilities"][0], dtype=torch.float32),
                               want, atol=1e-6, rtol=0)
    assert answer["predicted"][0] == [LABELS[int(k)] for k in want.argmax(-1)]
    # two tasks in one request: each adapted on its own
    two = model.predict(frame.iloc[[0, 0]].reset_index(drop=True), params={"norm": norm})
    assert len(two) == 2 and two["probabilities"][1] == answer["probabilities"][0]


def test_bad_tasks_are_refused_in_one_line(registered: Path, store: str, task) -> None:
    support, queries = task
    model = mlflow.pyfunc.load_model("models:/tiny/1").unwrap_python_model()
    good = task_frame(support_files(support), LABELS, queries)

    def refusal(frame, params=None) -> str:
        with pytest.raises(MlflowException) as caught:
            model.predict(None, frame, params)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
        assert "\n" not in caught.value.message
        return caught.value.message

    four = task_frame(support_files(support)[:4], LABELS[:4], queries)
    assert "4 classes given" in refusal(four) and "5-way" in refusal(four)
    broken = good.assign(query=[[encode_image(b"not an image")]])
    assert refusal(broken).startswith("task 0, query image 0: not an image file")
    assert refusal(good.assign(query=[["%%%"]])) == "task 0, query image 0: not base64 text"
    assert "lacks the column(s) query" in refusal(good.drop(columns="query"))
    assert "norm='nope'" in refusal(good, {"norm": "nope"})


def test_register_and_predict_from_the_registry(registered: Path, store: str, task,
                                                tiny_pack: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    support, queries = task
    assert register_main(["--run", str(registered), "--name", "tiny", "--alias", "champion",
                          "--tracking-uri", store]) == 0
    assert "is version 2 of tiny, alias champion" in capsys.readouterr().out
    out = tmp_path / "p.csv"
    assert predict_main(["--model", "models:/tiny@champion", "--tracking-uri", store,
                         "--support", str(support), "--query", *map(str, queries),
                         "--out", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    got = torch.tensor([[float(x) for x in r[2:]] for r in rows[1:]])
    torch.testing.assert_close(got, expected(registered, task), atol=2e-6, rtol=0)

    # a run that logged no model (tracking.log_model=false) gets one when registered
    plain = tmp_path / "plain"
    train(tiny_config(tiny_pack, plain, **{
        "tracking.enabled": True, "tracking.uri": store, "tracking.system_metrics": False,
        "tracking.log_checkpoint": False, "tracking.log_model": False}))
    client = MlflowClient(store, registry_uri=store)
    run_id = (plain / "mlflow_run_id.txt").read_text().strip()
    assert not client.search_logged_models(
        [client.get_run(run_id).info.experiment_id], f"source_run_id = '{run_id}'")
    assert register_main(["--run", str(plain), "--name", "tiny", "--alias", "champion",
                          "--tracking-uri", store]) == 0
    assert client.get_model_version_by_alias("tiny", "champion").run_id == run_id

    # what cannot be found is one line, exit 2
    capsys.readouterr()
    assert predict_main(["--model", "models:/tiny@nope", "--tracking-uri", store,
                         "--support", str(support), "--query", str(queries[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: models:/tiny@nope: not found in") and err.count("\n") == 1
    untracked = tmp_path / "untracked"
    untracked.mkdir()
    assert register_main(["--run", str(untracked), "--name", "tiny"]) == 2
    assert "no MLflow run" in capsys.readouterr().err


def test_register_needs_a_logged_model() -> None:
    with pytest.raises(HmamlError, match=r"tracking\.register.*needs tracking\.log_model=true"):
        load_config("quickstart", ["tracking.register=x", "tracking.log_model=false"])


def test_a_model_that_cannot_be_logged_costs_a_warning_not_the_run(
        tiny_pack: Path, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hmaml.mlflow_model

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hmaml.mlflow_model, "log_model", refuse)
    with pytest.warns(RuntimeWarning, match="MLflow model was not logged.*disk full"):
        result = train(tiny_config(tiny_pack, tmp_path / "run", **{
            "tracking.enabled": True, "tracking.uri": store, "tracking.system_metrics": False,
            "tracking.log_checkpoint": False}))
    assert result.status.value == "finished"
    assert MlflowClient(store).get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_a_sweep_moves_its_alias_to_the_best_trial_by_validation(
        tmp_path: Path, tiny_pack: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    path = write_sweep(tmp_path, {"grid": {"train.lr": [0.01, 0.0001]},
                                  "register": {"name": "swept"}}, pack=tiny_pack,
                       tracking_uri=uri)
    out = submit(path, cluster="debug")
    assert set(out["submitted"].values()) == {"finished"}
    tests = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/test.json")]
    best = max(tests, key=lambda t: t["best_val_acc"])
    client = MlflowClient(uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("swept", "champion")
    assert champion.run_id == best["mlflow_run_id"]
    submit(path, cluster="debug")  # summarising again reuses the champion's version
    assert len(client.search_model_versions("name = 'swept'")) == 1


def test_a_sweep_that_registers_needs_tracking(tmp_path: Path, tiny_pack: Path) -> None:
    path = write_sweep(tmp_path, {"register": {"name": "swept"}}, pack=tiny_pack)
    with pytest.raises(HmamlError, match=r"register needs tracking\.enabled"):
        submit(path, cluster="debug")


# --- the served model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_url(registered: Path, store: str, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[str]:
    """``mlflow models serve`` of ``models:/tiny@served`` on 127.0.0.1, ready on entry."""
    MlflowClient(store, registry_uri=store).set_registered_model_alias("tiny", "served", "1")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with served("models:/tiny@served", store, log, env={"OMP_NUM_THREADS": "1"}) as (url, _):
        yield url


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_as_hmaml_predict(served_url: str, registered: Path,
                                                      task, tmp_path: Path) -> None:
    support, queries = task
    out = tmp_path / "p.csv"
    assert predict_main(["--run", str(registered), "--support", str(support),
                         "--query", *map(str, queries), "--out", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    want = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
    records = task_frame(support_files(support), LABELS, queries).to_dict(orient="records")
    status, answer = post(served_url, {"dataframe_records": records})
    assert status == 200
    (prediction,) = answer["predictions"]
    assert prediction["classes"] == LABELS
    np.testing.assert_allclose(prediction["probabilities"], want, atol=1e-6, rtol=0)
    assert prediction["predicted"] == [r[1] for r in rows[1:]]

    bad = {"wrong number of classes": ({**records[0], "labels": ["a", "a", "b", "b", "c"]},
                                       "3 classes given"),
           "unreadable image": ({**records[0], "query": [encode_image(b"GIF89a broken")]},
                                "task 0, query image 0: not an image file"),
           "missing field": ({k: v for k, v in records[0].items() if k != "query"},
                             "missing inputs ['query']")}
    for what, (record, reason) in bad.items():
        status, answer = post(served_url, {"dataframe_records": [record]})
        assert 400 <= status < 500, what
        last = answer["message"].splitlines()[-1]  # MLflow puts the request before the reason
        assert reason in last, (what, last)
    status, answer = post(served_url, {"dataframe_records": records})  # still serving
    assert status == 200 and answer["predictions"][0]["classes"] == LABELS


def test_the_input_example_has_the_runs_shape() -> None:
    frame = example_task(28, 1, 5, 2)
    assert len(frame["support"][0]) == 10
    assert frame["labels"][0][:3] == ["class0", "class0", "class1"]
    assert len(frame["query"][0]) == 5


def test_the_serving_benchmark_prints_its_figures(registered: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from hmaml.commands.bench import main as bench_main

    bench_main(["serve", "--run", str(registered), "--requests", "2", "--queries", "2",
                "--no-http"])
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert figures["task"].startswith("5-way 1-shot, 2 queries a class (10)")
    assert figures["adapt"]["median_ms"] > 0 and figures["pyfunc"]["median_ms"] > 0
