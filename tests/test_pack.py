"""Packing: real Omniglot/EMNIST packs, shard layout, determinism, no-op, --force, atomicity,
verification and the command line."""

from __future__ import annotations

import json
import os
import tarfile
import time

import numpy as np
import pytest
import webdataset as wds

from hmaml.data.download import safe_extract
from hmaml.data.format import MANIFEST_NAME, decode_class_record, sha256_file
from hmaml.data.pack import pack_dataset, verify_pack
from hmaml.data.split import load_split
from hmaml.data.store import read_manifest
from hmaml.data.stream import EpisodeStream
from hmaml.errors import HmamlError
from launch.pack import main
from tests.data_fixtures import (
    EMNIST_ZIP,
    OMNIGLOT,
    make_class_tree,
    make_cub_tree,
    need,
)


def read_split(pack_dir, manifest, split):
    """All (label, name, images) records of a split, shard by shard, in stored order."""
    files = [str(pack_dir / s["file"]) for s in manifest["splits"][split]["shards"]]
    return [decode_class_record(s) for s in wds.WebDataset(files, shardshuffle=False)]


@pytest.fixture
def omniglot_small(tmp_path):
    """Lake's original small background sets, named as the two full sets (5,840 real PNGs)."""
    src = tmp_path / "omniglot"
    src.mkdir()
    (src / "images_background.zip").symlink_to(need(OMNIGLOT / "images_background_small1.zip"))
    (src / "images_evaluation.zip").symlink_to(need(OMNIGLOT / "images_background_small2.zip"))
    return src


def test_real_omniglot_pack_end_to_end(tmp_path, omniglot_small):
    out = tmp_path / "shards" / "omni"
    manifest = pack_dataset("omniglot", omniglot_small, out, progress=False, workers=2)
    assert manifest == read_manifest(out).data
    assert read_manifest(out).sha256 == sha256_file(out / MANIFEST_NAME)  # the run tags it
    assert manifest["image"] == {"size": 28, "channels": 1, "stored_size": 28,
                                 "pipeline": "characters"}
    assert {s: len(v["classes"]) for s, v in manifest["splits"].items()} == {
        "train": 136, "test": 156}
    assert [s["path"] for s in manifest["sources"]] == ["images_background.zip",
                                                         "images_evaluation.zip"]
    assert manifest["sources"][0]["sha256"] == sha256_file(
        OMNIGLOT / "images_background_small1.zip")
    records = read_split(out, manifest, "test")
    assert [(label, name) for label, name, _ in records] == [
        (c["label"], c["name"]) for c in manifest["splits"]["test"]["classes"]]
    assert [label for label, _, _ in records] == list(range(156))
    images = np.stack([x for _, _, x in records])
    assert images.shape == (156, 20, 28, 28, 1) and images.dtype == np.uint8
    assert np.median(images) == 255  # dark strokes on white
    verify_pack(out, full=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "test-000000.tar",
                                                      "train-000000.tar"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_unpacked_omniglot_folders_pack_like_the_zips(tmp_path):
    small = need(OMNIGLOT / "images_background_small1.zip")
    zips, dirs = tmp_path / "zips", tmp_path / "dirs"
    zips.mkdir()
    for name in ("images_background", "images_evaluation"):
        (zips / f"{name}.zip").symlink_to(small)
    safe_extract(small, dirs)
    (dirs / "images_background_small1").rename(dirs / "images_background")
    (dirs / "images_evaluation").symlink_to(dirs / "images_background")
    from_zips = pack_dataset("omniglot-nolatin", zips, tmp_path / "a", progress=False)
    from_dirs = pack_dataset("omniglot-nolatin", dirs, tmp_path / "b", progress=False)
    assert len(from_zips["splits"]["train"]["classes"]) == 136 - 26  # all but Latin
    assert from_zips["splits"] == from_dirs["splits"]  # same shards, byte for byte


def test_real_emnist_pack_is_inverted_and_split_by_parity(tmp_path):
    out = tmp_path / "emnist"
    manifest = pack_dataset("emnist", need(EMNIST_ZIP), out, progress=False)
    val, test = manifest["splits"]["val"]["classes"], manifest["splits"]["test"]["classes"]
    assert (len(val), len(test)) == (31, 31)
    assert sum(c["count"] for c in val + test) == 62 * 200
    assert [int(c["name"].split("_")[0]) for c in val] == list(range(0, 62, 2))
    assert [int(c["name"].split("_")[0]) for c in test] == list(range(1, 62, 2))
    _, name, images = read_split(out, manifest, "test")[0]
    assert name == "1_1" and images.shape == (200, 28, 28, 1)
    corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1], 0]
    assert corners.min() >= 200 and images.min() < 50  # white background, dark strokes


