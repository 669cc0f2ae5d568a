"""The study's figures, drawn from `Run`s (`cclnb.study.report`): forgetting curves, accuracy
heatmaps, loss and throughput, linear-evaluation curves, image grids and embeddings.

Figures are plain `matplotlib.figure.Figure` objects (not pyplot figures): a notebook displays
the returned figure exactly once, and scripts or tests leak no global pyplot state.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from cclnb.errors import DataError
from cclnb.study.report import (BASELINES, UNTRAINED, UNTRAINED_BN, Run, accuracy_matrix, chance_loss,
                                group_runs, lincls_curve, seed_of, seeds_note, throughput_table)


def _panel_grid(n: int, width: float = 4.2, height: float = 3.4,
                max_cols: int = 4) -> tuple[Figure, list[Any]]:
    cols = max(1, min(n, max_cols))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _mean_matrix(members: Sequence[Run], who: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over the seeds of a group's accuracy matrices (rows all seeds have)."""
    mats = [accuracy_matrix(r, who=who) for r in members]
    rows = min(m.shape[0] for m in mats)
    stack = np.stack([m[:rows] for m in mats])
    return stack.mean(axis=0), stack.min(axis=0), stack.max(axis=0)


def _untrained_level(runs: Sequence[Run], who: str = "student", baseline: str = UNTRAINED) -> float | None:
    """Mean per-task accuracy of an untrained baseline over its seeds, if the study measured it."""
    base = [r for r in runs if r.method == baseline and r.protocol(who)]
    return float(np.mean([accuracy_matrix(r, who=who)[-1].mean() for r in base])) if base else None


def plot_forgetting_curves(runs: Sequence[Run], who: str = "student") -> Figure:
    """One panel per method: accuracy on each task's classes as tasks are learned.

    With several seeds the line is their mean and the shaded band spans their min to max. Solid
    from the task's own training on (where forgetting shows), dotted before it (transfer to
    classes not trained yet, which a self-supervised encoder also has). Joint learns every task
    in its one training phase, so all its tasks are solid points from step 1. The grey dashed
    line is the untrained encoder's mean per-task accuracy and the grey dotted one the same
    encoder's with BatchNorm statistics of the data, when the study measured them: above both,
    training taught the weights something.
    """
    groups = [(label, members) for label, members in group_runs(runs)
              if members[0].method not in BASELINES and all(r.protocol(who) for r in members)]
    if not groups:
        raise DataError(f"none of the runs has a per-task accuracy matrix for the {who}; train with "
                        f"eval_each_task=knn|probe|both")
    levels = [(_untrained_level(runs, who, base), style, label) for base, style, label in
              ((UNTRAINED, "--", "untrained encoder"), (UNTRAINED_BN, ":", "untrained, BN of the data"))]
    fig, axes = _panel_grid(len(groups))
    for (label, members), ax in zip(groups, axes):
        R, low, high = _mean_matrix(members, who)
        steps = np.arange(1, R.shape[0] + 1)
        palette = sns.color_palette("viridis", R.shape[1])
        joint = members[0].method == "Joint"
        for j in range(R.shape[1]):
            seen = (steps - 1 >= j) | joint
            ax.plot(steps[seen], R[seen, j], "-o", ms=6 if joint else 3, color=palette[j],
                    label=f"task {j + 1}")
            if len(members) > 1:
                ax.fill_between(steps[seen], low[seen, j], high[seen, j], color=palette[j], alpha=0.15,
                                lw=0)
            if j > 0 and (~seen).any():
                before = np.arange(min(j + 1, R.shape[0]))
                ax.plot(steps[before], R[before, j], ":", color=palette[j], alpha=0.6)
        for level, style, level_label in levels:
            if level is not None:
                ax.axhline(level, color="grey", ls=style, lw=1, label=level_label)
        ax.set_title(f"{label} - {members[0].protocol(who)}{seeds_note(members)}")
        ax.set_xlabel("tasks learned")
        ax.set_ylabel("accuracy on task's classes (%)")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, ncols=2, loc="best")
    band = "; band = min-max over seeds" if any(len(m) > 1 for _, m in groups) else ""
    fig.suptitle(f"Forgetting curves ({who}; solid = after the task was learned{band})")
    return fig


