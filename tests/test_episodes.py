"""The episodic stream and the fixed evaluation episodes, on tiny coded packs."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from hmaml.data.eval_lists import eval_episodes, eval_loader
from hmaml.data.split import ShardInfo, read_shard, sample_images, split_info
from hmaml.data.store import read_manifest
from hmaml.data.stream import MB, EpisodeStream, StreamBuffer, stream_classes, train_loader
from hmaml.errors import HmamlError
from hmaml.tasks import TaskBatch
from tests.stream_fixtures import decode_ids, write_pack

SIZE = 8
CLASS_BYTES_20 = 20 * SIZE * SIZE  # one class of 20 one-channel images


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 training classes of 10..21 images over 3 shards, 6 validation classes of 20."""
    return write_pack(tmp_path_factory.mktemp("pack"),
                      {"train": [10 + i for i in range(12)], "val": [20] * 6}, size=SIZE)


def stream(pack: Path, **kw) -> EpisodeStream:
    args = dict(n_way=5, n_shot=2, n_query=3, tasks_per_batch=4, episodes=10, seed=0)
    args.update(kw)
    return EpisodeStream(pack, "train", **args)


def concat(batches) -> TaskBatch:
    return TaskBatch.stack(list(batches))


def same(a: TaskBatch, b: TaskBatch) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.support_x, b.support_x), (a.query_x, b.query_x),
                                              (a.support_y, b.support_y), (a.query_y, b.query_y)))


def check_tasks(batch: TaskBatch, counts: list[int], n_shot: int) -> torch.Tensor:
    """Assert the task layout; return the split label of each task's classes ``[T, N]``."""
    batch.validate()
    t, n = batch.num_tasks, batch.n_way
    q = batch.query_x.shape[1] // n
    assert torch.equal(batch.support_y, torch.arange(n).repeat_interleave(n_shot).expand(t, -1))
    assert torch.equal(batch.query_y, torch.arange(n).repeat_interleave(q).expand(t, -1))
    sl, si = decode_ids(batch.support_x)
    ql, qi = decode_ids(batch.query_x)
    labels = torch.cat([sl.view(t, n, n_shot), ql.view(t, n, q)], 2)
    index = torch.cat([si.view(t, n, n_shot), qi.view(t, n, q)], 2)
    assert (labels == labels[:, :, :1]).all(), "a label mixes images of two classes"
    classes = labels[:, :, 0]
    for task in range(t):
        assert len(set(classes[task].tolist())) == n, "classes repeat within a task"
        for i in range(n):
            idx = index[task, i].tolist()
            assert len(set(idx)) == len(idx), "an image repeats within a task"
            assert max(idx) < counts[int(classes[task, i])]
    return classes


def test_layout_and_no_replacement(pack: Path) -> None:
    counts = [10 + i for i in range(12)]
    batches = list(stream(pack, n_shot=3, n_query=7, episodes=40, tasks_per_batch=8).batches(0, 1))
    assert [b.num_tasks for b in batches] == [8] * 5
    for b in batches:
        check_tasks(b, counts, 3)
        assert b.support_x.dtype == torch.float32 and b.support_x.shape[1:] == (15, 1, SIZE, SIZE)


def test_classes_drawn_uniformly(pack: Path) -> None:
    s = stream(pack, n_shot=1, n_query=1, episodes=2400, tasks_per_batch=600)
    assert s.fits
    classes = torch.cat([check_tasks(b, [10 + i for i in range(12)], 1)
                         for b in s.batches(0, 1)])
    draws = torch.bincount(classes.flatten(), minlength=12).double()
    expected = classes.numel() / 12
    chi2 = float(((draws - expected) ** 2 / expected).sum())
    assert chi2 < 31.26, f"chi-square {chi2:.1f} over 11 dof (p < 0.001): draws {draws.tolist()}"
    first = torch.bincount(classes[:, 0], minlength=12).double()  # label 0 of each task
    exp0 = classes.shape[0] / 12
    assert float(((first - exp0) ** 2 / exp0).sum()) < 31.26, "class order in tasks not random"


