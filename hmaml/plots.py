"""Figures a person would rather look at than read: a run's learning curve, a sweep's test
accuracies, the validation curves of several seeds, and the accuracy vs time of MAML's inner steps
beside HyperMAML (the paper's Tables 4 and 8). matplotlib is imported inside each function (Agg
canvas, no display), so importing this module stays light.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hmaml.files import write_bytes_atomic


def _save(fig: Any, out_png: str | Path) -> Path:
    """The figure as a PNG, made in memory and written atomically (a full disk: a named
    error, no torn image)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return write_bytes_atomic(out_png, buffer.getvalue())


def phase_spans(history: Sequence[Mapping[str, Any]]) -> list[tuple[float, float, str]]:
    """Contiguous ``(first_epoch, last_epoch + 1, phase)`` runs of the MAML weight ``p``:
    ``"warm-up"`` where p == 1 and ``"switch"`` where 0 < p < 1 (epochs without p are skipped)."""
    spans: list[tuple[float, float, str]] = []
    for row in history:
        p = row.get("p")
        if p is None or p <= 0:
            continue
        phase = "warm-up" if p >= 1 else "switch"
        epoch = float(row["epoch"])
        if spans and spans[-1][2] == phase and spans[-1][1] == epoch:
            spans[-1] = (spans[-1][0], epoch + 1, phase)
        else:
            spans.append((epoch, epoch + 1, phase))
    return spans


def lr_drops(history: Sequence[Mapping[str, Any]]) -> list[float]:
    """Epochs whose learning rate is lower than the previous logged one."""
    drops, previous = [], None
    for row in history:
        lr = row.get("lr")
        if lr is None:
            continue
        if previous is not None and lr < previous:
            drops.append(float(row["epoch"]))
        previous = lr
    return drops


def plot_learning_curve(history: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path:
    """Draw train loss (left axis), train and validation accuracy (right axis) against epoch,
    shade the MAML warm-up and switch epochs and mark LR drops; write a PNG.

    ``history`` holds one dict per epoch with ``epoch`` and any of ``train_loss``, ``train_acc``,
    ``val_acc``, ``p`` (MAML weight of the warm-up switch) and ``lr``.
    """
    if not history:
        raise ValueError("learning curve: the history is empty")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax = fig.add_subplot()
    acc_ax = loss_ax.twinx()
    colours = {"warm-up": "tab:orange", "switch": "tab:olive"}
    for start, stop, phase in phase_spans(history):
        loss_ax.axvspan(start, stop, color=colours[phase], alpha=0.15, lw=0)
    for epoch in lr_drops(history):
        loss_ax.axvline(epoch, color="grey", ls="--", lw=1)
    lines = []
    for axis, key, label, style in ((loss_ax, "train_loss", "train loss", "tab:red"),
                                    (acc_ax, "train_acc", "train accuracy", "tab:blue"),
                                    (acc_ax, "val_acc", "validation accuracy", "tab:green")):
        points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            lines += axis.plot(xs, ys, color=style, label=label, lw=1.5)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    acc_ax.set_ylabel("accuracy (%)")
    from matplotlib.patches import Patch

    labels = {"warm-up": "MAML warm-up", "switch": "MAML -> hypernetwork switch"}
    shown = {span[2] for span in phase_spans(history)}
    handles = lines + [Patch(color=c, alpha=0.3, label=labels[p]) for p, c in colours.items()
                       if p in shown]
    if lr_drops(history):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="grey", ls="--", lw=1, label="LR drop"))
    acc_ax.legend(handles=handles, loc="best", fontsize="small")
    return _save(fig, out_png)