def _folder_pack(tmp_path, out, **kw):
    root = tmp_path / "data"
    if not root.exists():
        make_class_tree(root, {f"c{i}": 4 + i for i in range(6)}, size=(20, 20), suffix=".png")
    return pack_dataset("folder", root, out, split_rule="ratio:0.5,0.25,0.25", size=12,
                        channels=3, progress=False, **kw)


def test_same_input_gives_same_bytes_whatever_the_workers(tmp_path):
    one = _folder_pack(tmp_path, tmp_path / "one", workers=1)
    two = _folder_pack(tmp_path, tmp_path / "two", workers=2)
    assert one == two
    for split in one["splits"]:
        for shard in one["splits"][split]["shards"]:
            assert (tmp_path / "one" / shard["file"]).read_bytes() == \
                (tmp_path / "two" / shard["file"]).read_bytes()
    with tarfile.open(tmp_path / "one" / "train-000000.tar") as tf:
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in tf.getmembers()} == {
            (0, 0, 0, "hmaml")}


def test_small_shard_size_splits_classes_across_shards(tmp_path):
    out = tmp_path / "pack"
    manifest = _folder_pack(tmp_path, out, shard_bytes=2000)
    train = manifest["splits"]["train"]
    assert len(train["shards"]) == len(train["classes"]) >= 2  # one class record per shard
    assert sum(s["images"] for s in train["shards"]) == sum(c["count"] for c in train["classes"])
    records = read_split(out, manifest, "train")
    assert [label for label, _, _ in records] == list(range(len(train["classes"])))
    verify_pack(out, full=True)


def test_repack_is_a_noop_and_a_different_pack_needs_force(tmp_path, capsys):
    out = tmp_path / "pack"
    first = _folder_pack(tmp_path, out)
    stamp = (out / MANIFEST_NAME).stat().st_mtime_ns
    assert _folder_pack(tmp_path, out) == first
    assert "nothing to do" in capsys.readouterr().out
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(HmamlError, match="pass --force"):
        _folder_pack(tmp_path, out, shard_bytes=2000)
    assert read_manifest(out).data == first
    forced = _folder_pack(tmp_path, out, shard_bytes=2000, force=True)
    assert forced["fingerprint"] != first["fingerprint"]
    assert read_manifest(out).data == forced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "pack"]


def test_changed_source_changes_the_fingerprint(tmp_path):
    first = _folder_pack(tmp_path, tmp_path / "a")
    make_class_tree(tmp_path / "data", {"c0": 4}, size=(21, 20), suffix=".png")  # new pixels
    assert _folder_pack(tmp_path, tmp_path / "b")["fingerprint"] != first["fingerprint"]


def test_failed_pack_leaves_nothing(tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 3, "b": 3, "c": 3}, size=(20, 20))
    (root / "c" / "002.jpg").write_bytes(b"\xff\xd8 broken jpeg")
    out = tmp_path / "shards" / "bad"
    with pytest.raises(HmamlError, match=r"c/002\.jpg: corrupt"):
        pack_dataset("folder", root, out, split_rule="ratio:1,0,0", progress=False, workers=2)
    assert list((tmp_path / "shards").iterdir()) == []


def test_failed_forced_repack_keeps_the_old_pack(tmp_path):
    out = tmp_path / "pack"
    first = _folder_pack(tmp_path, out)
    (tmp_path / "data" / "c3" / "001.png").write_bytes(b"garbage")
    with pytest.raises(HmamlError, match=r"001\.png"):
        _folder_pack(tmp_path, out, force=True)
    assert verify_pack(out, full=True).data == first


def test_small_class_refused_or_dropped_and_listed(tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 3, "tiny": 1, "b": 3})
    with pytest.raises(HmamlError, match=r"class 'tiny' .* has 1 images"):
        pack_dataset("folder", root, tmp_path / "p", split_rule="ratio:1,0,0", progress=False)
    assert not (tmp_path / "p").exists()
    manifest = pack_dataset("folder", root, tmp_path / "p", split_rule="ratio:1,0,0",
                            drop_small=True, progress=False)
    assert manifest["dropped"] == ["tiny"]
    assert [c["name"] for c in manifest["splits"]["train"]["classes"]] == ["a", "b"]


def test_verify_names_tampered_truncated_and_missing_shards(tmp_path):
    out = tmp_path / "pack"
    _folder_pack(tmp_path, out)
    shard = out / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify_pack(out)  # sizes still match
    with pytest.raises(HmamlError, match=r"val-000000\.tar: shard sha256 .* differs"):
        verify_pack(out, full=True)
    verify_pack(out, "train", full=True)
    shard.write_bytes(bytes(data[:-512]))
    with pytest.raises(HmamlError, match=r"val-000000\.tar: \d+ bytes but the manifest says"):
        verify_pack(out, "val")
    shard.unlink()
    with pytest.raises(HmamlError, match=r"val-000000\.tar: shard listed .* missing"):
        verify_pack(out)
    with pytest.raises(HmamlError, match="no split 'bogus'"):
        verify_pack(out, "bogus")
    with pytest.raises(HmamlError, match="pass --force"):
        _folder_pack(tmp_path, out)  # same fingerprint, but the pack is damaged