def test_images_drawn_uniformly() -> None:
    picks = sample_images(np.array([10, 21] * 2000), 3, torch.Generator().manual_seed(1))
    for cls, count in ((0, 10), (1, 21)):
        draws = np.bincount(picks[cls::2].ravel(), minlength=count)
        assert draws.size == count  # never an index past the class
        expected = 2000 * 3 / count
        assert ((draws - expected) ** 2 / expected).sum() < 50.0  # p < 0.001 up to 20 dof
    assert (np.sort(picks, 1)[:, 1:] != np.sort(picks, 1)[:, :-1]).all()


def test_deterministic_per_seed_rank_worker_epoch(pack: Path) -> None:
    base = concat(stream(pack).batches(0, 1))
    assert same(base, concat(stream(pack).batches(0, 1)))
    for other in (stream(pack, seed=1), stream(pack, rank=1, world_size=2),
                  stream(pack, epoch=1)):
        assert not same(base, concat(other.batches(0, 1)))
    s = stream(pack)
    s.set_epoch(1)
    assert same(concat(s.batches(0, 1)), concat(stream(pack, epoch=1).batches(0, 1)))
    w0, w1 = list(stream(pack).batches(0, 2)), list(stream(pack).batches(1, 2))
    assert [b.num_tasks for b in w0] == [4, 2] and [b.num_tasks for b in w1] == [4]
    assert not same(w0[0], w1[0]), "two workers drew the same tasks"


def test_augmentation_does_not_change_the_tasks(pack: Path) -> None:
    plain = concat(stream(pack).batches(0, 1))
    augmented = concat(stream(pack, augment="natural", image_size=12).batches(0, 1))
    assert augmented.support_x.shape[-2:] == (12, 12)
    assert float(augmented.support_x.min()) >= 0.0 and float(augmented.support_x.max()) <= 1.0
    assert torch.equal(plain.support_y, augmented.support_y)
    resized = concat(stream(pack, image_size=12).batches(0, 1))
    assert resized.query_x.shape[-2:] == (12, 12)


def test_dataloader_workers_exact_count_and_repeatable(pack: Path) -> None:
    def run() -> list[TaskBatch]:
        return list(train_loader(pack, "train", n_way=5, n_shot=2, n_query=3, tasks_per_batch=3,
                                 episodes=10, seed=4, workers=2))

    first, second = run(), run()
    assert [b.num_tasks for b in first] == [3, 3, 3, 1]
    assert all(same(a, b) for a, b in zip(first, second, strict=True))
    s = stream(pack, tasks_per_batch=3, seed=4)
    w0, w1 = list(s.batches(0, 2)), list(s.batches(1, 2))
    assert all(same(a, b) for a, b in zip(first, [w0[0], w1[0], w0[1], w1[1]], strict=True))
    assert len(train_loader(pack, "train", n_way=5, n_shot=2, n_query=3, tasks_per_batch=3,
                            episodes=10, seed=4)) == 4


def test_persistent_workers_see_each_new_epoch(pack: Path) -> None:
    """Workers live across epochs (same processes), yet every epoch draws that epoch's tasks:
    set_epoch reaches them through shared memory."""
    loader = train_loader(pack, "train", n_way=5, n_shot=2, n_query=3, tasks_per_batch=3,
                          episodes=6, seed=4, workers=2)
    assert loader.persistent_workers
    epochs, pids = [], []
    for epoch in range(3):
        loader.dataset.set_epoch(epoch)
        batches = iter(loader)
        epochs.append(list(batches))
        pids.append(sorted(w.pid for w in batches._workers))
    assert pids[0] == pids[1] == pids[2]
    for epoch, got in enumerate(epochs):
        alone = stream(pack, tasks_per_batch=3, seed=4, episodes=6, epoch=epoch)
        expected = [b for pair in zip(alone.batches(0, 2), alone.batches(1, 2), strict=True)
                    for b in pair]
        assert all(same(a, b) for a, b in zip(got, expected, strict=True)), epoch
    assert not same(epochs[0][0], epochs[1][0])


def test_stream_pickles_for_spawned_workers(pack: Path) -> None:
    s = stream(pack, augment="natural")
    assert same(concat(pickle.loads(pickle.dumps(s)).batches(0, 1)), concat(s.batches(0, 1)))


