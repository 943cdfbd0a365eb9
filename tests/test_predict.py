"""A trained run used on your own task: ``hmaml.load_run(...).adapt(...)`` and ``hmaml predict``
give the method's own logits on the same task; ``support`` normalisation classifies each query on
its own; bad input is refused naming the file or folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hmaml
from hmaml.commands.predict import main as predict_main
from hmaml.config import MethodConfig, config_from_yaml, fingerprint
from hmaml.data.split import TaskImages, load_split
from hmaml.data.transforms import build_transform
from hmaml.methods import build_method
from hmaml.models import build_encoder
from hmaml.precision import resolve_precision
from hmaml.tasks import TaskBatch
from hmaml.train.build import build_model, open_packs
from hmaml.train.loop import train
from hmaml.train.protocol import restore_best
from tests.train_fixtures import tiny_config, tiny_pack  # noqa: F401 -- fixture

CPU = torch.device("cpu")
METHODS = {"hypermaml": {}, "maml": {"method.adapt": "all"}, "protonet": {}}


@pytest.fixture(scope="module")
def runs(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """A tiny trained run of each method (seconds each)."""
    out = {}
    for name, extra in METHODS.items():
        run_dir = tmp_path_factory.mktemp("runs") / name
        train(tiny_config(tiny_pack, run_dir, **{"method.name": name, **extra}))
        out[name] = run_dir
    return out


@pytest.fixture(scope="module")
def task(tiny_pack: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
         ) -> tuple[np.ndarray, np.ndarray, Path, list[Path]]:
    """A 5-way 1-shot task of test classes (3 queries each) as arrays and as PNG files."""
    _, classes = load_split(tiny_pack, "test")
    support = np.stack([classes[c][0] for c in range(5)])
    query = np.stack([classes[c][i] for c in range(5) for i in (1, 2, 3)])
    root = tmp_path_factory.mktemp("task")
    for c in range(5):
        (root / "support" / f"class{c}").mkdir(parents=True)
        Image.fromarray(support[c, ..., 0]).save(root / "support" / f"class{c}" / "a.png")
    (root / "query").mkdir()
    files = []
    for i, image in enumerate(query):
        files.append(root / "query" / f"q{i:02d}.png")
        Image.fromarray(image[..., 0]).save(files[-1])
    return support, query, root / "support", files


def own_logits(run_dir: Path, support: np.ndarray, query: np.ndarray) -> torch.Tensor:
    """The logits of the method as the test protocol builds and restores it, on the task."""
    cfg = config_from_yaml((run_dir / "config.yaml").read_text(), "config.yaml")
    packs = open_packs(cfg, train=False)
    method = build_model(cfg, packs.image, resolve_precision(cfg.train.mixed_precision, CPU), CPU)
    restore_best(method, run_dir / "best.pt", fingerprint(cfg))
    method.set_tested()
    images = TaskImages(1, 5, 1, 3, support.shape[1:])
    images.put(0, [np.stack([support[c], *query[3 * c:3 * c + 3]]) for c in range(5)],
               np.tile(np.arange(4), (5, 1)))
    batch = images.to_batch(build_transform(None, packs.image.size, packs.image.pipeline))
    with torch.no_grad():
        return method(batch).logits[0]


@pytest.mark.parametrize("name", list(METHODS))
def test_api_and_cli_give_the_methods_own_logits(name: str, runs: dict[str, Path], task,
                                                 tmp_path: Path) -> None:
    support, query, support_dir, files = task
    expected = torch.softmax(own_logits(runs[name], support, query), -1)
    run = hmaml.load_run(runs[name])
    labels = [f"class{c}" for c in range(5)]
    clf = run.adapt([support_dir / c / "a.png" for c in labels], labels)
    assert clf.classes == labels
    torch.testing.assert_close(clf.predict_proba(files), expected, atol=1e-6, rtol=0)
    assert clf.predict(files) == [labels[int(k)] for k in expected.argmax(-1)]
    # arrays and PIL images are read as the files are
    torch.testing.assert_close(clf.predict_proba([Image.open(f) for f in files]), expected,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(clf.predict_proba(list(query)), expected, atol=1e-6, rtol=0)
    out = tmp_path / "p.csv"
    assert predict_main(["--run", str(runs[name]), "--support", str(support_dir),
                         "--query", str(files[0].parent), "--out", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["file", "predicted", *(f"p_{c}" for c in labels)]
    assert [Path(r[0]).name for r in rows[1:]] == [f.name for f in files]
    got = torch.tensor([[float(x) for x in r[2:]] for r in rows[1:]])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    assert [r[1] for r in rows[1:]] == clf.predict(files)


@pytest.mark.parametrize("name", list(METHODS))
def test_support_normalisation_classifies_each_image_on_its_own(name: str, runs, task) -> None:
    _, _, support_dir, files = task
    labels = [f"class{c}" for c in range(5)]
    images = [support_dir / c / "a.png" for c in labels]
    alone = hmaml.load_run(runs[name], norm="support").adapt(images, labels)
    together = alone.predict_proba(files)
    one_by_one = torch.cat([alone.predict_proba([f]) for f in files])
    torch.testing.assert_close(one_by_one, together, atol=1e-5, rtol=0)
    transductive = hmaml.load_run(runs[name]).adapt(images, labels)
    first = transductive.predict_proba(files)[:1]
    assert not torch.allclose(transductive.predict_proba(files[:1]), first, atol=1e-3)


def test_support_statistics_normalise_a_support_image_as_the_support_set() -> None:
    """Known answer: with the support set's statistics, a query that is a support image gets
    that image's support embedding, so ProtoNet (1-shot) puts it at distance 0 of its class."""
    torch.manual_seed(0)
    method = build_method(MethodConfig(name="protonet"), build_encoder("conv4", 1, 28), 5)
    support = torch.rand(2, 5, 1, 28, 28)
    batch = TaskBatch(support_x=support, support_y=torch.arange(5).expand(2, 5),
                      query_x=support[:, [3, 1]], query_y=torch.tensor([[3, 1]] * 2), n_way=5)
    method.query_norm = "support"
    logits = method(batch).logits
    assert torch.allclose(logits[:, 0, 3], torch.zeros(2), atol=1e-4)
    assert torch.allclose(logits[:, 1, 1], torch.zeros(2), atol=1e-4)
    method.query_norm = "transductive"
    assert not torch.allclose(method(batch).logits[:, 0, 3], torch.zeros(2), atol=1e-2)