def test_cub_from_folder_and_from_tgz_pack_the_same_images(tmp_path):
    tree = make_cub_tree(tmp_path / "raw", n_classes=8, per_class=3)
    archive = tmp_path / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree / "CUB_200_2011", arcname="CUB_200_2011")
    from_dir = pack_dataset("cub", tree, tmp_path / "a", progress=False)
    from_tgz = pack_dataset("cub", archive, tmp_path / "b", progress=False)
    assert {s: len(v["classes"]) for s, v in from_dir["splits"].items()} == {
        "train": 4, "val": 2, "test": 2}
    assert from_tgz["sources"][0]["path"] == "CUB_200_2011.tgz"
    for split, info in from_dir["splits"].items():
        assert [s["sha256"] for s in info["shards"]] == \
            [s["sha256"] for s in from_tgz["splits"][split]["shards"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CUB_200_2011.tgz", "a", "b", "raw"]


def test_command_line_pack_verify_and_errors(tmp_path, capsys):
    root = make_class_tree(tmp_path / "data", {"a": 2, "b": 2, "c": 2}, size=(10, 10))
    out = tmp_path / "pack"
    args = ["folder", "--src", str(root), "--out", str(out), "--split-rule", "ratio:0.34,0,0.66",
            "--size", "8", "--channels", "1", "--quiet", "--workers", "1"]
    assert main(args) == 0
    assert "train: 1 classes, 2 images" in capsys.readouterr().out
    assert read_manifest(out).image.as_dict() == {"size": 8, "channels": 1, "stored_size": 8,
                                                  "pipeline": "characters"}
    assert main(["verify", str(out), "--full"]) == 0
    assert main(["folder", "--src", str(tmp_path / "none"), "--out", str(out),
                 "--split-rule", "ratio:1,0,0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none" in err and err.count("\n") == 1
    assert main(["verify", str(tmp_path)]) == 2


def test_manifest_is_valid_json_with_schema_keys(tmp_path):
    out = tmp_path / "pack"
    _folder_pack(tmp_path, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert set(manifest) == {"pack_version", "dataset", "image", "splits", "sources", "options",
                             "fingerprint"}
    shard = manifest["splits"]["train"]["shards"][0]
    assert set(shard) == {"file", "sha256", "classes", "images", "bytes"}
    assert shard["bytes"] == os.path.getsize(out / shard["file"])


@pytest.mark.slow
def test_full_real_omniglot_without_latin_pack_time(tmp_path):
    start = time.perf_counter()
    manifest = pack_dataset("omniglot-nolatin", need(OMNIGLOT / "images_background.zip").parent,
                            tmp_path / "onl", progress=False, workers=2)
    seconds = time.perf_counter() - start
    train = manifest["splits"]["train"]
    assert len(train["classes"]) == 1597 and sum(s["images"] for s in train["shards"]) == 31940
    assert seconds < 60, f"packing took {seconds:.1f} s"


def test_natural_packs_store_images_above_the_input_size(tmp_path):
    """CUB is stored at 126 px for an 84 px input by default (--store-size to change), so the
    natural pipeline crops real pixels; a store size below the input size is refused."""
    tree = make_cub_tree(tmp_path / "raw", n_classes=4, per_class=2)
    manifest = pack_dataset("cub", tree, tmp_path / "a", progress=False, workers=1)
    assert manifest["image"] == {"size": 84, "channels": 3, "stored_size": 126,
                                 "pipeline": "natural"}
    _, classes = load_split(tmp_path / "a", "train")
    assert classes[0].shape == (2, 126, 126, 3)
    assert main(["cub", "--src", str(tree), "--out", str(tmp_path / "b"), "--store-size", "100",
                 "--quiet", "--workers", "1"]) == 0
    assert read_manifest(tmp_path / "b").image.stored_size == 100
    with pytest.raises(HmamlError, match="store_size=64 is below the input size 84"):
        pack_dataset("cub", tree, tmp_path / "c", progress=False, store_size=64)


def test_a_pack_of_an_older_format_asks_for_a_re_pack(tmp_path):
    out = pack_dataset("glyphs", None, tmp_path / "g", classes=(6, 3, 3), per_class=4,
                       progress=False, workers=1)
    path = tmp_path / "g" / "manifest.json"
    path.write_text(json.dumps({**out, "pack_version": 1}))
    with pytest.raises(HmamlError, match=r"manifest\.json: pack_version 1 is not the supported 2;"
                                         r" re-pack the dataset .*--force"):
        read_manifest(tmp_path / "g")
    with pytest.raises(HmamlError, match="re-pack"):
        EpisodeStream(tmp_path / "g", "train", n_way=2, n_shot=1, n_query=1, tasks_per_batch=1,
                      episodes=1, seed=0)
