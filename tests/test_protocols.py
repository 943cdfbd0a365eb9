"""The paper's protocols: mini-ImageNet -> CUB on all 100 mini classes, pre-training and
``model.init_from``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hmaml.config import load_config
from hmaml.data.pack import pack_dataset
from hmaml.data.sources import read_ravi_csv
from hmaml.data.stream import EpisodeStream
from hmaml.errors import HmamlError
from hmaml.models import build_encoder, save_encoder
from hmaml.precision import Precision
from hmaml.train.build import build_model, open_packs
from hmaml.train.loop import train
from hmaml.train.rundir import Status
from launch.pretrain import main as pretrain_main
from tests.data_fixtures import RAVI, make_cub_tree, need, write_image
from tests.train_fixtures import tiny_config


def _mini_stand_in(root: Path, per_class: int = 2) -> Path:
    """The real Ravi csvs cut to ``per_class`` rows per class, with tiny synthetic JPEGs."""
    for split in ("train", "val", "test"):
        rows = [(f, label) for label, files in read_ravi_csv(need(RAVI / f"{split}.csv"))
                for f in files[:per_class]]
        (root / f"{split}.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.csv").write_text(
            "filename,label\n" + "".join(f"{f},{label}\n" for f, label in rows))
        for i, (f, _) in enumerate(rows):
            write_image(root / "images" / f, (12, 10), seed=i)
    return root


def test_mini_to_cub_trains_on_all_100_mini_imagenet_classes(tmp_path):
    mini = pack_dataset("mini-imagenet", _mini_stand_in(tmp_path / "raw"), tmp_path / "mini",
                        progress=False, workers=1, store_size=84)
    pack_dataset("cub", make_cub_tree(tmp_path / "cub_raw", n_classes=8, per_class=2),
                 tmp_path / "cub", progress=False, workers=1, store_size=84)
    cfg = load_config("mini_cub1", [f"data.train_pack={tmp_path / 'mini'}",
                                    f"data.eval_pack={tmp_path / 'cub'}", "data.n_query=1"])
    assert cfg.data.train_split == "train+val+test"
    open_packs(cfg)  # every part of the union exists
    stream = EpisodeStream(cfg.data.train_pack, cfg.data.train_split, n_way=5, n_shot=1,
                           n_query=1, tasks_per_batch=50, episodes=400, seed=0)
    every_class = [name for split in ("train", "val", "test")
                   for name in (c["name"] for c in mini["splits"][split]["classes"])]
    assert len(stream.info.names) == 100 and stream.info.names == every_class
    assert len(mini["splits"]["train"]["classes"]) == 64
    stream.preload()  # every class of the union is drawn from (uniformly, as resident classes)
    assert [len(c) for c in stream._resident] == [2] * 100
    batches = list(stream.batches(0, 1))
    assert sum(b.num_tasks for b in batches) == 400
    mini5 = load_config("mini1")
    assert mini5.data.train_split == "train"  # mini-ImageNet alone keeps the 64 base classes


def _glyphs(tmp_path: Path) -> Path:
    pack_dataset("glyphs", None, tmp_path / "glyphs", classes=(12, 6, 6), per_class=12,
                 progress=False, workers=1)
    return tmp_path / "glyphs"


def test_pretrain_writes_an_encoder_that_init_from_loads_exactly(tmp_path):
    """launch/pretrain.py trains encoder + linear layer on the glyph pack's training classes and
    writes encoder.pt; a meta-training config with model.init_from starts from exactly those
    weights (and from other weights without it)."""
    glyphs = _glyphs(tmp_path)
    common = [f"data.train_pack={glyphs}", "data.augment=null", "model.encoder=conv4",
              "data.workers=0", "tracking.enabled=false", "train.mixed_precision=no",
              "train.progress=false", "eval.val_episodes=8", "data.n_query=4"]
    assert pretrain_main(["--config", "mini_pretrain", *common, "train.epochs=3",
                          "train.lr_milestones=[]", "pretrain.batch_size=24", "eval.every=1",
                          f"run_dir={tmp_path / 'pre'}"]) == 0
    encoder_file = tmp_path / "pre" / "encoder.pt"
    history = [json.loads(line) for line in (tmp_path / "pre" / "history.jsonl").open()]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all("val_acc" in row for row in history)
    saved = torch.load(encoder_file, weights_only=True)
    assert saved["encoder"] == "conv4" and saved["info"]["classes"] == 12
    assert saved["info"]["val_acc"] == max(row["val_acc"] for row in history)

    cfg = load_config("quickstart", [f"data.train_pack={glyphs}",
                                     f"model.init_from={encoder_file}"])
    packs = open_packs(cfg)
    method = build_model(cfg, packs.image, Precision("no", "test"), torch.device("cpu"))
    loaded = method.encoder.state_dict()
    assert set(loaded) == set(saved["state_dict"])
    for key, value in saved["state_dict"].items():
        assert torch.equal(loaded[key], value), key
    fresh = build_model(load_config("quickstart", [f"data.train_pack={glyphs}"]), packs.image,
                        Precision("no", "test"), torch.device("cpu"))
    assert not torch.equal(fresh.encoder.state_dict()["blocks.0.conv.weight"],
                           saved["state_dict"]["blocks.0.conv.weight"])
    # and meta-training runs from it to the end
    result = train(tiny_config(glyphs, tmp_path / "meta", **{"model.init_from": encoder_file,
                                                              "data.n_query": 4,
                                                              "data.test_query": 4}))
    assert result.status == Status.FINISHED and result.test["test_acc"] > 0


def test_init_from_refuses_another_encoder_input_or_a_missing_file(tmp_path):
    glyphs = _glyphs(tmp_path)
    path = tmp_path / "enc.pt"
    save_encoder(path, build_encoder("conv4", 1, 28), "conv4", 1, 28)
    packs = open_packs(load_config("quickstart", [f"data.train_pack={glyphs}"]))

    def build(*overrides: str) -> None:
        cfg = load_config("quickstart", [f"data.train_pack={glyphs}", *overrides])
        build_model(cfg, packs.image, Precision("no", "test"), torch.device("cpu"))

    build(f"model.init_from={path}")
    with pytest.raises(HmamlError, match=r"holds a 'conv4' encoder, the config builds "
                                         r"model.encoder='resnet12'"):
        build(f"model.init_from={path}", "model.encoder=resnet12")
    save_encoder(path, build_encoder("conv4", 3, 28), "conv4", 3, 28)
    with pytest.raises(HmamlError, match="trained on 3-channel 28 px images, the config's pack "
                                         "has 1-channel 28 px"):
        build(f"model.init_from={path}")
    state = build_encoder("conv4", 1, 28).state_dict()
    state["blocks.0.conv.weight"] = torch.zeros(32, 1, 3, 3)
    torch.save({"format": "hmaml-encoder-1", "encoder": "conv4", "in_channels": 1,
                "image_size": 28, "state_dict": state, "info": {}}, path)
    with pytest.raises(HmamlError, match=r"shapes differ .*blocks\.0\.conv\.weight "
                                         r"\(32, 1, 3, 3\) vs \(64, 1, 3, 3\)"):
        build(f"model.init_from={path}")
    with pytest.raises(HmamlError, match=r"model.init_from=.*nope.pt: no such file; make it "
                                         r"with launch/pretrain.py"):
        build(f"model.init_from={tmp_path / 'nope.pt'}")
    assert pretrain_main(["--config", "mini_pretrain", "pretrain.batch_size=1"]) == 2