def plot_accuracy_heatmaps(runs: Sequence[Run], who: str = "student") -> Figure:
    """One accuracy-matrix heatmap per method, the mean over its seeds (rows: after task i;
    columns: task j), on a shared scale."""
    groups = [(label, members) for label, members in group_runs(runs)
              if members[0].method not in BASELINES and all(r.protocol(who) for r in members)]
    if not groups:
        raise DataError(f"none of the runs has a per-task accuracy matrix for the {who}")
    mats = [_mean_matrix(members, who)[0] for _, members in groups]
    vmin, vmax = min(m.min() for m in mats), max(m.max() for m in mats)
    fig, axes = _panel_grid(len(groups), width=4.4, height=3.8)
    for (label, members), R, ax in zip(groups, mats, axes):
        sns.heatmap(R, ax=ax, vmin=vmin, vmax=vmax, cmap="mako", annot=R.shape[1] <= 10,
                    fmt=".0f", annot_kws={"size": 7}, cbar=ax is axes[-1],
                    xticklabels=[str(j + 1) for j in range(R.shape[1])],
                    yticklabels=[str(i + 1) for i in range(R.shape[0])])
        mean = " mean" if len(members) > 1 else ""
        ax.set_title(f"{label} - {members[0].protocol(who)}{mean}{seeds_note(members)}")
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after task")
    fig.suptitle(f"Accuracy matrices ({who}, %)")
    return fig


def _task_starts(log: pd.DataFrame) -> list[int]:
    firsts = log.groupby("task")["global_step"].min()
    return [int(s) for s in firsts.iloc[1:]]


def plot_loss_curves(runs: Sequence[Run], smooth: int = 5) -> Figure:
    """Training loss per method (total, MoCo and each term the method logs under its own name:
    CCL's extra queue and distillation, CaSSLe's distillation, ...; the mean over seeds at each
    logged step), task boundaries dashed, smoothed by a rolling mean over
    `smooth` logged points, and the chance level ln(K+1) of the MoCo loss as a red dotted line:
    a MoCo loss that stays at that line means the encoder learned nothing."""
    groups = [(label, members) for label, members in group_runs(runs)
              if any(not r.train_log.empty for r in members)]
    if not groups:
        raise DataError("none of the runs has a train_log.csv with rows yet")
    fig, axes = _panel_grid(len(groups))
    for (label, members), ax in zip(groups, axes):
        log = (pd.concat([r.train_log for r in members if not r.train_log.empty])
               .groupby("global_step", as_index=False).mean(numeric_only=True))
        for column, name in loss_parts(log.columns):
            if column in log and log[column].notna().any() and (column == "loss" or log[column].abs().sum() > 0):
                ax.plot(log["global_step"], log[column].rolling(smooth, min_periods=1).mean(),
                        label=name, lw=1.2)
        chance = chance_loss(members[0].config)
        if math.isfinite(chance):
            ax.axhline(chance, color="tab:red", ls=":", lw=1.2, label=f"ln(K+1) = {chance:.2f}")
        for step in _task_starts(log):
            ax.axvline(step, color="grey", lw=0.6, ls="--")
        ax.set_title(f"{label}{' (mean' + seeds_note(members) + ')' if len(members) > 1 else ''}")
        ax.set_xlabel("step (dashed: new task)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Training loss (red dotted: ln(K+1), what a MoCo loss that learns nothing stays at)")
    return fig


# How the report names the loss columns CCL logs; any other `loss_<term>` is shown as its term.
LOSS_NAMES = {"loss": "total", "loss_moco": "MoCo", "loss_extra": "extra queue", "loss_distill": "distillation"}


def loss_parts(columns: Sequence[str]) -> list[tuple[str, str]]:
    """(column, legend name) of every loss column of a train log: the total, MoCo's, then each
    term the method declared (`Method.loss_terms`), in the log's order."""
    return [(c, LOSS_NAMES.get(c, c.removeprefix("loss_"))) for c in columns
            if c == "loss" or c.startswith("loss_")]


def plot_throughput(runs: Sequence[Run]) -> Figure:
    """Bar chart of the median training throughput (images / s) per method (median over seeds)."""
    table = (throughput_table(runs).dropna(subset=["median_img_per_s"])
             .groupby(["dataset", "method"], as_index=False, sort=False)["median_img_per_s"].median())
    if table.empty:
        raise DataError("none of the runs logged img_per_s in train_log.csv")
    fig = Figure(figsize=(max(4.0, 1.3 * len(table) + 2), 3.4), layout="constrained")
    ax = fig.subplots()
    labels = [f"{m}\n{d}" if table["dataset"].nunique() > 1 else m
              for m, d in zip(table["method"], table["dataset"])]
    bars = ax.bar(labels, table["median_img_per_s"], color=sns.color_palette("deep", len(table)))
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel("images / s (median over logged steps)")
    ax.set_title("Training throughput")
    return fig