def write(path: Path, image: np.ndarray | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        Image.fromarray(image).save(path)


def test_bad_tasks_are_refused_naming_the_file_or_folder(runs, task, tmp_path: Path,
                                                         capsys) -> None:
    support, _, support_dir, files = task
    run = str(runs["protonet"])

    def fails(support_at: Path, queries: list[Path], message: str) -> None:
        code = predict_main(["--run", run, "--support", str(support_at), "--query",
                             *map(str, queries), "--out", str(tmp_path / "x.csv")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, err

    six = tmp_path / "six"
    for c in range(6):
        write(six / f"c{c}" / "a.png", support[c % 5, ..., 0])
    fails(six, files, "6 classes given; this run was trained 5-way")
    empty = tmp_path / "empty"
    for c in range(5):
        write(empty / f"c{c}" / "a.png", support[c, ..., 0])
    (empty / "c4" / "a.png").unlink()
    fails(empty, files, f"{empty / 'c4'}: 0 images, fewer than the run's K = 1 per class")
    uneven = tmp_path / "uneven"
    for c in range(5):
        write(uneven / f"c{c}" / "a.png", support[c, ..., 0])
    write(uneven / "c0" / "b.png", support[0, ..., 0])
    fails(uneven, files, "every class needs the same number of support images (c0: 2, c1: 1")
    broken = tmp_path / "broken.png"
    write(broken, b"not an image")
    fails(support_dir, [broken], f"{broken}: not a readable image")
    tiny = tmp_path / "tiny.png"
    write(tiny, np.zeros((5, 5), dtype=np.uint8))
    fails(support_dir, [tiny], f"{tiny}: 5x5 pixels is too small for this run's 28x28 images")
    long = tmp_path / "long.png"
    write(long, np.zeros((28, 200), dtype=np.uint8))
    fails(support_dir, [long], f"{long}: 200x28 pixels is too elongated")
    fails(support_dir, [tmp_path / "nothing.png"], "nothing.png: no such file or folder")
    fails(tmp_path / "nowhere", files, "not a folder")
