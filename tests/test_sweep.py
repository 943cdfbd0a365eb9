"""Sweeps: trial expansion, refusals, dry run, the SLURM array script (with the sweep file's
#SBATCH options and setup lines), the distributed-plan check before submission, the SQLite
warning, debug and local execution, idempotent re-submission, MLflow parent/child runs, and
preemption -> requeue -> same result (in-process; tests/test_slurm.py does it on real SLURM)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest

from hmaml.errors import HmamlError
from hmaml.sweep import (
    TrialJob,
    load_sweep,
    read_sweep_json,
    status_table,
    submit,
    summarize,
)
from hmaml.sweep.signals import PreemptionGuard
from hmaml.train.rundir import RunDir, Status
from tests.sweep_fixtures import child_runs, fake_slurm, run_artifacts, write_sweep
from tests.train_fixtures import ROOT, tiny_pack

__all__ = ["tiny_pack"]  # the fixture, re-exported for pytest

SWEEPS = ROOT / "configs" / "sweeps"


# --- loading and expansion ------------------------------------------------------------------


def test_grid_and_seeds_make_every_combination_with_readable_names(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {"overrides": {"train": {"epochs": 1}},
                                  "grid": {"train.lr": [1e-2, 1e-5], "method.hn_width": [8, 16]},
                                  "seeds": [3, 4]})
    sweep = load_sweep(path)
    assert [t.name for t in sweep.trials][:3] == [
        "lr=0.01_hn_width=8_seed=3", "lr=0.01_hn_width=8_seed=4", "lr=0.01_hn_width=16_seed=3"]
    assert len(sweep.trials) == 8
    last = sweep.trials[-1]
    assert (last.cfg.train.lr, last.cfg.method.hn_width, last.cfg.seed) == (1e-5, 16, 4)
    assert last.cfg.train.epochs == 1  # the sweep's overrides reach every trial
    assert last.cfg.run_dir == str(tmp_path / "out" / last.name)
    assert last.cfg.tracking.run_name == last.name
    assert last.axes == {"train.lr": 1e-5, "method.hn_width": 16, "seed": 4}


def test_variants_carry_settings_that_depend_on_each_other() -> None:
    sweep = load_sweep(SWEEPS / "ablation_omni_emnist1.yaml")
    rows = {t.axes["variant"]: t.cfg for t in sweep.trials}
    assert list(rows) == ["noswitch-noenh", "noswitch-enh", "switch-noenh", "switch-enh"]
    table5 = {name: (cfg.method.switch, cfg.method.enhance, cfg.train.lr,
                     cfg.train.lr_milestones) for name, cfg in rows.items()}
    assert table5 == {"noswitch-noenh": (False, False, 1e-4, []),
                      "noswitch-enh": (False, True, 1e-4, []),
                      "switch-noenh": (True, False, 1e-2, [51, 550]),
                      "switch-enh": (True, True, 1e-2, [51, 550])}
    assert all(cfg.train.epochs == 2048 and cfg.name == "omni_emnist1" for cfg in rows.values())
    assert sweep.spec.executor.cluster == "slurm"

    cpu = load_sweep(SWEEPS / "ablation_omni_emnist1_cpu.yaml")
    cpu_rows = {t.axes["variant"]: t.cfg for t in cpu.trials}
    assert {n: (c.train.lr, c.train.lr_milestones, c.train.epochs) for n, c in cpu_rows.items()} \
        == {"noswitch-noenh": (1e-4, [], 40), "noswitch-enh": (1e-4, [], 40),
            "switch-noenh": (1e-2, [2, 11], 40), "switch-enh": (1e-2, [2, 11], 40)}
    assert {(c.method.warmup_start, c.method.warmup_len) for c in cpu_rows.values()} == {(1, 10)}
    assert (cpu.spec.executor.cluster, cpu.spec.executor.max_local_parallel) == ("local", 2)

    grid = load_sweep(SWEEPS / "lr_width.yaml")
    assert len(grid.trials) == 8
    assert {(t.cfg.train.lr, t.cfg.method.hn_width) for t in grid.trials} == {
        (1e-2, 256), (1e-2, 512), (1e-3, 256), (1e-3, 512)}
    assert sorted({t.cfg.seed for t in grid.trials}) == [0, 1]


def test_random_samples_are_reproducible_and_inside_their_space(tmp_path: Path) -> None:
    body = {"random": {"samples": 6, "seed": 7, "space": {
        "train.lr": {"loguniform": [1e-4, 1e-1]}, "method.inner_lr": {"uniform": [0.05, 0.2]},
        "method.hn_width": {"choice": [8, 16]}}}}
    first = load_sweep(write_sweep(tmp_path, body)).trials
    again = load_sweep(write_sweep(tmp_path, body)).trials
    assert [t.overrides for t in first] == [t.overrides for t in again]
    assert len({t.cfg.train.lr for t in first}) == 6
    for trial in first:
        assert 1e-4 <= trial.cfg.train.lr <= 1e-1
        assert 0.05 <= trial.cfg.method.inner_lr <= 0.2
        assert trial.cfg.method.hn_width in (8, 16)
    assert first[2].name.startswith("r02_lr=")
    other = load_sweep(write_sweep(tmp_path, {**body, "random": {**body["random"], "seed": 8}}))
    assert [t.cfg.train.lr for t in other.trials] != [t.cfg.train.lr for t in first]


@pytest.mark.parametrize(("body", "culprit"), [
    ({"grdi": {"train.lr": [1]}}, "unknown key 'grdi'"),
    ({"executor": {"partitoin": "gpu"}}, "unknown key 'executor.partitoin'"),
    ({"variants": [{"name": "a", "overides": {}}]}, "unknown key 'variants[0].overides'"),
    ({"random": {"samples": 2, "space": {"train.lr": {"choice": [1]}}, "sed": 1}},
     "unknown key 'random.sed'"),
    ({"grid": {"train.lr": []}}, "grid.train.lr is empty"),
    ({"grid": {}}, "grid is empty"),
    ({"variants": []}, "variants is empty"),
    ({"seeds": []}, "seeds is empty"),
    ({"random": {"samples": 2, "space": {"train.lr": {"choice": []}}}},
     "random.space.train.lr.choice is empty"),
    ({"random": {"samples": 0, "space": {"train.lr": {"choice": [1]}}}}, "random.samples=0"),
    ({"random": {"samples": 1, "space": {"train.lr": {"loguniform": [0, 1]}}}},
     "random.space.train.lr.loguniform"),
    ({"grid": {"train.lrr": [0.1]}}, "unknown key 'train.lrr'"),
    ({"grid": {"train.lr": [-1.0]}}, "train.lr=-1.0 must be > 0"),
    ({"grid": {"seed": [1, 2]}}, "use 'seeds"),
    ({"grid": {"train.lr": [0.1]}, "variants": [{"name": "a", "overrides": {"train.lr": 1}}]},
     "'train.lr' is varied by both"),
    ({"executor": {"cluster": "kubernetes"}}, "executor.cluster='kubernetes'"),
    ({"executor": {"nodes": "two"}}, "executor.nodes"),
    ({"executor": {"gpus_per_node": 4, "tasks_per_node": 2}},
     "executor.tasks_per_node=2 must equal gpus_per_node=4"),
    ({"executor": {"additional_parameters": {"time": "1:00:00"}}},
     "executor.additional_parameters.time is written by the sweep itself; set "
     "executor.timeout_min"),
    ({"executor": {"additional_parameters": {"open_mode": "truncate"}}},
     "executor.additional_parameters.open_mode is written by the sweep itself (submitit"),
    ({"executor": {"additional_parameters": {"exclude": ["a", "b"]}}},
     "executor.additional_parameters.exclude=['a', 'b'] must be a string or number"),
    ({"executor": {"setup": "module load cuda"}}, "executor.setup"),
    ({"executor": {"trials_per_gpu": 0}}, "executor.trials_per_gpu=0 must be >= 1"),
    ({"executor": {"trials_per_gpu": 2, "gpus_per_node": 2}},
     "executor.trials_per_gpu=2 packs one-process trials: it needs gpus_per_node <= 1"),
    ({"executor": {"trials_per_gpu": 2, "tasks_per_node": 2}},
     "executor.trials_per_gpu=2 packs one-process trials"),
    ({"executor": {"visible_gpus": [0, 0]}}, "executor.visible_gpus=[0, 0] must list distinct"),
    ({"executor": {"gpus_per_node": 2, "visible_gpus": [1]}},
     "executor.gpus_per_node=2 is more than the 1 executor.visible_gpus"),
])
def test_bad_sweep_files_are_refused_naming_the_culprit(tmp_path: Path, body: dict,
                                                        culprit: str) -> None:
    with pytest.raises(HmamlError, match=r"sweep\.yaml") as err:
        load_sweep(write_sweep(tmp_path, body))
    assert culprit in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_dry_run_prints_trials_and_executor_and_submits_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.sweep import main

    path = write_sweep(tmp_path, {"grid": {"train.lr": [0.01, 0.001]},
                                  "executor": {"partition": "gpu", "gpus_per_node": 4,
                                               "nodes": 2, "timeout_min": 90}})
    assert main(["--sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lr=0.01_seed=0: train.lr=0.01 seed=0" in out
    assert "lr=0.001_seed=0: train.lr=0.001 seed=0" in out
    for line in ("executor (slurm):", "slurm_partition: gpu", "nodes: 2", "tasks_per_node: 4",
                 "gpus_per_node: 4", "timeout_min: 90", "one job array of 2 trials"):
        assert line in out
    assert not (tmp_path / "out").exists()
    assert main(["--sweep", str(path), "--dry-run", "--cluster", "local"]) == 2  # nodes=2
    assert "sweep.yaml: executor.nodes=2: the local cluster has one node" in capsys.readouterr().err


def test_slurm_gets_one_job_array_with_the_executor_settings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    path = write_sweep(tmp_path, {
        "grid": {"train.lr": [0.01, 0.001]}, "seeds": [0, 1],
        "executor": {"partition": "gpu", "account": "proj", "gpus_per_node": 2,
                     "cpus_per_task": 6, "timeout_min": 30, "array_parallelism": 3,
                     "signal_delay_s": 100,
                     "setup": ["module load cuda/12.4", "source /opt/venvs/hmaml/bin/activate"],
                     "additional_parameters": {"constraint": "a100", "exclude": "gpu07",
                                               "gres": "gpu:a100:2", "exclusive": True}}})
    out = submit(path, echo=lambda _: None)
    assert out["submitted"] == {t.name: f"4242_{i}" for i, t in
                                enumerate(load_sweep(path).trials)}
    [script] = [p.read_text() for p in scripts.iterdir()]
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --time=30", "#SBATCH --signal=USR2@100",
                 "#SBATCH --constraint=a100", "#SBATCH --exclude=gpu07",
                 "#SBATCH --gres=gpu:a100:2", "#SBATCH --exclusive"):
        assert f"{line}\n" in script
    # the setup lines, in order, after the thread count and before the trial starts
    setup = ("export OMP_NUM_THREADS=6\nmodule load cuda/12.4\n"
             "source /opt/venvs/hmaml/bin/activate\n")
    assert setup in script and script.index(setup) < script.index("srun ")
    info = read_sweep_json(tmp_path / "out")
    assert [t["name"] for t in info["trials"]] == list(out["submitted"])
    assert info["submissions"][-1]["cluster"] == "slurm"


def test_a_trial_whose_distributed_plan_cannot_work_fails_before_anything_is_queued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from launch.sweep import main

    scripts = fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    path = write_sweep(tmp_path, {"grid": {"train.lr": [0.01, 0.001]},
                                  "executor": {"nodes": 2, "tasks_per_node": 4000}})
    assert main(["--sweep", str(path)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {path}: trial lr=0.01_seed=0: processes=8000 must lie in")
    assert line.endswith("(8000 processes on 2 nodes, cluster slurm)")
    assert not list(scripts.iterdir()) and not (tmp_path / "out").exists()
    assert main(["--sweep", str(path), "--dry-run"]) == 2  # a dry run checks it too


@pytest.mark.parametrize(("cluster", "uri", "warned"), [
    ("slurm", "sqlite:///{tmp}/mlruns.db", True), ("local", "sqlite:///{tmp}/mlruns.db", False),
    ("slurm", "http://mlflow.internal:5000", False)])
def test_slurm_sweep_logging_to_sqlite_warns_once(tmp_path: Path, cluster: str, uri: str,
                                                  warned: bool) -> None:
    path = write_sweep(tmp_path, {"grid": {"train.lr": [0.1, 0.2, 0.3]}},
                       tracking_uri=uri.format(tmp=tmp_path))
    lines: list[str] = []
    submit(path, cluster=cluster, dry_run=True, echo=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == int(warned)
    if warned:
        assert "lose metrics" in warnings[0] and "docker/compose.yaml" in warnings[0]
        assert "\n" not in warnings[0]


# --- running trials (need the training loop) ------------------------------------------------


def test_debug_sweep_gives_child_runs_under_one_parent_and_a_summary(
        tmp_path: Path, tiny_pack: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    path = write_sweep(tmp_path, {"variants": [
        {"name": "plain", "overrides": {"method.enhance": False}},
        {"name": "enh", "overrides": {"method.enhance": True}}], "seeds": [0, 1]},
        pack=tiny_pack, tracking_uri=uri)
    out = submit(path, cluster="debug")
    assert set(out["submitted"].values()) == {"finished"}
    parent = out["parent_run_id"]
    sweep_dir = tmp_path / "out"
    info = read_sweep_json(sweep_dir)
    assert info["parent_run_id"] == parent and len(info["trials"]) == 4

    children = child_runs(uri, parent)
    assert sorted(c["name"] for c in children) == sorted(out["submitted"])
    assert {c["status"] for c in children} == {"FINISHED"}
    enh = next(c for c in children if c["name"] == "enh_seed=1")
    assert enh["tags"]["sweep.axis.variant"] == "enh"
    assert enh["tags"]["sweep.axis.seed"] == "1"
    assert enh["params"]["method.enhance"] == "true"
    for child in children:  # each child run is the run of its trial's run_dir
        test = json.loads((sweep_dir / child["name"] / "test.json").read_text())
        assert test["mlflow_run_id"] == child["run_id"]
        assert child["metrics"]["test_acc"] == pytest.approx(test["test_acc"])

    # the summary pools the two seeds of each variant
    rows = {r["variant"]: r for r in summarize(sweep_dir, echo=lambda _: None)["rows"]}
    plain = [json.loads((sweep_dir / f"plain_seed={s}" / "test.json").read_text())["test_acc"]
             for s in (0, 1)]
    assert rows["plain"]["test_acc"] == pytest.approx(sum(plain) / 2)
    sd = abs(plain[0] - plain[1]) / math.sqrt(2)
    assert rows["plain"]["ci95"] == pytest.approx(1.96 * sd / math.sqrt(2))
    assert rows["plain"]["seeds"] == "2/2" and rows["plain"]["ci_over"] == "seeds"
    for name in ("summary.md", "summary.csv", "summary.png"):
        assert (sweep_dir / name).stat().st_size > 0
    assert "| plain | 2/2 |" in (sweep_dir / "summary.md").read_text()
    assert set(run_artifacts(uri, parent)) >= {"summary.md", "summary.csv", "summary.png"}
    from mlflow import MlflowClient

    assert MlflowClient(uri).get_run(parent).info.status == "FINISHED"
    table, states = status_table(sweep_dir)
    assert [s["state"] for s in states] == ["finished"] * 4
    assert "2/2" in table

    # submitting again runs nothing and reuses the parent run
    capsys.readouterr()
    mtimes = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/test.json")}
    again = submit(path, cluster="debug")
    assert again["submitted"] == {} and len(again["skipped"]) == 4
    assert again["parent_run_id"] == parent
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/test.json")} == mtimes
    assert len(child_runs(uri, parent)) == 4
    assert "0 to run, 4 finished or running" in capsys.readouterr().out


def test_local_executor_runs_trials_as_processes(tmp_path: Path, tiny_pack: Path) -> None:
    path = write_sweep(tmp_path, {"grid": {"train.lr": [0.01, 0.001]},
                                  "executor": {"cluster": "local", "max_local_parallel": 2,
                                               "timeout_min": 10}}, pack=tiny_pack)
    out = submit(path, echo=lambda _: None)
    assert len(out["submitted"]) == 2
    pids = set()
    for name in out["submitted"]:
        run_dir = tmp_path / "out" / name
        assert json.loads((run_dir / "test.json").read_text())["status"] == "finished"
        marker = json.loads((run_dir / "trial.json").read_text())
        assert marker["state"] == "finished" and marker["omp_num_threads"] == "1"
        pids.add(marker["pid"])
    assert len(pids) == 2 and os.getpid() not in pids
    assert (tmp_path / "out" / "summary.csv").read_text().count("\n") == 3


def test_local_trials_share_each_gpu_k_at_a_time(tmp_path: Path, tiny_pack: Path) -> None:
    """executor.trials_per_gpu: 2 on two GPUs: four trials at once, spread over the GPUs before
    they share one, the fifth when a place frees; each its own process, folder, child run."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    path = write_sweep(tmp_path, {"seeds": [0, 1, 2, 3, 4], "executor": {
        "cluster": "local", "gpus_per_node": 1, "trials_per_gpu": 2, "visible_gpus": [3, 5],
        "timeout_min": 10}}, pack=tiny_pack, tracking_uri=uri)
    lines: list[str] = []
    out = submit(path, echo=lines.append)
    started = [line.rsplit(" on GPU ", 1)[1] for line in lines if "started as local job" in line]
    assert started[:4] == ["3", "5", "3", "5"] and len(started) == 5
    spans: dict[str, list[tuple[float, float]]] = {"3": [], "5": []}
    pids = set()
    for name in out["submitted"]:
        rd = RunDir(tmp_path / "out" / name)
        record = json.loads(rd.trial.read_text())
        assert record["state"] == "finished"
        pids.add(record["pid"])
        history = rd.read_history()
        spans[record["cuda_visible_devices"]].append(
            (history[0]["time"] - history[0]["epoch_s"], history[-1]["time"]))
    assert len(pids) == 5
    for gpu, windows in spans.items():  # never three trials training on one GPU at once
        for start, _ in windows:
            assert sum(a <= start < b for a, b in windows) <= 2, (gpu, windows)
    children = child_runs(uri, out["parent_run_id"])
    assert sorted(c["name"] for c in children) == sorted(out["submitted"])
    assert all(c["status"] == "FINISHED" for c in children)