def test_bounded_buffer_visits_every_class(pack: Path) -> None:
    budget = 4 * 21 * SIZE * SIZE  # room for 4 of the 12 classes
    s = stream(pack, n_way=3, n_shot=1, n_query=1, episodes=1200, tasks_per_batch=100,
               buffer_mb=budget / MB)
    assert not s.fits
    classes = torch.cat([check_tasks(b, [10 + i for i in range(12)], 1) for b in s.batches(0, 1)])
    draws = torch.bincount(classes.flatten(), minlength=12)
    assert int(draws.min()) > 0, "a class was never drawn"
    # Uniform in expectation (every class stays resident for about as many episodes): within
    # 40 % here, where keeping the oldest classes instead would skew draws several-fold.
    assert float(draws.max() / draws.min()) < 1.4, draws.tolist()
    # First in, first out: each step drops the oldest class and appends the next of the stream
    # (a class met again at a new pass replaces its old copy).
    info = split_info(read_manifest(pack), "val")
    val = EpisodeStream(pack, "val", n_way=2, n_shot=1, n_query=1, tasks_per_batch=1, episodes=1,
                        seed=0, buffer_mb=3 * CLASS_BYTES_20 / MB)
    buffer = StreamBuffer(stream_classes(val.shards, info, torch.Generator().manual_seed(0)),
                          3 * CLASS_BYTES_20)
    seen, keys = [], list(buffer.entries)
    for _ in range(30):
        buffer.advance()
        new = list(buffer.entries)
        assert buffer.bytes <= 3 * CLASS_BYTES_20 and len(new) == 3
        expected = [k for k in keys[1:] if k != new[-1]]
        assert new[:-1] == expected, (keys, new)
        seen.append(new[-1])
        keys = new
    assert set(seen) == set(range(6))


def test_stream_order_is_a_full_pass(pack: Path) -> None:
    info = split_info(read_manifest(pack), "train")
    shards = stream(pack).shards
    for max_open in (1, 2, 16):
        classes = stream_classes(shards, info, torch.Generator().manual_seed(3), max_open)
        labels = [next(classes)[0] for _ in range(24)]
        assert sorted(labels[:12]) == list(range(12)) and sorted(labels[12:]) == list(range(12))
        assert labels[:12] != list(range(12))


@pytest.mark.parametrize(("kw", "message"), [
    (dict(n_way=13), "split 'train' has 12 classes, fewer than n_way=13"),
    (dict(n_shot=5, n_query=6), "class 'train/class000' has 10 images, fewer than n_shot"),
    (dict(buffer_mb=100 / MB), "buffer_mb=.* cannot hold n_way=5 classes"),
    (dict(rank=2, world_size=2), "rank=2"),
    (dict(augment="fancy"), "augment='fancy'"),
    (dict(n_query=0), "n_query=0"),
])
def test_bad_arguments(pack: Path, kw: dict, message: str) -> None:
    with pytest.raises(HmamlError, match=message):
        stream(pack, **kw)


def test_unknown_split(pack: Path) -> None:
    with pytest.raises(HmamlError, match="split 'test' is not in the pack"):
        EpisodeStream(pack, "test", n_way=2, n_shot=1, n_query=1, tasks_per_batch=1, episodes=1,
                      seed=0)


def test_missing_truncated_and_damaged_shards(tmp_path: Path) -> None:
    pack = write_pack(tmp_path / "p", {"train": [20] * 8}, size=SIZE)
    shard = pack / "train-000001.tar"
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(HmamlError, match=r"train-000001\.tar: shard listed in the manifest"):
        stream(pack)
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(HmamlError, match=r"train-000001\.tar: \d+ bytes but the manifest says"):
        stream(pack)
    # Same size, damaged content: caught while reading, naming the shard.
    damaged = bytearray(data)
    at = data.index(b'{"label"')  # the first class's cls.json
    damaged[at:at + 8] = b"\xff" * 8
    shard.write_bytes(bytes(damaged))
    s = stream(pack)
    with pytest.raises(HmamlError, match=r"train-000001\.tar: unreadable shard"):
        list(s.batches(0, 1))
    info = split_info(read_manifest(pack), "train")
    shard.write_bytes(data)
    with pytest.raises(HmamlError, match="holds 4 class records, the manifest says 5"):
        list(read_shard(ShardInfo(shard, 4, 5), info))
    with pytest.raises(HmamlError, match="has label 7, expected none"):
        list(read_shard(ShardInfo(shard, 4, 3), info))
    damaged = bytearray(data)
    damaged[100:200] = b"\x00" * 100  # inside the first tar header: its checksum breaks
    shard.write_bytes(bytes(damaged))
    with pytest.raises(HmamlError, match=r"train-000001\.tar: unreadable shard"):
        list(read_shard(ShardInfo(shard, 4, 4), info))


