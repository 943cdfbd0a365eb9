"""Checkpoints: exact resume of model/optimizer/scheduler/RNG, atomic writes, refusals."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hmaml.config import config_from_yaml, fingerprint, load_config, to_yaml
from hmaml.errors import HmamlError
from hmaml.train import checkpoint as ck
from hmaml.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint


def _trainer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.3)
    return model, opt, sched


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
    x = torch.rand(5, 1, 8, 8)
    loss = model(x).logsumexp(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
           cfg_name: str = "quickstart", overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    cfg = load_config(cfg_name, list(overrides))
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": capture_rng(),
            "stream": {"epoch": 3, "step": 12}, "epoch": 3, "best_val_acc": 0.625,
            "best_epoch": 2, "config_yaml": to_yaml(cfg), "fingerprint": fingerprint(cfg)}


def test_resume_continues_exactly(tmp_path: Path) -> None:
    model, opt, sched = _trainer(0)
    for _ in range(3):
        _step(model, opt, sched)
    path = save_checkpoint(tmp_path / "ckpt" / "last.pt", _state(model, opt, sched))
    expected_fp = fingerprint(load_config("quickstart"))

    state = load_checkpoint(path, expected_fp)
    model2, opt2, sched2 = _trainer(1)  # different initial weights, fresh optimizer state
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    assert (state["stream"], state["epoch"], state["best_val_acc"], state["best_epoch"]) == (
        {"epoch": 3, "step": 12}, 3, 0.625, 2)
    assert state["hmaml_version"] == ck.hmaml_version() and state["format"] == ck.FORMAT
    assert config_from_yaml(state["config_yaml"]) == load_config("quickstart")

    # the original continues from the same RNG state: both runs must agree bit for bit
    restore_rng(state["rng"])
    for _ in range(3):
        _step(model, opt, sched)
    restore_rng(state["rng"])
    for _ in range(3):
        _step(model2, opt2, sched2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert sched.get_last_lr() == sched2.get_last_lr() == [pytest.approx(1e-2 * 0.3 ** 2)]
    assert opt.state_dict()["state"][0]["step"] == opt2.state_dict()["state"][0]["step"] == 6


def test_rng_restore_reproduces_python_numpy_torch() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's legacy state
    state = capture_rng()

    def draw() -> tuple:
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
                np.random.normal(), torch.rand(3).tolist(), torch.randint(0, 99, (2,)).tolist())

    first = draw()
    draw()
    restore_rng(state)
    assert draw() == first


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, opt, sched = _trainer(0)
    path = save_checkpoint(tmp_path / "last.pt", _state(model, opt, sched))
    before = path.read_bytes()
    _step(model, opt, sched)

    real_save = torch.save

    def crash_midway(obj: Any, f: Any) -> None:
        real_save(obj, f)
        f.truncate(len(before) // 2)  # half the bytes are on disk when the "crash" happens
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(model, opt, sched))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind
    assert load_checkpoint(path, None)["epoch"] == 3


def test_refusals(tmp_path: Path) -> None:
    model, opt, sched = _trainer(0)
    path = save_checkpoint(tmp_path / "a.pt", _state(model, opt, sched, "cub1"))
    with pytest.raises(HmamlError, match=r"incompatible config.*method\.hn_width: 512 -> 256"):
        load_checkpoint(path, fingerprint(load_config("cub5")))
    # keys that do not change shapes may change on resume
    assert load_checkpoint(path, fingerprint(load_config("cub1", ["train.lr=0.5"])))["epoch"] == 3

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(HmamlError, match=r"truncated\.pt is corrupt or truncated"):
        load_checkpoint(truncated, None)
    with pytest.raises(HmamlError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt", None)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(HmamlError, match="not an hmaml checkpoint"):
        load_checkpoint(foreign, None)

    # nothing that weights_only loading would refuse is ever written
    bad = {**_state(model, opt, sched), "stream": {"epoch": np.int64(3)}}
    with pytest.raises(TypeError, match=r"state\['stream'\]\['epoch'\]: int64"):
        save_checkpoint(tmp_path / "bad.pt", bad)
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(ValueError, match="lacks rng"):
        save_checkpoint(tmp_path / "bad.pt", {k: v for k, v in bad.items() if k != "rng"})


def test_file_loads_with_weights_only_and_no_custom_globals(tmp_path: Path) -> None:
    model, opt, sched = _trainer(0)
    _step(model, opt, sched)
    path = save_checkpoint(tmp_path / "last.pt", _state(model, opt, sched))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)
    assert set(ck.REQUIRED_KEYS) <= set(state)
