"""Config: paper hyperparameters in the shipped YAMLs, base inheritance, overrides, refusals that
name the key and file, round trips, fingerprint, and the accelerate configs."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hmaml.config import (
    MethodConfig,
    config_from_yaml,
    configs_dir,
    fingerprint,
    fingerprint_diff,
    flatten,
    load_config,
    to_yaml,
    validate,
)
from hmaml.errors import HmamlError

PAPER = ["cub1", "cub5", "mini1", "mini5", "mini_cub1", "mini_cub5", "omni_emnist1",
         "omni_emnist5"]
ALL = ["quickstart", "omni_emnist1_cpu", *PAPER, *(f"maml_{n}" for n in PAPER),
       *(f"protonet_{n}" for n in PAPER)]


def test_every_experiment_config_is_shipped_and_valid() -> None:
    shipped = {p.stem for p in configs_dir().glob("*.yaml")}
    assert set(ALL) <= shipped
    for name in sorted(shipped):
        cfg = load_config(name)
        assert cfg.name == name and cfg.run_dir == f"runs/{name}"


# (lr, hypernetwork width, epochs, LR milestones, W, S) from paper Tables 9-10.
@pytest.mark.parametrize(("name", "expected"), [
    ("omni_emnist1", (1e-2, 512, 2048, [51, 550], 50, 500)),
    ("omni_emnist5", (1e-2, 512, 2048, [51, 550], 50, 500)),
    ("cub1", (1e-2, 512, 4000, [51, 550], 50, 500)),
    ("cub5", (1e-3, 256, 4000, [101, 1100], 100, 1000)),
    ("mini1", (1e-3, 256, 4000, [101, 1100], 100, 1000)),
    ("mini5", (1e-3, 256, 4000, [101, 1000], 100, 1000)),
    ("mini_cub1", (1e-3, 256, 4000, [101, 1100], 100, 1000)),
    ("mini_cub5", (1e-3, 256, 4000, [101, 1000], 100, 1000)),
])
def test_paper_hyperparameters(name: str, expected: tuple) -> None:
    cfg = load_config(name)
    m, t, d = cfg.method, cfg.train, cfg.data
    assert (t.lr, m.hn_width, t.epochs, t.lr_milestones, m.warmup_start, m.warmup_len) == expected
    assert (m.name, m.hn_depth, m.enhance, m.switch, m.first_order) == (
        "hypermaml", 3, True, True, False)
    assert (d.n_way, d.n_shot, d.n_query, d.test_query) == (5, int(name[-1]), 16, 15)
    assert (t.episodes_per_epoch, t.lr_gamma, cfg.eval.val_episodes, cfg.eval.test_episodes) == (
        100, 0.3, 100, 600)
    omni = name.startswith("omni")
    assert (cfg.model.encoder, cfg.model.init) == ("conv4" if omni else "conv4pool", "authors")
    assert (m.inner_steps, m.inner_lr, t.meta_batch) == ((1, 0.1, 32) if omni else (5, 0.01, 4))
    assert d.augment == (None if omni else "natural")
    packs = {"omni": ("shards/omniglot_nolatin", "shards/emnist"), "cub": ("shards/cub", None),
             "mini_cub": ("shards/mini_imagenet", "shards/cub"),
             "mini": ("shards/mini_imagenet", None)}
    family = next(k for k in packs if name.startswith(k))
    assert (d.train_pack, d.eval_pack) == packs[family]
    # mini-ImageNet -> CUB trains on all 100 mini-ImageNet classes, as the authors' file lists
    assert d.train_split == ("train+val+test" if family == "mini_cub" else "train")


@pytest.mark.parametrize("name", PAPER)
def test_baselines_share_the_data_and_differ_only_in_method(name: str) -> None:
    hyper, maml, proto = (load_config(f"{p}{name}") for p in ("", "maml_", "protonet_"))
    assert maml.data == hyper.data == proto.data and maml.model == hyper.model
    assert (maml.method.name, maml.method.adapt, maml.method.first_order) == ("maml", "all", False)
    assert (maml.method.inner_steps, maml.method.inner_lr) == (
        hyper.method.inner_steps, hyper.method.inner_lr)
    assert (maml.train.lr, maml.train.lr_milestones) == (1e-3, [])
    assert (maml.train.epochs, maml.train.meta_batch) == (hyper.train.epochs,
                                                          hyper.train.meta_batch)
    # ProtoNet: the standard protocol (CloserLook's train.py), one task per step
    assert proto.method.name == "protonet"
    assert (proto.train.lr, proto.train.lr_milestones, proto.train.meta_batch,
            proto.train.epochs) == (1e-3, [], 1, 600 if hyper.data.n_shot == 1 else 400)


def test_mini_imagenet_starts_from_the_pretrained_encoder_of_its_own_architecture() -> None:
    """Paper 4.1 / E.2: mini-ImageNet models start from a backbone pre-trained on the 64
    training classes; each meta-training config loads the encoder its pretrain config writes."""
    pairs = [("mini1", "mini_pretrain"), ("mini5", "mini_pretrain"),
             ("mini_cub1", "mini_pretrain"), ("maml_mini1", "mini_pretrain"),
             ("protonet_mini5", "mini_pretrain"), ("mini1_resnet12", "mini_pretrain_resnet12"),
             ("mini5_resnet12", "mini_pretrain_resnet12")]
    for meta, pre in pairs:
        cfg, pretrain = load_config(meta), load_config(pre)
        assert cfg.model.init_from == f"{pretrain.run_dir}/encoder.pt"
        assert cfg.model.encoder == pretrain.model.encoder
        assert (pretrain.data.train_pack, pretrain.data.train_split) == (
            "shards/mini_imagenet", "train")
        assert pretrain.model.init_from is None and pretrain.data.augment == "natural"
    for scratch in ("cub1", "omni_emnist1", "quickstart"):
        assert load_config(scratch).model.init_from is None
    resnet = load_config("mini1_resnet12")
    assert (resnet.model.encoder, resnet.train.lr, resnet.method.hn_width) == (
        "resnet12", 1e-3, 256)


def test_cpu_budget_config_scales_the_schedule() -> None:
    full, cpu = load_config("omni_emnist1"), load_config("omni_emnist1_cpu")
    scale = cpu.train.epochs / full.train.epochs
    assert cpu.method.warmup_start == round(full.method.warmup_start * scale)
    assert cpu.method.warmup_len == round(full.method.warmup_len * scale)
    # the LR drops keep their place in the schedule: one epoch into the switch, and at its end
    for cfg in (full, cpu):
        w, s = cfg.method.warmup_start, cfg.method.warmup_len
        assert cfg.train.lr_milestones == [w + 1, w + s]
    # the same tasks and model; only how batches are built is tuned for 2 cores
    assert (dataclasses.replace(cpu.data, workers=full.data.workers), cpu.model) == \
        (full.data, full.model)
    assert (cpu.data.workers, cpu.train.meta_batch // cpu.train.grad_accum) == (0, 4)


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def test_base_chain_overrides_and_interpolation(tmp_path: Path) -> None:
    _write(tmp_path, "a", "name: a\ndata:\n  n_way: 7\ntrain:\n  lr_milestones: [3, 5]\n"
                          "  mixed_precision: no\n")
    _write(tmp_path, "b", "base: a\nname: b\nmethod:\n  hn_width: 256\ntrain:\n"
                          "  lr_milestones: [4]\n")
    cfg = load_config(str(tmp_path / "b.yaml"), ["name=c", "train.lr=0.5", "data.augment=natural"])
    assert (cfg.name, cfg.run_dir, cfg.data.n_way, cfg.method.hn_width) == ("c", "runs/c", 7, 256)
    assert cfg.train.lr_milestones == [4]  # lists are replaced, not merged
    assert (cfg.train.lr, cfg.data.augment, cfg.train.mixed_precision) == (0.5, "natural", "no")
    assert cfg.method.hn_depth == MethodConfig().hn_depth  # untouched default
    assert load_config(str(tmp_path / "b")) == load_config(str(tmp_path / "b.yaml"))
    assert load_config("cub5") == load_config("cub5.yaml") == load_config(
        str(configs_dir() / "cub5.yaml"))


def test_round_trips() -> None:
    cfg = load_config("cub5", ["tracking.uri=sqlite:///x.db", "train.max_grad_norm=2.5"])
    assert config_from_yaml(to_yaml(cfg)) == cfg
    # every flattened param is an override that reproduces its value
    assert load_config("quickstart", [f"{k}={v}" for k, v in flatten(cfg).items()]) == cfg
    flat = flatten(cfg)
    assert flat["train.lr_milestones"] == "[101, 1100]" and flat["data.eval_pack"] == "null"
    assert flat["method.enhance"] == "true" and flat["run_dir"] == "runs/cub5"


@pytest.mark.parametrize(("overrides", "culprits"), [
    (["data.n_wya=3"], ["data.n_wya", "valid keys in 'data'", "n_way", "train_pack"]),
    (["nmae=x"], ["nmae", "valid keys at the top level", "tracking"]),
    (["data.n_way=five"], ["data.n_way", "five"]),
    (["train.lr_milestones=[a]"], ["train.lr_milestones"]),
    (["data=3"], ["'data' is a section"]),
    (["method.name=reptile"], ["method.name", "reptile", "hypermaml, maml, protonet"]),
    (["model.encoder=vgg"], ["model.encoder", "conv4, conv4pool, resnet10, resnet12"]),
    (["method.adapt=body"], ["method.adapt", "head, all"]),
    (["train.mixed_precision=fp8"], ["train.mixed_precision", "auto, no, bf16, fp16"]),
    (["data.n_way=1"], ["data.n_way=1", ">= 2"]),
    (["train.meta_batch=0"], ["train.meta_batch=0"]),
    (["method.warmup_start=-1"], ["method.warmup_start=-1"]),
    (["method.warmup_len=-5"], ["method.warmup_len=-5"]),
    (["train.lr_milestones=[550,51]"], ["train.lr_milestones", "increasing"]),
    (["train.grad_accum=0"], ["train.grad_accum=0", ">= 1"]),
    (["data.augment=crop"], ["data.augment", "natural"]),
    (["train.lr"], ["key.sub=value"]),
    (["method.name=maml", "method.adapt=all", "train.compile=true"],
     ["train.compile", "method.adapt=all", "train.compile=false"]),
    (["eval.memory_mb=0"], ["eval.memory_mb"]),
])
def test_bad_overrides_are_refused_naming_the_key(overrides: list[str],
                                                  culprits: list[str]) -> None:
    with pytest.raises(HmamlError) as err:
        load_config("omni_emnist1", overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith("override")
    for culprit in culprits:
        assert culprit in message


def test_bad_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    cases = {
        "unknown": ("method:\n  hn_widht: 3\n", "method.hn_widht"),
        "wrongtype": ("eval:\n  every: sometimes\n", "eval.every"),
        "badvalue": ("base: quickstart\ntrain:\n  epochs: 0\n", "train.epochs=0"),
        "loop": ("base: loop\n", "loops"),
        "nobase": ("base: no_such_config\n", "no_such_config"),
        "notmap": ("- 1\n- 2\n", "mapping"),
    }
    for name, (text, culprit) in cases.items():
        path = _write(tmp_path, name, text)
        with pytest.raises(HmamlError) as err:
            load_config(str(path))
        assert str(path) in str(err.value) and culprit in str(err.value), name
    # a bad value set in a base file is blamed on that file, not on the child
    _write(tmp_path, "parent", "data:\n  n_query: 0\n")
    _write(tmp_path, "child", "base: parent\nname: child\n")
    with pytest.raises(HmamlError, match=r"parent\.yaml: data\.n_query=0"):
        load_config(str(tmp_path / "child.yaml"))
    with pytest.raises(HmamlError, match=r"not found.*cub1"):
        load_config("no_such_config")


def test_validate_checks_configs_built_in_code() -> None:
    cfg = load_config("quickstart")
    assert validate(cfg) is cfg
    with pytest.raises(HmamlError, match=r"train\.epochs=0 must be >= 1"):
        validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=0)))


def test_fingerprint_covers_shape_keys_only() -> None:
    base = load_config("cub1")
    assert fingerprint(base) == fingerprint(load_config("cub1", ["train.lr=0.5", "seed=3"]))
    other = load_config("cub1", ["method.hn_width=256", "data.n_way=10"])
    assert fingerprint(other) != fingerprint(base)
    assert fingerprint_diff(fingerprint(other), fingerprint(base)) == [
        "data.n_way: 5 -> 10", "method.hn_width: 512 -> 256"]


def test_accelerate_configs_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    folder = configs_dir() / "accelerate"
    expected = {"cpu2": ("MULTI_GPU", 2, 1), "gpu1": ("NO", 1, 1), "gpu8_ddp": ("MULTI_GPU", 8, 1),
                "multinode": ("MULTI_GPU", 16, 2), "deepspeed_zero2": ("DEEPSPEED", 8, 1)}
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(expected)
    for name, (kind, processes, machines) in expected.items():
        acc = load_config_from_file(str(folder / f"{name}.yaml"))
        assert (acc.distributed_type.value, acc.num_processes, acc.num_machines) == (
            kind, processes, machines), name
    assert load_config_from_file(str(folder / "cpu2.yaml")).use_cpu is True
    zero = load_config_from_file(str(folder / "deepspeed_zero2.yaml")).deepspeed_config
    assert zero["zero_stage"] == 2


WORLD_SIZE_SCRIPT = """
import torch
from accelerate import Accelerator
acc = Accelerator(cpu=not torch.cuda.is_available())
total = acc.reduce(torch.tensor([acc.process_index + 1.0]), reduction="sum")
print(f"rank {acc.process_index} world {acc.num_processes} sum {int(total.item())}", flush=True)
acc.wait_for_everyone()
acc.end_training()
"""


@pytest.mark.slow
def test_cpu2_launch_gives_two_synchronised_ranks(tmp_path: Path) -> None:
    script = tmp_path / "world.py"
    script.write_text(WORLD_SIZE_SCRIPT)
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(accelerate), "launch", "--config_file",
                          str(configs_dir() / "accelerate" / "cpu2.yaml"),
                          "--main_process_port", "0", str(script)],
                         capture_output=True, text=True, timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    # two ranks share one stdout: their lines may interleave, so match records, not lines
    lines = sorted(re.findall(r"rank \d world \d sum \d", out.stdout))
    assert lines == ["rank 0 world 2 sum 3", "rank 1 world 2 sum 3"]
