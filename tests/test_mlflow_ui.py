"""The MLflow UI, seen in a real browser: a finished sweep logged through ``Tracker`` (a parent run
and three child runs) is served by ``mlflow server`` and opened in headless Chromium. The children
must appear only once the parent's row is unfolded, and a child's page must show its parent, its
parameters and its metric. The link a finished training run prints, opened as printed, must show
the runs table with the run's ``test_acc`` as a column. Needs Debian's ``chromium``, ``node`` and
``npm ci --prefix tests/ui``; skips, naming what is missing, otherwise."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from hmaml.config import load_config
from hmaml.train.tracking import Tracker

UI_DIR = Path(__file__).resolve().parent / "ui"
DRIVER = UI_DIR / "mlflow_ui.js"
EXPERIMENT = "ui-sweep"
PARENT = "sweep-lr"
# child run name -> (train.lr, val/acc logged at the last step)
CHILDREN = {"trial-0-lr0.01": (0.01, 0.41), "trial-1-lr0.003": (0.003, 0.47),
            "trial-2-lr0.001": (0.001, 0.52)}
OPEN_CHILD = "trial-1-lr0.003"
SERVER_START_S = 60.0


def _missing_tools() -> str | None:
    if shutil.which("chromium") is None:
        return "chromium is not installed (apt-get install chromium)"
    node = shutil.which("node")
    if node is None:
        return "node is not installed (playwright-core needs node >= 20)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    major = re.match(r"v(\d+)\.", version.stdout)
    if major is None or int(major[1]) < 20:
        return f"node {version.stdout.strip()} is older than 20, which playwright-core needs"
    if not (UI_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (npm ci --prefix tests/ui)"
    return None


MISSING = _missing_tools()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


def _log_sweep(store: Path, work: Path) -> str:
    """A finished parent run with three finished child runs; returns the experiment id."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}"
    common = [f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}"]
    parent = Tracker()
    parent_id = parent.start(load_config("quickstart", [*common, f"tracking.run_name={PARENT}"]),
                             work / PARENT, tags={"sweep": "train.lr"})
    assert parent_id, "the parent run was not created"
    for name, (lr, acc) in CHILDREN.items():
        cfg = load_config("quickstart", [*common, f"tracking.run_name={name}", f"train.lr={lr}"])
        child = Tracker()
        assert child.start(cfg, work / name, parent_run_id=parent_id), f"{name} was not created"
        child.log_metrics({"val/acc": acc - 0.1}, step=0)
        child.log_metrics({"val/acc": acc}, step=1)
        child.end("FINISHED")
    parent.end("FINISHED")
    return MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT).experiment_id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _mlflow_server(store: Path, artifacts: Path, log: Path, port: int | None = None
                   ) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over ``store``, ready (its /health answers) on entry."""
    port = port or _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow server gave no /health in {SERVER_START_S:.0f} s:\n"
                                f"{log.read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sweep_runs_nest_under_their_parent_in_the_ui(tmp_path: Path) -> None:
    store = tmp_path / "mlruns.db"
    experiment_id = _log_sweep(store, tmp_path / "runs")
    shot, child_shot = tmp_path / "mlflow_ui.png", tmp_path / "mlflow_ui_child.png"
    with _mlflow_server(store, tmp_path / "artifacts", tmp_path / "server.log") as url:
        options = {"url": f"{url}/#/experiments/{experiment_id}/runs", "parent": PARENT,
                   "children": list(CHILDREN), "open_child": OPEN_CHILD,
                   "screenshot": str(shot), "child_shot": str(child_shot),
                   "user_data": str(tmp_path / "chromium-profile"),
                   "chromium": shutil.which("chromium")}
        done = subprocess.run(["node", str(DRIVER), json.dumps(options)], cwd=UI_DIR,
                              capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, f"browser driver failed:\n{done.stderr[-3000:]}"
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    if target := os.environ.get("HMAML_UI_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    for png in (shot, child_shot):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (1600, 800)

    # Folded, the table lists the sweep's parent only: the children are nested, not flat.
    assert seen["before"] == [PARENT]
    # Unfolded, the children follow their parent.
    assert seen["after"][0] == PARENT and sorted(seen["after"][1:]) == sorted(CHILDREN)
    # The child's page names its parent and shows its own parameter and last metric value.
    text = seen["child_text"]
    lr, acc = CHILDREN[OPEN_CHILD]
    assert f"Parent run\n{PARENT}" in text
    assert f"train.lr\n{lr}" in text and f"val/acc\n{acc}" in text
    assert f"tracking.run_name\n{OPEN_CHILD}" in text


def test_the_printed_link_opens_on_the_runs_table_with_test_acc(tmp_path: Path,
                                                                   capsys) -> None:
    """The end-of-run line's MLflow link, opened exactly as printed, shows the runs table (not
    MLflow 3's empty GenAI overview) in hmaml's saved view: the run's test accuracy is a column
    in the window, no click needed (MLflow's default columns have no metric)."""
    from hmaml.data.pack import pack_dataset
    from hmaml.train.loop import train
    from hmaml.train.tracking import VIEW_KEY, VIEW_METRICS
    from tests.train_fixtures import tiny_config

    store = tmp_path / "mlruns.db"
    pack = tmp_path / "glyphs"
    pack_dataset("glyphs", None, pack, classes=(20, 10, 10), per_class=20, progress=False)
    port = _free_port()
    cfg = tiny_config(pack, tmp_path / "run", **{
        "tracking.enabled": True, "tracking.uri": f"sqlite:///{store}",
        "tracking.ui_url": f"http://127.0.0.1:{port}", "tracking.system_metrics": False})
    result = train(cfg)
    assert result.test is not None
    test_acc = result.test["test_acc"]
    printed = capsys.readouterr().out
    [link] = re.findall(r"MLflow: (\S+)", printed)
    assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/#/experiments/\d+/runs\?"
                        rf"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}", link)
    assert f"mlflow ui --backend-store-uri sqlite:///{store}" in printed
    shot = tmp_path / "first_view.png"
    with _mlflow_server(store, tmp_path / "artifacts", tmp_path / "server.log", port) as url:
        assert link.startswith(url)
        options = {"url": link, "run": "quickstart", "column": "test_acc",
                   "screenshot": str(shot), "user_data": str(tmp_path / "chromium-profile"),
                   "chromium": shutil.which("chromium")}
        done = subprocess.run(["node", str(UI_DIR / "first_view.js"), json.dumps(options)],
                              cwd=UI_DIR, capture_output=True, text=True, timeout=90,
                              check=False)
    assert done.returncode == 0, f"browser driver failed:\n{done.stderr[-3000:]}"
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["runs"] == ["quickstart"]
    # the runs table in model-training mode, not MLflow 3's empty GenAI overview
    assert "Run Name" in seen["headers"] and "No data available" not in seen["text"]
    assert "Model training" in seen["text"] and "1 matching run" in seen["text"]
    # hmaml's view was applied (an unknown key would show an error and the default columns)
    assert "share key" not in seen["text"] and f"viewStateShareKey={VIEW_KEY}" in seen["url"]
    # its metric columns are in the window, with the run's test accuracy in its row
    for name in VIEW_METRICS:
        assert name in seen["headers"], (name, seen["headers"])
    cell = seen["cells"].get("metrics.`test_acc`")
    assert cell is not None, seen["cells"]
    assert float(cell) == pytest.approx(test_acc, rel=1e-9)