def test_local_packing_without_gpus_is_refused(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, {"executor": {"cluster": "local", "trials_per_gpu": 2}})
    with pytest.raises(HmamlError, match=re.escape(
            "executor.trials_per_gpu=2 without GPUs packs trials into SLURM jobs; locally, "
            "executor.max_local_parallel")):
        submit(path, echo=lambda _: None)


def test_gpu_trials_on_a_machine_without_gpus_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    path = write_sweep(tmp_path, {"executor": {"cluster": "local", "gpus_per_node": 1}})
    with pytest.raises(HmamlError, match=r"executor.gpus_per_node=1, but this machine shows 0 "
                                         r"GPUs \(CUDA_VISIBLE_DEVICES=\)"):
        submit(path, dry_run=True, echo=lambda _: None)


def test_the_sweep_file_takes_overrides_on_the_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch.sweep import main

    path = write_sweep(tmp_path, {"grid": {"train.lr": [0.01]},
                                  "executor": {"cluster": "slurm", "gpus_per_node": 1}})
    assert main(["--sweep", str(path), "--dry-run", f"sweep_dir={tmp_path / 'elsewhere'}",
                 "seeds=[1,2,3]", "overrides.train.epochs=7", "executor.trials_per_gpu=2",
                 "grid.train.lr=[0.1]"]) == 0
    out = capsys.readouterr().out
    assert f"3 trials of tiny in {tmp_path / 'elsewhere'}" in out
    assert "lr=0.1_seed=3: train.epochs=7 train.lr=0.1 seed=3" in out
    assert "tasks_per_node: 2" in out and "one job array of 2 jobs, 2 trials each (sharing its " \
        "GPU)" in out
    assert main(["--sweep", str(path), "--dry-run", "executor"]) == 2
    assert "sweep override 'executor' must look like key.sub=value" in capsys.readouterr().err
    assert main(["--sweep", str(path), "--dry-run", "executor.gpu_count=2"]) == 2
    assert "unknown key 'executor.gpu_count'" in capsys.readouterr().err


