"""Damaged bytes are caught where they are read: every class record carries a CRC32 of its
images, so one flipped byte in the middle of a local shard (same size, so the size check passes)
fails the read naming the shard, the class and the pack; packs made before the checksum load."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hmaml.data.format as pack_format
from hmaml.data.pack import pack_dataset
from hmaml.data.split import load_split
from hmaml.errors import HmamlError
from tests.train_fixtures import run, tiny_pack, train_command  # noqa: F401


def flip_an_image_byte(shard: Path) -> str:
    """Flip one byte in the middle of the images of the shard's middle record; returns that
    class's name."""
    with tarfile.open(shard) as tar:
        images = [m for m in tar.getmembers() if m.name.endswith(".images.npy")]
        member = images[len(images) // 2]
        meta = tar.extractfile(member.name.replace(".images.npy", ".cls.json"))
        assert meta is not None
        name = json.loads(meta.read())["name"]
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF  # past the .npy header: pixel bytes
    shard.write_bytes(bytes(data))
    return str(name)


@pytest.fixture
def damaged_pack(tiny_pack: Path, tmp_path: Path) -> tuple[Path, Path, str]:  # noqa: F811
    pack = shutil.copytree(tiny_pack, tmp_path / "glyphs")
    shard = pack / "train-000000.tar"
    return pack, shard, flip_an_image_byte(shard)


def test_a_flipped_byte_fails_the_read_naming_shard_class_and_pack(
        damaged_pack: tuple[Path, Path, str]) -> None:
    pack, shard, name = damaged_pack
    with pytest.raises(HmamlError) as caught:
        load_split(pack, "train")
    message = str(caught.value)
    assert message.startswith(f"{shard}: the images of class {name!r}"), message
    assert f"fail their checksum: this shard of the pack {pack} is damaged" in message


def test_training_on_a_damaged_local_shard_stops_with_its_name(
        damaged_pack: tuple[Path, Path, str], tmp_path: Path) -> None:
    pack, shard, name = damaged_pack
    proc = run(train_command(pack, tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(rf"error: {re.escape(str(shard))}: the images of class {re.escape(repr(name))}"
                    r" \(record '\d+'\) fail their checksum", last), last


def test_a_pack_without_record_checksums_loads_with_one_note(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """What a pack of an earlier hmaml holds: records without ``crc32``."""
    encode = pack_format.encode_class_record

    def without_checksum(label: int, name: str, images: np.ndarray) -> dict[str, Any]:
        record = encode(label, name, images)
        meta = json.loads(record["cls.json"])
        del meta["crc32"]
        return {**record, "cls.json": json.dumps(meta).encode()}

    monkeypatch.setattr("hmaml.data.pack.encode_class_record", without_checksum)
    pack_dataset("glyphs", None, tmp_path / "old", classes=(6, 5, 5), per_class=4,
                 progress=False)
    capsys.readouterr()
    _, classes = load_split(tmp_path / "old", "train")
    assert len(classes) == 6
    assert capsys.readouterr().out.count("packed without record checksums") == 1
    load_split(tmp_path / "old", "train")
    assert "record checksums" not in capsys.readouterr().out  # once per process
