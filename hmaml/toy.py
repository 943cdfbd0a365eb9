"""The paper's 2-D toy (Fig. 1/3, appendix A): why one gradient step is not enough.

Four elongated Gaussian clusters sit around a centre away from the origin: two horizontal
ellipses (above and below) and two vertical ones (left and right). A task is one pair with the
two labels in either order: four task types. The model is linear (a 2-way classifier on the raw
2-D point). A single universal weight vector cannot serve all four types, so adaptation must turn
the boundary by 90 or 180 degrees *and* move its offset; one small gradient step cannot, a
hypernetwork can.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from hmaml.methods import MAML, HyperMAML, Method
from hmaml.methods.functional import linear_logits, one_hot, sgd_head_steps
from hmaml.models import build_encoder
from hmaml.plots import ToyPanel, plot_toy
from hmaml.tasks import TaskBatch

CENTRE = torch.tensor([3.0, 3.0])
OFFSET, LONG, SHORT = 1.2, 0.55, 0.12
# (mean, std) of the four clusters: top, bottom (horizontal), left, right (vertical)
GAUSSIANS = [
    (CENTRE + torch.tensor([0.0, OFFSET]), torch.tensor([LONG, SHORT])),
    (CENTRE - torch.tensor([0.0, OFFSET]), torch.tensor([LONG, SHORT])),
    (CENTRE - torch.tensor([OFFSET, 0.0]), torch.tensor([SHORT, LONG])),
    (CENTRE + torch.tensor([OFFSET, 0.0]), torch.tensor([SHORT, LONG])),
]
# task type -> (cluster of label 0, cluster of label 1)
TASK_TYPES = [(0, 1), (1, 0), (2, 3), (3, 2)]
TYPE_NAMES = ["top=0 / bottom=1", "bottom=0 / top=1", "left=0 / right=1", "right=0 / left=1"]


def sample_points(cluster: int, n: int, gen: torch.Generator) -> Tensor:
    mean, std = GAUSSIANS[cluster]
    return mean + std * torch.randn(n, 2, generator=gen)


def sample_tasks(types: Tensor, shot: int, query: int, gen: torch.Generator) -> TaskBatch:
    """One 2-way task per entry of ``types``; points are shaped as 1x1 two-channel images."""
    sx, qx = [], []
    for task_type in types.tolist():
        clusters = TASK_TYPES[task_type]
        sx.append(torch.cat([sample_points(c, shot, gen) for c in clusters]))
        qx.append(torch.cat([sample_points(c, query, gen) for c in clusters]))
    tasks = len(sx)
    sy = torch.arange(2).repeat_interleave(shot).expand(tasks, -1)
    qy = torch.arange(2).repeat_interleave(query).expand(tasks, -1)
    as_images = lambda pts: torch.stack(pts)[..., None, None]  # noqa: E731
    return TaskBatch(as_images(sx), sy, as_images(qx), qy, n_way=2)


@dataclass
class ToyRun:
    """A meta-trained toy method and its accuracy on fresh tasks."""

    name: str
    method: Method
    accuracy: float
    seconds: float


def build_toy_method(name: str) -> Method:
    encoder = build_encoder("pixels", 2, 1)
    if name == "maml_1":
        return MAML(encoder, 2, inner_steps=1, inner_lr=0.1)
    if name == "maml_5":
        return MAML(encoder, 2, inner_steps=5, inner_lr=0.1)
    return HyperMAML(encoder, 2, hn_depth=3, hn_width=64, enhance=True, switch=False)


def meta_train(name: str, steps: int, seed: int, shot: int = 5, query: int = 15,
               meta_batch: int = 16) -> ToyRun:
    """Meta-train one method with Adam on random task types; evaluate on 200 fresh tasks."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    method = build_toy_method(name)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-2)
    start = time.perf_counter()
    for _ in range(steps):
        batch = sample_tasks(torch.randint(0, 4, (meta_batch,), generator=gen), shot, query, gen)
        optimizer.zero_grad()
        method(batch).loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    eval_gen = torch.Generator().manual_seed(10_000 + seed)
    test = sample_tasks(torch.arange(200) % 4, shot, query, eval_gen)
    with torch.no_grad():
        accuracy = float(method(test).accuracy(test.query_y).mean())
    return ToyRun(name, method, accuracy, seconds)


def adapted_classifiers(method: Method, batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Universal (W, b) and each task's adapted (W', b') of a toy method."""
    support, _ = method.embed(batch)
    onehot = one_hot(batch.support_y, 2, support.dtype)
    if isinstance(method, HyperMAML):
        w0, b0 = method.head.expand(batch.num_tasks)
        dw, db = method.delta(support, onehot)
        return w0.detach(), b0.detach(), (w0 + dw).detach(), (b0 + db).detach()
    assert isinstance(method, MAML)  # the toy's methods: HyperMAML and MAML (build_toy_method)
    w0, b0 = method.head.expand(batch.num_tasks)
    w, b = sgd_head_steps(support, onehot, w0, b0, method.inner_steps, method.inner_lr, True)
    return w0.detach(), b0.detach(), w.detach(), b.detach()


def plot(runs: list[ToyRun], out: str, seed: int = 0) -> None:
    """Rows = methods, columns = task types: decision regions, universal and adapted boundary
    (drawn by :func:`hmaml.plots.plot_toy` from the panels computed here)."""
    gen = torch.Generator().manual_seed(seed)
    batch = sample_tasks(torch.arange(4), 5, 40, gen)
    lo, hi = 0.5, 5.5
    axis = torch.linspace(lo, hi, 200)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    rows = []
    for run in runs:
        with torch.no_grad():
            w0, b0, w, b = adapted_classifiers(run.method, batch)
            regions = linear_logits(grid.expand(4, -1, -1), w, b).argmax(-1)
        panels = []
        for col in range(4):
            cloud = torch.cat([sample_points(cluster, 60, gen) for cluster in range(4)])
            panels.append(ToyPanel(
                regions=regions[col].view(200, 200).float().numpy(),
                cloud=cloud.numpy(), points=batch.query_x[col, :, :, 0, 0].numpy(),
                labels=batch.query_y[col].numpy(),
                universal=_boundary(w0[col], b0[col]), adapted=_boundary(w[col], b[col])))
        rows.append((f"{run.name}\nacc {run.accuracy:.3f}", panels))
    plot_toy(rows, TYPE_NAMES, grid[:, 0].view(200, 200).numpy(),
             grid[:, 1].view(200, 200).numpy(), (lo, hi), CENTRE.tolist(), out)


def _boundary(w: Tensor, b: Tensor) -> tuple[tuple[float, float], float]:
    """The two-class boundary (normal, offset): normal . x + offset = 0, class 0 on the positive
    side."""
    normal = w[0] - w[1]
    return (float(normal[0]), float(normal[1])), float(b[0] - b[1])


def run_toy(out: str, steps: int = 1500, seed: int = 0) -> dict[str, float]:
    """Meta-train MAML-1, MAML-5 and HyperMAML, draw the figure, return the accuracies."""
    torch.set_num_threads(1)
    runs = [meta_train(name, steps, seed) for name in ("maml_1", "maml_5", "hypermaml")]
    plot(runs, out, seed)
    for run in runs:
        print(f"{run.name:10s} accuracy {run.accuracy:.3f}  ({run.seconds:.1f} s meta-training)")
    print(f"figure: {out}")
    result = {run.name: round(run.accuracy, 4) for run in runs}
    print(json.dumps(result))
    return result