class _StopAfterFirstEpoch(TrialJob):
    """Sends itself submitit's preemption signal once the first epoch is done; with
    ``deaf`` the loop never sees the stop request (as if no step boundary came in time)."""

    sent = False
    deaf = False

    def stop_requested(self, guard: PreemptionGuard) -> bool:
        progress = Path(self.cfg.run_dir) / "progress.json"
        if not self.sent and progress.is_file() and json.loads(progress.read_text())["epoch"]:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR2)
        return super().stop_requested(guard) and not self.deaf


class _FakeSubmitit:
    """Stands in for submitit's SIGUSR2 handler in a job: dump ``checkpoint()``, then exit."""

    def __init__(self) -> None:
        self.job: TrialJob | None = None
        self.requeued: list = []

    def __call__(self, signum: int, frame: object) -> None:
        assert self.job is not None
        self.requeued.append(self.job.checkpoint())
        raise SystemExit(-1)


@pytest.fixture
def fake_submitit() -> _FakeSubmitit:
    fake = _FakeSubmitit()
    previous = signal.signal(signal.SIGUSR2, fake)
    yield fake
    signal.signal(signal.SIGUSR2, previous)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_pack: Path) -> dict:
    """The result of the preemption tests' trial when nothing stops it."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = TrialJob(load_sweep(write_sweep(folder, {"seeds": [5]}, pack=tiny_pack))
                      .trials[0].cfg)()
    assert result.status == Status.FINISHED and result.test is not None
    return result.test


@pytest.mark.parametrize(("grace_s", "deaf"), [(60.0, False), (0.01, True)],
                         ids=["stop-at-step-boundary", "no-boundary-in-time"])
def test_preempted_trial_requeues_and_resumes_to_the_same_result(
        tmp_path: Path, tiny_pack: Path, fake_submitit: _FakeSubmitit, uninterrupted: dict,
        grace_s: float, deaf: bool) -> None:
    from submitit.helpers import DelayedSubmission

    cfg = load_sweep(write_sweep(tmp_path, {"seeds": [5]}, pack=tiny_pack)).trials[0].cfg
    run_dir = Path(cfg.run_dir)
    job = _StopAfterFirstEpoch(cfg, grace_s=grace_s)
    job.deaf = deaf
    fake_submitit.job = job
    with pytest.raises(SystemExit):
        job()
    [requeued] = fake_submitit.requeued
    assert isinstance(requeued, DelayedSubmission)
    assert type(requeued.function) is TrialJob and requeued.function.cfg == cfg
    assert json.loads((run_dir / "trial.json").read_text())["state"] == "preempted"
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["epoch"] < cfg.train.epochs and not (run_dir / "test.json").exists()
    # a clean stop checkpoints mid-epoch; otherwise the last epoch's checkpoint is resumed
    assert progress["status"] == ("running" if deaf else "preempted")
    assert signal.getsignal(signal.SIGUSR2) is fake_submitit  # handed back

    result = requeued.result()
    assert result.status == Status.FINISHED and result.epoch == cfg.train.epochs
    resumed = result.test
    assert resumed["test_acc"] == pytest.approx(uninterrupted["test_acc"], abs=1e-9)
    assert resumed["best_val_acc"] == pytest.approx(uninterrupted["best_val_acc"], abs=1e-9)
    assert json.loads((run_dir / "trial.json").read_text())["state"] == "finished"


def test_status_reads_states_from_run_directories(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from hmaml.sweep import write_trial_state

    fake_slurm(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    path = write_sweep(tmp_path, {"grid": {"train.lr": [0.1, 0.2, 0.3, 0.4]}})
    submit(path, echo=lambda _: None)
    dirs = [Path(t.cfg.run_dir) for t in load_sweep(path).trials]
    for run_dir, state in ((dirs[1], "running"), (dirs[2], "preempted")):
        run_dir.mkdir(parents=True)
        (run_dir / "progress.json").write_text(json.dumps(
            {"epoch": 1, "epochs": 2, "best_val_acc": 41.5, "status": state}))
    write_trial_state(RunDir(dirs[3]), "failed", "RuntimeError: boom")
    table, rows = status_table(tmp_path / "out")
    assert [r["state"] for r in rows] == ["pending", "running", "preempted", "failed"]
    assert rows[3]["error"] == "RuntimeError: boom"
    assert "lr=0.2_seed=0  running    1/2    41.50" in table
    assert table.splitlines()[-1] == "1 pending, 1 running, 1 preempted, 1 failed"
