"""Dataset readers: class lists and splits of the real sets, image conversion, input errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hmaml.commands.pack import main as pack_main
from hmaml.data.format import ImageSpec
from hmaml.data.sources import (
    ImageLoader,
    ImageRef,
    open_source,
    read_ravi_csv,
    split_by_ratio,
)
from hmaml.data.store import read_manifest
from hmaml.errors import HmamlError
from tests.data_fixtures import (
    EMNIST_ZIP,
    OMNIGLOT,
    RAVI,
    make_class_tree,
    make_cub_tree,
    need,
    write_image,
)


def _counts(source):
    return {split: len(classes) for split, classes in source.splits.items()}


# ----------------------------------------------------------------------------- Omniglot (real)

def test_omniglot_background_evaluation_counts():
    source = open_source("omniglot", need(OMNIGLOT / "images_background.zip").parent)
    assert _counts(source) == {"train": 964, "test": 659}
    assert all(len(c.refs) == 20 for cl in source.splits.values() for c in cl)
    assert source.splits["train"][0].name == "Alphabet_of_the_Magi/character01"
    assert source.image == ImageSpec(28, 1, 28, "characters")


def test_omniglot_rotations_make_four_classes_per_character():
    source = open_source("omniglot", need(OMNIGLOT / "images_background.zip").parent,
                         rotations=True)
    assert _counts(source) == {"train": 4 * 964, "test": 4 * 659}
    names = [c.name for c in source.splits["train"][:4]]
    assert names == [f"Alphabet_of_the_Magi/character01/rot{r:03d}" for r in (0, 90, 180, 270)]
    first, quarter = (source.loader(c.refs[:1])[0, ..., 0] for c in source.splits["train"][:2])
    assert np.array_equal(quarter, np.rot90(first))


def test_omniglot_vinyals_split_follows_the_files():
    split_dir = need(OMNIGLOT / "splits" / "vinyals")
    source = open_source("omniglot", OMNIGLOT, split="vinyals", split_dir=str(split_dir))
    assert _counts(source) == {"train": 4 * 1028, "val": 4 * 172, "test": 4 * 423}
    first_line = (split_dir / "train.txt").read_text().splitlines()[0]
    assert source.splits["train"][0].name == first_line
    assert len({c.name for cl in source.splits.values() for c in cl}) == 4 * 1623


def test_omniglot_without_latin_is_the_1597_class_base_set():
    source = open_source("omniglot-nolatin", need(OMNIGLOT / "images_background.zip").parent)
    assert _counts(source) == {"train": 1597}
    names = [c.name for c in source.splits["train"]]
    assert not any(n.startswith("Latin/") for n in names)
    assert len(set(names)) == 1597 and all("rot" not in n for n in names)


def test_omniglot_images_are_dark_strokes_on_white():
    source = open_source("omniglot", need(OMNIGLOT / "images_background.zip").parent)
    images = source.loader(source.splits["train"][0].refs[:5])
    assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8
    assert np.median(images) == 255 and images.min() < 80


def test_omniglot_missing_set_names_the_path(tmp_path):
    with pytest.raises(HmamlError, match=r"images_background\.zip"):
        open_source("omniglot", tmp_path)


def test_vinyals_line_for_an_unknown_character_is_named(tmp_path):
    need(OMNIGLOT / "images_background.zip")
    for name in ("train", "val", "test"):
        (tmp_path / f"{name}.txt").write_text("Latin/character01/rot000\n")
    (tmp_path / "val.txt").write_text("Nowhere/character01/rot000\n")
    with pytest.raises(HmamlError, match=r"val\.txt:1: character 'Nowhere/character01'"):
        open_source("omniglot", OMNIGLOT, split="vinyals", split_dir=str(tmp_path))


# ----------------------------------------------------------------------------- EMNIST (real)

def test_emnist_even_val_odd_test_and_inverted():
    source = open_source("emnist", need(EMNIST_ZIP))
    assert _counts(source) == {"val": 31, "test": 31}
    assert [c.name for c in source.splits["val"][:3]] == ["0_0", "2_2", "4_4"]
    assert [c.name for c in source.splits["test"][-2:]] == ["59_x", "61_z"]
    refs = source.splits["test"][5].refs[:20]
    assert Path(refs[10].member).name == "10.png"  # numeric, not text, order
    inverted = source.loader(refs)
    raw = ImageLoader(28, 1)(refs)
    assert np.array_equal(inverted, 255 - raw)
    assert np.median(inverted) >= 250 and np.median(raw) <= 5


# ----------------------------------------------------------------------------- mini-ImageNet

def test_real_ravi_csvs_have_64_16_20_classes_of_600():
    sizes = {s: read_ravi_csv(need(RAVI / f"{s}.csv")) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in sizes.items()} == {"train": 64, "val": 16, "test": 20}
    assert all(len(files) == 600 for v in sizes.values() for _, files in v)
    assert sizes["train"][0][0] == "n01532829"
    first_row = (RAVI / "train.csv").read_text().splitlines()[1]
    assert first_row == f"{sizes['train'][0][1][0]},n01532829"


def _mini_subset(tmp_path: Path, images_sub: str) -> Path:
    """Real csv rows (2 classes x 3 images per split) + tiny synthetic JPEGs."""
    csv_dir = tmp_path / "splits"
    csv_dir.mkdir()
    image_dir = tmp_path / "mini" / images_sub if images_sub else tmp_path / "mini"
    for split in ("train", "val", "test"):
        rows = [(f, label) for label, files in read_ravi_csv(need(RAVI / f"{split}.csv"))[:2]
                for f in files[:3]]
        (csv_dir / f"{split}.csv").write_text(
            "filename,label\n" + "".join(f"{f},{label}\n" for f, label in rows))
        for i, (f, _) in enumerate(rows):
            write_image(image_dir / f, (60, 50), seed=i)
    return csv_dir


@pytest.mark.parametrize("images_sub", ["", "images"])
def test_mini_imagenet_flat_or_images_subfolder(tmp_path, images_sub):
    csv_dir = _mini_subset(tmp_path, images_sub)
    source = open_source("mini-imagenet", tmp_path / "mini", split_dir=str(csv_dir))
    assert _counts(source) == {"train": 2, "val": 2, "test": 2}
    assert source.splits["train"][0].name == "n01532829"
    images = source.loader(source.splits["val"][1].refs)
    assert images.shape == (3, 126, 126, 3)  # stored at 1.5 x the 84 px input


def test_mini_imagenet_missing_image_is_named(tmp_path):
    csv_dir = _mini_subset(tmp_path, "")
    victim = tmp_path / "mini" / read_ravi_csv(csv_dir / "test.csv")[1][1][2]
    victim.unlink()
    with pytest.raises(HmamlError, match=victim.name):
        open_source("mini-imagenet", tmp_path / "mini", split_dir=str(csv_dir))


# ----------------------------------------------------------------------------- CUB (synthetic)

def test_cub_split_rule_on_sorted_folders(tmp_path):
    source = open_source("cub", make_cub_tree(tmp_path, n_classes=8))
    assert {s: [c.name[:3] for c in cl] for s, cl in source.splits.items()} == {
        "train": ["001", "003", "005", "007"], "val": ["002", "006"], "test": ["004", "008"]}
    images = source.loader(source.splits["test"][0].refs)
    assert images.shape == (3, 126, 126, 3) and images.dtype == np.uint8


# ----------------------------------------------------------------------------- folder of classes

def test_folder_split_file_keeps_file_order(tmp_path):
    root = make_class_tree(tmp_path / "data", {"cat": 2, "dog": 3, "emu": 2})
    split_file = tmp_path / "split.txt"
    split_file.write_text("# comment\ntrain\tdog\ntrain,cat\n\ntest\temu\n")
    source = open_source("folder", root, split_file=str(split_file), size=16, channels=1)
    assert {s: [c.name for c in cl] for s, cl in source.splits.items()} == {
        "train": ["dog", "cat"], "test": ["emu"]}
    assert source.loader(source.splits["train"][0].refs).shape == (3, 16, 16, 1)


def test_split_by_ratio_is_seeded_and_complete():
    names = [f"c{i:02d}" for i in range(20)]
    first = split_by_ratio(names, "ratio:0.6,0.2,0.2", seed=3)
    assert {s: len(v) for s, v in first.items()} == {"train": 12, "val": 4, "test": 4}
    assert sorted(n for v in first.values() for n in v) == names
    assert split_by_ratio(list(reversed(names)), "ratio:0.6,0.2,0.2", seed=3) == first
    assert split_by_ratio(names, "ratio:0.6,0.2,0.2", seed=4) != first
    with pytest.raises(HmamlError, match=r"ratio:0\.5,0\.2,0\.2"):
        split_by_ratio(names, "ratio:0.5,0.2,0.2", seed=0)


@pytest.mark.parametrize(("text", "match"), [
    ("train\tcat\nbogus\tdog\n", r"split\.txt:2: unknown split 'bogus'"),
    ("train\tcat\ntest\tcat\n", r"split\.txt:2: class 'cat' is listed twice"),
    ("train\tcat\ntest\tyak\n", r"class 'yak' has no image folder"),
    ("just-a-name\n", r"split\.txt:1: expected"),
])
def test_bad_split_file_is_named(tmp_path, text, match):
    root = make_class_tree(tmp_path / "data", {"cat": 2, "dog": 2})
    (tmp_path / "split.txt").write_text(text)
    with pytest.raises(HmamlError, match=match):
        open_source("folder", root, split_file=str(tmp_path / "split.txt"))


def test_small_class_refused_by_default_or_dropped(tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 3, "b": 1, "c": 3, "d": 3})
    with pytest.raises(HmamlError, match=r"class 'b' \(\w+\) has 1 images.*--drop-small"):
        open_source("folder", root, split_rule="ratio:0.5,0,0.5")
    source = open_source("folder", root, split_rule="ratio:0.5,0,0.5", drop_small=True)
    assert source.dropped == ["b"]
    assert sorted(c.name for cl in source.splits.values() for c in cl) == ["a", "c", "d"]
    with pytest.raises(HmamlError, match="has 3 images, fewer than min_images=4"):
        open_source("folder", root, split_rule="ratio:0.5,0,0.5", min_images=4,
                    drop_small=False)


def test_corrupt_file_and_zip_member_are_named(tmp_path):
    root = make_class_tree(tmp_path / "data", {"a": 2})
    bad = root / "a" / "001.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(HmamlError, match=r"001\.jpg: corrupt or unreadable image"):
        ImageLoader(28, 1)([ImageRef("", str(root / "a" / "000.jpg")), ImageRef("", str(bad))])
    archive = tmp_path / "x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/a/broken.png", b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(HmamlError, match=r"x\.zip \(member top/a/broken\.png\): corrupt"):
        ImageLoader(28, 1)([ImageRef(str(archive), "top/a/broken.png")])


def test_grey_png_converted_to_rgb_and_resized(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.full((10, 30), 77, np.uint8)).save(path)
    image = ImageLoader(84, 3)([ImageRef("", str(path))])
    assert image.shape == (1, 84, 84, 3) and (image == 77).all()


@pytest.mark.parametrize(("dataset", "src", "options", "match"), [
    ("imagenet-1k", "x", {}, "unknown dataset 'imagenet-1k'"),
    ("emnist", None, {}, "needs --src"),
    ("glyphs", "x", {}, "takes no --src"),
    ("emnist", "x", {"rotations": True}, "option 'rotations' does not apply"),
    ("cub", "/nonexistent/cub", {}, "/nonexistent/cub: CUB source not found"),
    ("omniglot", "x", {"split": "vinyals", "rotations": True}, "--rotations applies"),
    ("omniglot", "x", {"split": "random"}, "x: Omniglot folder not found"),
    ("folder", "/nonexistent/d", {"split_rule": "ratio:1,0,0"}, "/nonexistent/d"),
])
def test_bad_request_is_named(dataset, src, options, match):
    with pytest.raises(HmamlError, match=match):
        open_source(dataset, src, **options)


def test_pack_mini_imagenet_reads_the_split_lists_from_split_dir(tmp_path):
    """`hmaml pack mini-imagenet --split-dir` (docs/data.md's command: csvs downloaded apart from
    the images)."""
    csv_dir = _mini_subset(tmp_path, "images")
    out = tmp_path / "pack"
    assert pack_main(["mini-imagenet", "--src", str(tmp_path / "mini"), "--split-dir",
                      str(csv_dir), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    manifest = read_manifest(out)
    assert {s: len(m.classes) for s, m in manifest.splits.items()} == {
        "train": 2, "val": 2, "test": 2}
    assert manifest.splits["train"].classes[0].name == "n01532829"
