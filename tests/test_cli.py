"""Every command turns bad input into one line on stderr and exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_fixtures import tiny_pack  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("argv", "culprit"), [
    (["bench.py", "loader", "--shards", "/nonexistent/pack"], "/nonexistent/pack/manifest.json"),
    (["evaluate.py", "--run", "/nonexistent/run"], "/nonexistent/run"),
    (["sweep.py", "--status", "/nonexistent/sweep"], "/nonexistent/sweep"),
    (["train.py", "--config", "no_such_config"], "no_such_config"),
    (["sweep.py", "--sweep", "no_such_sweep"], "sweep 'no_such_sweep' not found"),
    (["pack.py", "verify", "/nonexistent/pack"], "/nonexistent/pack"),
    (["pretrain.py", "--config", "mini_pretrain", "pretrain.batch_size=0"],
     "pretrain.batch_size=0"),
    (["tables.py", "norms", "--maml", "/nonexistent/m", "--hypermaml", "/nonexistent/h"],
     "/nonexistent/m"),
    (["evaluate.py", "--run", "/nonexistent/run", "--override", "method.hn_width=8"],
     "method.hn_width"),
])
def test_bad_input_is_one_line_naming_the_culprit(argv: list[str], culprit: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / argv[0]), *argv[1:]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0]


def test_hmaml_lists_its_commands_and_refuses_unknown_ones(capsys) -> None:
    from hmaml.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in COMMANDS) and "examples:" in out
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.parametrize("command", ["train", "evaluate", "pretrain", "pack", "sweep", "tables",
                                     "bench", "toy2d"])
def test_every_command_has_help_through_the_console_script(command: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "hmaml.cli", command, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: hmaml {command}")


def test_train_help_lists_the_shipped_configs_and_the_keys(capsys) -> None:
    from hmaml.cli import main
    from hmaml.config import shipped_configs

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "omni_emnist1_hour" in out
    assert "model: encoder, init, init_from" in out and "examples:" in out
    assert main(["train", "--list-configs"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(shipped_configs()) and len(listed) > 30


def test_show_config_prints_a_file_that_loads_as_the_same_config(tmp_path, capsys) -> None:
    from hmaml.cli import main
    from hmaml.config import load_config, to_dict

    assert main(["train", "--show-config", "cub5", "seed=3"]) == 0
    copy = tmp_path / "my.yaml"
    copy.write_text(capsys.readouterr().out)
    assert to_dict(load_config(str(copy))) == to_dict(load_config("cub5", ["seed=3"]))


def test_a_config_name_is_found_from_any_folder(tmp_path) -> None:
    """--config NAME finds the configs shipped inside the package, whatever the working folder."""
    proc = subprocess.run([sys.executable, "-m", "hmaml.cli", "train", "--config", "cub5",
                           "--dry-run", "--processes", "2"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cub5" in proc.stdout and "processes: 2" in proc.stdout


@pytest.mark.slow
def test_accelerate_launch_runs_the_module_entry_point(tmp_path) -> None:
    """`accelerate launch -m hmaml.cli train ...` (Accelerate's module mode) reaches the same
    command as `accelerate launch launch/train.py ...`."""
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "--num_processes", "1", "--cpu", "-m",
                           "hmaml.cli", "train", "--config", "quickstart", "--dry-run"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quickstart" in proc.stdout and "processes: 1" in proc.stdout


def test_dependencies_are_ranges_with_their_tested_versions_pinned_in_constraints() -> None:
    """pyproject: lower bounds only (no ==, no upper bound that blocks a cluster's newer torch);
    constraints.txt: the exact version CI tested of each, at or above that bound."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values()
                                      for d in extra]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {name.lower(): version for name, version in pins.items()}
    for dep in deps:
        name, _, bound = dep.partition(">=")
        assert bound and "<" not in dep and "==" not in dep, dep
        tested = pins[name.lower()]
        as_tuple = lambda v: tuple(int(x) for x in v.split(".")[:3] if x.isdigit())  # noqa: E731
        assert as_tuple(tested) >= as_tuple(bound), (dep, tested)
    assert project["scripts"] == {"hmaml": "hmaml.cli:main"}


def _tiny_train(pack: Path, run_dir: Path, *cli_flags: str, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    from tests.train_fixtures import tiny_overrides

    overrides = [o for o in tiny_overrides(pack, run_dir) if not o.startswith("train.progress")]
    return subprocess.run([sys.executable, "-m", "hmaml.cli", *cli_flags, "train", "--config",
                           "quickstart", *overrides, "train.progress=true"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_a_log_file_gets_epoch_lines_not_bars(tiny_pack, tmp_path) -> None:  # noqa: F811
    """stderr is a pipe here, as in a SLURM log: no tqdm redraws, one line per epoch."""
    proc = _tiny_train(tiny_pack, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]
    assert any(line.startswith("test: ") for line in proc.stdout.splitlines())


@pytest.mark.parametrize(("flags", "env"), [(["-q"], {}), ([], {"HMAML_LOG_LEVEL": "WARNING"})])
def test_quiet_keeps_only_the_result(tiny_pack, tmp_path, flags, env):  # noqa: F811
    proc = _tiny_train(tiny_pack, tmp_path / "run", *flags, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert not any(line.startswith(("epoch ", "hmaml · ")) for line in lines)
    assert any(line.startswith("test: ") for line in lines)