def test_eval_episodes_fixed_and_splittable(pack: Path) -> None:
    manifest = read_manifest(pack)
    specs = eval_episodes(manifest, "val", n_way=5, n_shot=1, n_query=4, n_episodes=30, seed=7)
    assert specs == eval_episodes(manifest, "val", n_way=5, n_shot=1, n_query=4, n_episodes=30,
                                  seed=7)
    assert specs[:10] == eval_episodes(manifest, "val", n_way=5, n_shot=1, n_query=4,
                                       n_episodes=10, seed=7)
    assert specs != eval_episodes(manifest, "val", n_way=5, n_shot=1, n_query=4, n_episodes=30,
                                  seed=8)
    # the test protocol's repeats, and another split of the same shape: independent lists
    assert specs != eval_episodes(manifest, "val", n_way=5, n_shot=1, n_query=4, n_episodes=30,
                                  seed=7, repeat=1)
    renamed = dataclasses.replace(manifest, splits={**manifest.splits,
                                                    "test": manifest.splits["val"]})
    assert [s.classes for s in specs] != [s.classes for s in eval_episodes(
        renamed, "test", n_way=5, n_shot=1, n_query=4, n_episodes=30, seed=7)]
    for spec in specs:
        assert len(set(spec.classes)) == 5
        assert all(len(set(idx)) == 5 and max(idx) < 20 for idx in spec.images)

    def served(world_size: int) -> dict[int, tuple[list[int], list[int]]]:
        out = {}
        for rank in range(world_size):
            loader = eval_loader(pack, "val", n_way=5, n_shot=1, n_query=4, n_episodes=30,
                                 seed=7, rank=rank, world_size=world_size, tasks_per_batch=4)
            for _ in range(2):  # re-iterable, same tasks each time
                got = {}
                for indices, tasks in loader:
                    classes = check_tasks(tasks, [20] * 6, 1)
                    _, image = decode_ids(torch.cat([tasks.support_x.view(len(indices), 5, 1, 1,
                                                                          SIZE, SIZE),
                                                     tasks.query_x.view(len(indices), 5, 4, 1,
                                                                        SIZE, SIZE)], 2))
                    for j, e in enumerate(indices.tolist()):
                        got[e] = (classes[j].tolist(), image[j].flatten().tolist())
                assert len(loader) == -(-len(got) // 4)
                out.update(got)
        return out

    one = served(1)
    assert sorted(one) == list(range(30))
    for e, spec in enumerate(specs):
        assert one[e] == (list(spec.classes), [i for idx in spec.images for i in idx])
    assert served(2) == one and served(4) == one


def test_eval_episodes_ignore_shard_layout(tmp_path: Path) -> None:
    a = write_pack(tmp_path / "a", {"val": [20] * 6}, classes_per_shard=1)
    b = write_pack(tmp_path / "b", {"val": [20] * 6}, classes_per_shard=6)
    kw = dict(n_way=3, n_shot=5, n_query=5, n_episodes=20, seed=0)
    assert eval_episodes(read_manifest(a), "val", **kw) == eval_episodes(read_manifest(b), "val",
                                                                         **kw)


def test_loader_bench_reports_json_last(pack: Path, capsys: pytest.CaptureFixture) -> None:
    from hmaml.bench.loader import main

    assert main(["--shards", str(pack), "--way", "3", "--shot", "1", "--query", "2",
                 "--tasks-per-batch", "4", "--seconds", "0.05"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["pack"] == "coded/train" and result["workers"] == 0
    for key in ("pack_eps", "synthetic84_eps", "synthetic28_eps", "synthetic84_train_tasks_s",
                "synthetic28_train_tasks_s"):
        assert result[key] > 0
    assert result["synthetic84_ratio"] == pytest.approx(result["synthetic84_eps"]
                                                        / result["synthetic84_train_tasks_s"])
    assert any("synthetic84" in line and "episodes/s" in line for line in lines[:-1])
    assert any("training consumes" in line for line in lines[:-1])