def plot_steps(rows: Sequence[Mapping[str, Any]], out_png: str | Path, title: str = "") -> Path:
    """Test accuracy against the seconds of the 600 test tasks: MAML at each number of inner
    steps as one line (points labelled with K), HyperMAML as one star. ``rows``: dicts with
    ``model``, ``steps`` (None for HyperMAML), ``seconds``, ``seconds_std``, ``acc``,
    ``acc_std``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    maml = sorted((r for r in rows if r["model"] == "MAML"), key=lambda r: r["steps"])
    if maml:
        ax.errorbar([r["seconds"] for r in maml], [r["acc"] for r in maml],
                    xerr=[r["seconds_std"] for r in maml], yerr=[r["acc_std"] for r in maml],
                    marker="o", color="tab:blue", label="MAML (K inner steps)", capsize=2)
        for r in maml:
            ax.annotate(f"K={r['steps']}", (r["seconds"], r["acc"]), textcoords="offset points",
                        xytext=(4, -10), fontsize="x-small")
    for r in rows:
        if r["model"] == "HyperMAML":
            ax.errorbar([r["seconds"]], [r["acc"]], xerr=[r["seconds_std"]],
                        yerr=[r["acc_std"]], marker="*", markersize=14, color="tab:red",
                        label="HyperMAML (one forward pass)", capsize=2, ls="none")
    if maml and maml[-1]["seconds"] > 5 * max(maml[0]["seconds"], 1e-9):
        ax.set_xscale("log")
    ax.set_xlabel("seconds for the test tasks")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, out_png)


def plot_seeds(groups: Sequence[Mapping[str, Any]], out_png: str | Path) -> Path:
    """Validation accuracy against epoch for each experiment of a comparison over seeds: every
    seed a thin line, the mean over the seeds (at the epochs all of them validated) a thick one,
    labelled with the test accuracy's mean ± std over the seeds. ``groups``: as
    :func:`hmaml.tables.seed_groups` returns them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for index, group in enumerate(groups):
        colour = f"C{index % 10}"
        curves = [dict(run["val"]) for run in group["runs"] if run["val"]]
        for curve in curves:
            ax.plot(list(curve), list(curve.values()), color=colour, lw=0.7, alpha=0.35)
        shared = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        spread = "" if group["std"] is None else f" ± {group['std']:.2f}"
        label = (f"{group['label']}: test {group['mean']:.2f}{spread} % "
                 f"({len(group['runs'])} seed{'s' if len(group['runs']) > 1 else ''})")
        if shared:
            ax.plot(shared, [float(np.mean([c[e] for c in curves])) for e in shared],
                    color=colour, lw=2, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("validation accuracy: each seed (thin) and their mean (thick)",
                 fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, out_png)


def plot_bars(labels: Sequence[str], accuracies: Sequence[float | None],
              ci95: Sequence[float | None], out_png: str | Path, title: str) -> Path:
    """One bar per label (a sweep's axis points): test accuracy with its 95 % CI as error bars;
    a point without a result yet is an empty bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heights = [a or 0.0 for a in accuracies]
    errors = [e or 0.0 for e in ci95]
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(labels)), heights, yerr=errors, capsize=4, color="tab:blue")
    tilt = len(labels) > 3
    ax.set_xticks(range(len(labels)), labels, rotation=30 if tilt else 0,
                  ha="right" if tilt else "center", fontsize="small")
    ax.set_ylabel("test accuracy (%)")
    finite = [h - e for h, e in zip(heights, errors, strict=True) if h]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(heights) + max(errors) + 5))
    ax.set_title(title)
    return _save(fig, out_png)


def plot_search(numbers: Sequence[int], values: Sequence[float | None],
                pruned: Sequence[int], metric: str, maximize: bool, out_png: str | Path,
                title: str) -> Path:
    """A search's trials in the order they were asked: each finished trial's value, the best so
    far as a step line, pruned trials as crosses on the axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [(n, v) for n, v in zip(numbers, values, strict=True) if v is not None]
    if done:
        xs, ys = zip(*done, strict=True)
        ax.scatter(xs, ys, color="tab:blue", label="trial", zorder=3)
        best, line = None, []
        for y in ys:
            best = y if best is None or (y > best if maximize else y < best) else best
            line.append(best)
        ax.step(xs, line, where="post", color="tab:orange", label="best so far")
    if pruned:
        low = ax.get_ylim()[0] if done else 0.0
        ax.scatter(list(pruned), [low] * len(pruned), marker="x", color="tab:red",
                   label="pruned", zorder=3, clip_on=False)
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    if done or pruned:  # a search with no trial through yet has nothing to label
        ax.legend(loc="best", fontsize="small")
    ax.set_title(title)
    return _save(fig, out_png)


@dataclass
class ToyPanel:
    """One task type of the 2-D toy for one method: decision regions on the grid (0 / 1), the
    background points of all clusters, the task's query points and labels, and the universal and
    adapted boundaries as ``((normal_x, normal_y), offset)``."""

    regions: np.ndarray
    cloud: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    universal: tuple[tuple[float, float], float]
    adapted: tuple[tuple[float, float], float]


def plot_toy(rows: Sequence[tuple[str, Sequence[ToyPanel]]], titles: Sequence[str],
             grid_x: np.ndarray, grid_y: np.ndarray, limits: tuple[float, float],
             centre: Sequence[float], out_png: str | Path) -> Path:
    """The paper's 2-D toy: rows = methods (``(label, panels)``), columns = task types; each panel
    shades the adapted decision regions and draws the universal (blue) and adapted (red)
    boundaries with an arrow from the point nearest ``centre`` towards class 0."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lo, hi = limits
    fig = Figure(figsize=(13, 3.3 * len(rows)), layout="tight")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    for r, (label, panels) in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.contourf(grid_x, grid_y, panel.regions, levels=[-0.5, 0.5, 1.5],
                        colors=["#fde0c5", "#c9e3f5"], alpha=0.9)
            ax.scatter(panel.cloud[:, 0], panel.cloud[:, 1], s=3, c="#bbbbbb")
            ax.scatter(panel.points[:, 0], panel.points[:, 1], s=6, c=panel.labels,
                       cmap="coolwarm", vmin=0, vmax=1)
            for (normal, offset), colour, name in ((panel.universal, "tab:blue", "universal"),
                                                   (panel.adapted, "tab:red", "adapted")):
                _draw_boundary(ax, normal, offset, colour, name, limits, centre)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
            if c == 0:
                ax.set_ylabel(label, fontsize=11)
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Decision regions after adaptation; blue: universal boundary, red: adapted")
    return _save(fig, out_png)


def _draw_boundary(ax: Any, normal: tuple[float, float], offset: float, colour: str, label: str,
                   limits: tuple[float, float], centre: Sequence[float]) -> None:
    """Draw the line normal . x + offset = 0 and an arrow along the normal (towards class 0)
    from the line's point nearest ``centre``, when that point lies inside ``limits``."""
    nx, ny = normal
    norm2 = nx * nx + ny * ny
    if norm2 < 1e-12:
        return
    foot = np.array([-offset * nx / norm2, -offset * ny / norm2])
    direction = np.array([-ny, nx]) / norm2**0.5
    ends = np.stack([foot - 10 * direction, foot + 10 * direction])
    ax.plot(ends[:, 0], ends[:, 1], color=colour, lw=2, label=label)
    point = foot + direction * float((np.asarray(centre) - foot) @ direction)
    if all(limits[0] < float(c) < limits[1] for c in point):
        scale = 0.6 / norm2**0.5
        ax.annotate("", xy=(point[0] + nx * scale, point[1] + ny * scale), xytext=tuple(point),
                    arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.5})