def plot_budget_gaps(gaps: pd.DataFrame, metric: str = "linear top-1 of the student") -> Figure:
    """The budget axis: each paired gap (mean over seeds, bar = min to max) against the images each
    method saw. Above zero the paper's side of the gap wins; the Joint - Finetuning line is the
    continual penalty the others need."""
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for gap, frame in gaps.groupby("gap", sort=False):
        frame = frame.dropna(subset=["mean"])
        low, high = frame["mean"] - frame["min"], frame["max"] - frame["mean"]
        ax.errorbar(frame["images_seen"], frame["mean"], yerr=[low, high], marker="o", capsize=3, label=gap)
    ax.axhline(0.0, color="grey", linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("images seen per method (log scale)")
    ax.set_ylabel(f"paired gap, {metric} (points)")
    ax.legend(title="mean over seeds, bar: min-max", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _draw_lincls(ax: Any, frame: pd.DataFrame, label: str = "") -> None:
    """Accuracy columns of a lincls curve on `ax` (losses, when recorded, on a twin axis)."""
    prefix = f"{label} " if label else ""
    for column in (c for c in frame.columns if c != "epoch" and "loss" not in c):
        ax.plot(frame["epoch"], frame[column], "-o", ms=3, label=f"{prefix}{column}")
    loss_cols = [c for c in frame.columns if "loss" in c]
    if loss_cols:
        twin = ax.twinx()
        for column in loss_cols:
            twin.plot(frame["epoch"], frame[column], "--", lw=1, alpha=0.6, label=f"{prefix}{column}")
        twin.set_ylabel("loss (dashed)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)


def plot_lincls_curve(result: dict[str, Any], title: str = "Linear evaluation") -> Figure:
    """Validation top-1 (and training loss when recorded) against the epoch, for one result."""
    frame = lincls_curve(result)
    if frame.empty:
        raise DataError("the linear-evaluation result has no per-epoch curve to plot")
    fig = Figure(figsize=(6.5, 3.4), layout="constrained")
    ax = fig.subplots()
    _draw_lincls(ax, frame)
    ax.set_title(title)
    return fig


def plot_lincls_curves(runs: Sequence[Run]) -> Figure:
    """One panel per method with the linear-evaluation curves of its student and teacher (one
    curve per seed when there are several)."""
    def has_curve(run: Run) -> bool:
        return any(not lincls_curve(res).empty for res in run.lincls.values())

    groups = [(label, [r for r in members if has_curve(r)]) for label, members in group_runs(runs)]
    groups = [(label, members) for label, members in groups if members]
    if not groups:
        raise DataError("no run has a linear-evaluation result with a per-epoch curve yet")
    fig, axes = _panel_grid(len(groups))
    for (label, members), ax in zip(groups, axes):
        for run in members:
            for who, result in sorted(run.lincls.items()):
                frame = lincls_curve(result)
                if not frame.empty:
                    _draw_lincls(ax, frame, f"seed {seed_of(run)} {who}" if len(members) > 1 else who)
        ax.set_title(label)
    fig.suptitle("Linear evaluation curves")
    return fig


def image_grid(images: np.ndarray, titles: Sequence[str] | None = None, n_cols: int = 8,
               title: str = "", size: float = 1.3) -> Figure:
    """A grid of (N, H, W, 3) uint8 images (or (N, 3, H, W)), optionally titled one by one."""
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise DataError(f"image_grid needs a batch of images (N, H, W, 3), got shape {arr.shape}")
    if arr.shape[1] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(0, 2, 3, 1)
    n = len(arr)
    cols = max(1, min(n_cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(size * cols, size * rows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < n:
            ax.imshow(arr[i], interpolation="nearest")
            if titles is not None:
                ax.set_title(str(titles[i]), fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def denormalize(images: Any) -> np.ndarray:
    """ImageNet-normalized float images (B, 3, S, S) -> (B, S, S, 3) uint8 for display, so the
    augmented views the model sees can be looked at."""
    from cclnb.data.augment import IMAGENET_MEAN, IMAGENET_STD

    arr = np.asarray(images.detach().cpu().float() if hasattr(images, "detach") else images,
                     dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise DataError(f"denormalize needs (B, 3, S, S) normalized images, got shape {arr.shape}")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.uint8(np.clip((arr * std + mean) * 255.0 + 0.5, 0, 255)).transpose(0, 2, 3, 1)


def plot_embedding(points: np.ndarray, groups: Sequence[int], title: str = "",
                   group_name: str = "task") -> Figure:
    """A 2-D scatter of embedded features, one colour per group (e.g. the task of each image)."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) != len(groups):
        raise DataError(f"plot_embedding needs (N, 2) points and N group ids; got {pts.shape} and "
                        f"{len(groups)}")
    fig = Figure(figsize=(6.0, 5.0), layout="constrained")
    ax = fig.subplots()
    labels = np.asarray(groups)
    palette = sns.color_palette("tab10", len(np.unique(labels)))
    for colour, group in zip(palette, np.unique(labels)):
        mask = labels == group
        ax.scatter(pts[mask, 0], pts[mask, 1], s=8, alpha=0.7, color=colour,
                   label=f"{group_name} {group + 1}")
    ax.legend(fontsize=7, markerscale=2)
    ax.set_title(title)
    return fig
