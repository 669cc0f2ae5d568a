"""Read run directories into pandas and draw the study's figures.

The report notebook and the task-sequence notebook only orchestrate: everything they show comes
from the functions here, so it is tested once and looks the same everywhere. This module reads the
run-directory contract (docs/architecture.md, "Run directory") and never trains or evaluates, so a
report can be rebuilt at any time from what the runs left behind.

Figures are plain `matplotlib.figure.Figure` objects (not pyplot figures): a notebook displays
the returned figure exactly once, and scripts or tests leak no global pyplot state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from cclnb import metrics
from cclnb.config import STUDY_METHODS
from cclnb.errors import DataError
from cclnb.runs import short_commit

WHO = ("student", "teacher")
PROTOCOLS = ("probe", "knn")  # preference order for the per-task accuracy matrix

# Linear top-1 (%) on ImageNet-Sub, 10 incremental steps, ResNet-50, 224 px, 200 epochs per task
# (paper Table; the authors' code re-run, /work/shared/reference.md).
PAPER_SETTING = "ImageNet-Sub, ResNet-50, 224 px, 10 tasks, 200 epochs"
PAPER_TOP1 = {"Finetuning": 52.62, "SimpleReplay": 54.28, "CCL": 55.48}
AUTHORS_CODE_TOP1 = {"Finetuning": 53.06, "SimpleReplay": 54.36, "CCL": 55.54}
UNTRAINED = "untrained"  # the study's baseline: the same encoder at its random initialisation
UNTRAINED_BN = "untrained-bn"  # the same weights, BatchNorm statistics measured on the training images
BASELINES = (UNTRAINED, UNTRAINED_BN)  # encoders that never trained: rows of the table, not of the verdict
ALL_AT_ONCE = ("Joint", *BASELINES)  # one accuracy row covering every task (nothing to forget)


@dataclass
class Run:
    """Everything one run directory holds, loaded once.

    `accuracy[(protocol, who)]` is the accuracy-matrix frame indexed by `after_task` with columns
    task_0..task_{n-1} and all; `lincls[who]` is the parsed lincls_<who>.json.
    """

    path: Path
    config: dict[str, Any]
    status: dict[str, Any]
    train_log: pd.DataFrame
    accuracy: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)
    lincls: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def dataset(self) -> str:
        return dataset_label(self.config)

    @property
    def complete(self) -> bool:
        return self.status.get("state") == "complete"

    def protocol(self, who: str = "student") -> str | None:
        """The per-task protocol to summarise: the probe when it was measured, else kNN."""
        return next((p for p in PROTOCOLS if (p, who) in self.accuracy), None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}); the run "
                        f"that wrote it was probably killed mid-write: re-run that step") from error


def _read_accuracy(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    if "after_task" not in frame.columns:
        raise DataError(f"{path} has no `after_task` column; it is not an accuracy matrix written "
                        f"by cclnb (expected columns after_task, task_0.., all)")
    return frame.set_index("after_task").sort_index()


def load_run(path: str | Path) -> Run:
    """Load one run directory; a folder without config.json is a DataError naming it."""
    run_dir = Path(path)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise DataError(f"{run_dir} has no config.json, so it is not a cclnb run directory; "
                        f"pass a directory written by `cclnb train` or the task-sequence notebook")
    status_path = run_dir / "status.json"
    log_path = run_dir / "train_log.csv"
    run = Run(path=run_dir, config=_read_json(config_path),
              status=_read_json(status_path) if status_path.is_file() else {"state": "unknown"},
              train_log=pd.read_csv(log_path) if log_path.is_file() else pd.DataFrame())
    for csv_path in sorted((run_dir / "eval").glob("acc_*_*.csv")):
        _, protocol, who = csv_path.stem.split("_", 2)
        run.accuracy[(protocol, who)] = _read_accuracy(csv_path)
    for who in WHO:
        lincls_path = run_dir / f"lincls_{who}.json"
        if lincls_path.is_file():
            run.lincls[who] = _read_json(lincls_path)
    return run


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every run directory (a folder holding config.json) under `root`, in a stable order."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"runs root {base} does not exist; run the study first "
                        f"(`cclnb study --preset demo`) or pass the folder that holds the runs")
    return sorted(p.parent for p in base.rglob("config.json") if "checkpoints" not in p.parts)


def load_runs(root: str | Path) -> list[Run]:
    """All runs under `root`, ordered by dataset then by the canonical method order."""
    runs = [load_run(p) for p in find_run_dirs(root)]
    if not runs:
        raise DataError(f"no run directories (folders with config.json) under {root}; "
                        f"run the task-sequence notebook or `cclnb study` first")
    return sort_runs(runs)


def sort_runs(runs: Sequence[Run]) -> list[Run]:
    """Runs ordered by dataset, the canonical method order (the untrained baselines last), seed."""
    order = {m: i for i, m in enumerate((*STUDY_METHODS, *BASELINES))}
    return sorted(runs, key=lambda r: (r.dataset, order.get(r.method, len(order)),
                                       _seed(r), str(r.path)))


def _seed(run: Run) -> int:
    seed = run.config.get("seed")
    return -1 if seed is None else int(seed)


def group_runs(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """The runs of each (dataset, method), in order: the seeds of one method form one group, which
    the figures draw as one mean with a band. The label names the dataset only when several are
    present."""
    several = len({r.dataset for r in runs}) > 1
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.dataset, run.method), []).append(run)
    return [(f"{method} ({dataset})" if several else method, members)
            for (dataset, method), members in groups.items()]


def _seeds_note(members: Sequence[Run]) -> str:
    return f", {len(members)} seeds" if len(members) > 1 else ""


def dataset_label(config: dict[str, Any]) -> str:
    """A short dataset name for tables: the data file's stem (`-sub` for ImageNet-Sub)."""
    data = config.get("data")
    if data == "demo-digits":
        return "demo-digits"
    if config.get("dataset") == "demo" or data == "demo":
        return "demo-shapes"
    if not data:
        return str(config.get("dataset", "?"))
    name = Path(str(data).rstrip("/")).name
    for suffix in (".zip", ".tar.gz", ".tar"):
        name = name.removesuffix(suffix)
    return f"{name}-sub" if config.get("imagenetsub") else name


def matches_paper_setting(config: dict[str, Any]) -> bool:
    """True only for the setting the published numbers were measured in (`PAPER_SETTING`)."""
    return (bool(config.get("imagenetsub")) and config.get("arch") == "resnet50"
            and config.get("n_tasks") == 10 and config.get("epochs") == 200
            and config.get("image_size") in (None, 224))


def accuracy_matrix(run: Run, protocol: str | None = None, who: str = "student") -> np.ndarray:
    """R[i, j] = accuracy (%) on task j's classes after training task i, for the rows measured.

    An unfinished run has fewer rows than tasks; the matrix then keeps every column (the plots
    show what exists) and `summary_metrics` uses its square part.
    """
    protocol = protocol or run.protocol(who)
    if protocol is None or (protocol, who) not in run.accuracy:
        raise DataError(f"{run.path} has no eval/acc_{protocol or '<protocol>'}_{who}.csv; train "
                        f"with eval_each_task=knn|probe|both (and eval_teacher for the teacher)")
    frame = run.accuracy[(protocol, who)]
    task_cols = sorted((c for c in frame.columns if c.startswith("task_")), key=lambda c: int(c[5:]))
    return frame[task_cols].to_numpy(dtype=np.float64)


def summary_metrics(R: np.ndarray, all_learned: bool = False) -> dict[str, float]:
    """Average accuracy, average forgetting and BWT of the measured square part of `R`.

    Forgetting and BWT need two tasks; with one they are NaN rather than an error, because a
    one-task run is still a valid row of the results table. `all_learned` is for Joint, which
    trains every task's classes at once: its average accuracy is the mean over all tasks of the
    last row, and forgetting does not apply.
    """
    if all_learned:
        return {"avg_acc": float(R[-1].mean()), "avg_forgetting": math.nan, "bwt": math.nan}
    t = min(R.shape)
    square = R[:t, :t]
    out = {"avg_acc": metrics.average_accuracy(square)[-1] if t else math.nan,
           "avg_forgetting": math.nan, "bwt": math.nan}
    if t >= 2:
        out["avg_forgetting"] = metrics.average_forgetting(square)
        out["bwt"] = metrics.backward_transfer(square)
    return out


def _top1(run: Run, who: str) -> float:
    result = run.lincls.get(who)
    return float(result["top1"]) if result and result.get("top1") is not None else math.nan


def final_knn(run: Run, who: str = "student") -> float:
    """All-class kNN accuracy (%) of the final encoder: the `all` column of the kNN matrix's last
    row (the untrained baseline's only row), NaN when kNN was not measured."""
    frame = run.accuracy.get(("knn", who))
    return float(frame["all"].iloc[-1]) if frame is not None and len(frame) else math.nan


def chance_loss(config: dict[str, Any]) -> float:
    """ln(K + 1): the InfoNCE loss of an encoder that cannot tell the positive key from the K
    queued negatives. A MoCo loss that stays there learned nothing."""
    k = config.get("moco_k")
    return math.log(k + 1) if k else math.nan


def final_moco_loss(run: Run) -> float:
    """Mean MoCo loss over the logged steps of the run's last epoch (NaN without a train log)."""
    log = run.train_log
    if log.empty or "loss_moco" not in log:
        return math.nan
    last = log[log["task"] == log["task"].max()]
    return float(last[last["epoch"] == last["epoch"].max()]["loss_moco"].mean())


def results_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run (dataset, method, seed): final linear top-1 of student and teacher, the
    continual metrics of the per-task accuracy matrix, the final all-class kNN accuracy, the
    final MoCo loss beside its chance level ln(K+1), and the published ImageNet-Sub numbers.

    The published numbers sit in every row as a reference, and `paper_setting` says whether this
    row's setting is the paper's ("same") or not, so nobody compares 32-px digits to ImageNet by
    accident.
    """
    rows = []
    for run in runs:
        protocol = run.protocol("student")
        summary = (summary_metrics(accuracy_matrix(run, protocol), run.method in ALL_AT_ONCE)
                   if protocol else {"avg_acc": math.nan, "avg_forgetting": math.nan, "bwt": math.nan})
        same = matches_paper_setting(run.config)
        rows.append({
            "dataset": run.dataset, "method": run.method, "seed": run.config.get("seed"),
            "tasks": run.config.get("n_tasks"), "epochs": run.config.get("epochs"),
            "arch": run.config.get("arch"), "image_size": run.config.get("image_size"),
            "state": run.status.get("state"),
            "linear_top1_student": _top1(run, "student"),
            "linear_top1_teacher": _top1(run, "teacher"),
            "linear_protocol": run.lincls.get("student", {}).get("protocol"),
            "per_task_protocol": protocol,
            "avg_acc": summary["avg_acc"], "avg_forgetting": summary["avg_forgetting"],
            "bwt": summary["bwt"], "final_knn": final_knn(run),
            "final_loss_moco": final_moco_loss(run), "chance_loss": chance_loss(run.config),
            "paper_top1": PAPER_TOP1.get(run.method, math.nan),
            "authors_code_top1": AUTHORS_CODE_TOP1.get(run.method, math.nan),
            "paper_setting": "same" if same else f"different (paper: {PAPER_SETTING})",
        })
    return pd.DataFrame(rows)


def _short_protocol(protocol: Any) -> str:
    text = "" if protocol is None or (isinstance(protocol, float) and math.isnan(protocol)) else str(protocol)
    return "probe" if text.startswith("probe") else ("lincls" if text else "-")


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The per-(method, seed) results for reading: short headings, the linear protocol in one
    word, and the published numbers' columns titled with whether they are comparable.
    `results.csv` keeps the full columns."""
    same = bool(len(table)) and (table["paper_setting"] == "same").all()
    where = "same setting" if same else "ImageNet-Sub R50, different setting"
    return pd.DataFrame({
        "dataset": table["dataset"], "method": table["method"], "seed": table["seed"],
        "tasks": table["tasks"], "epochs/task": table["epochs"], "state": table["state"],
        "final eval": table["linear_protocol"].map(_short_protocol),
        "student top-1": table["linear_top1_student"], "teacher top-1": table["linear_top1_teacher"],
        "final kNN (all classes)": table["final_knn"],
        f"avg acc ({'/'.join(sorted(set(table['per_task_protocol'].dropna())))})": table["avg_acc"],
        "avg forgetting": table["avg_forgetting"], "BWT": table["bwt"],
        "final MoCo loss": table["final_loss_moco"], "ln(K+1)": table["chance_loss"],
        f"paper top-1 ({where})": table["paper_top1"],
        f"authors' code top-1 ({where})": table["authors_code_top1"],
    })


def display_summary(summary: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The per-method summary for reading: every metric as `mean ± sd [min, max]` over seeds
    (`cclnb.aggregate.summary_table`), n seeds, the chance loss, and the paper's number."""
    from cclnb.aggregate import mean_spread_text

    def cell(row: pd.Series, metric: str) -> str:
        if f"{metric}_mean" not in row:
            return "-"
        return mean_spread_text(row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_min"],
                                row[f"{metric}_max"], int(row["n"]))

    chance = table.groupby("method")["chance_loss"].first()
    columns = [("linear_top1_student", "student top-1"), ("linear_top1_teacher", "teacher top-1"),
               ("final_knn", "final kNN (all classes)"), ("avg_acc", "avg acc"),
               ("avg_forgetting", "avg forgetting"), ("bwt", "BWT"),
               ("final_loss_moco", "final MoCo loss")]
    rows = []
    for _, row in summary.iterrows():
        out = {"method": row["method"], "n seeds": int(row["n"]), "seeds": row["seeds"]}
        out.update({name: cell(row, metric) for metric, name in columns})
        out["ln(K+1)"] = f"{chance.get(row['method'], math.nan):.2f}"
        paper = PAPER_TOP1.get(row["method"])
        out["paper top-1"] = "-" if paper is None else f"{paper:.2f}"
        rows.append(out)
    return pd.DataFrame(rows)


def write_results(table: pd.DataFrame, summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """results.csv (one row per method and seed, `results_table`) and summary.csv (one row per
    method, `cclnb.aggregate.summary_table`) in `out_dir`. The accuracy matrices themselves are in
    the study's records."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.csv", out / "summary.csv"]
    for frame, path in zip((table, summary), written):
        frame.to_csv(path, index=False, float_format="%.4f")
    return written


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
        ax.set_title(f"{label} - {members[0].protocol(who)}{_seeds_note(members)}")
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
        ax.set_title(f"{label} - {members[0].protocol(who)}{mean}{_seeds_note(members)}")
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after task")
    fig.suptitle(f"Accuracy matrices ({who}, %)")
    return fig


def _task_starts(log: pd.DataFrame) -> list[int]:
    firsts = log.groupby("task")["global_step"].min()
    return [int(s) for s in firsts.iloc[1:]]


def plot_loss_curves(runs: Sequence[Run], smooth: int = 5) -> Figure:
    """Training loss per method (total and its MoCo / extra-queue / distillation parts; the mean
    over seeds at each logged step), task boundaries dashed, smoothed by a rolling mean over
    `smooth` logged points, and the chance level ln(K+1) of the MoCo loss as a red dotted line:
    a MoCo loss that stays at that line means the encoder learned nothing."""
    groups = [(label, members) for label, members in group_runs(runs)
              if any(not r.train_log.empty for r in members)]
    if not groups:
        raise DataError("none of the runs has a train_log.csv with rows yet")
    fig, axes = _panel_grid(len(groups))
    parts = [("loss", "total"), ("loss_moco", "MoCo"), ("loss_extra", "extra queue"),
             ("loss_distill", "distillation")]
    for (label, members), ax in zip(groups, axes):
        log = (pd.concat([r.train_log for r in members if not r.train_log.empty])
               .groupby("global_step", as_index=False).mean(numeric_only=True))
        for column, name in parts:
            if column in log and log[column].notna().any() and (column == "loss" or log[column].abs().sum() > 0):
                ax.plot(log["global_step"], log[column].rolling(smooth, min_periods=1).mean(),
                        label=name, lw=1.2)
        chance = chance_loss(members[0].config)
        if math.isfinite(chance):
            ax.axhline(chance, color="tab:red", ls=":", lw=1.2, label=f"ln(K+1) = {chance:.2f}")
        for step in _task_starts(log):
            ax.axvline(step, color="grey", lw=0.6, ls="--")
        ax.set_title(f"{label}{' (mean' + _seeds_note(members) + ')' if len(members) > 1 else ''}")
        ax.set_xlabel("step (dashed: new task)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Training loss (red dotted: ln(K+1), what a MoCo loss that learns nothing stays at)")
    return fig


def throughput_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Median training throughput and wall time per run, from train_log.csv."""
    rows = []
    for run in runs:
        log = run.train_log
        has = not log.empty and "img_per_s" in log
        rows.append({"dataset": run.dataset, "method": run.method,
                     "median_img_per_s": float(log["img_per_s"].median()) if has else math.nan,
                     "steps": int(log["global_step"].max()) if has else 0,
                     "train_time_s": float(log["time_s"].max()) if has and "time_s" in log else math.nan})
    return pd.DataFrame(rows)


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


def images_seen(runs: Sequence[Run], method: str = "Finetuning") -> float:
    """Images one run of `method` trained on (optimizer steps x batch), the median over its runs:
    the x of a study on the budget axis (every method of a study takes the same number of steps)."""
    seen = [float(r.train_log["global_step"].max()) * int(r.config["batch_size"])
            for r in runs if r.method == method and not r.train_log.empty]
    return float(np.median(seen)) if seen else math.nan


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


def lincls_curve(result: dict[str, Any]) -> pd.DataFrame:
    """The per-epoch curve of a lincls JSON as a frame with an `epoch` column.

    The curve is a list of per-epoch records (dicts) or of top-1 values; both are accepted so
    the notebook shows whatever the evaluation recorded.
    """
    curve = result.get("curve") or []
    if curve and not isinstance(curve[0], dict):
        curve = [{"top1": v} for v in curve]
    frame = pd.DataFrame(curve)
    if not frame.empty and "epoch" not in frame:
        frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    return frame


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
                    _draw_lincls(ax, frame, f"seed {_seed(run)} {who}" if len(members) > 1 else who)
        ax.set_title(label)
    fig.suptitle("Linear evaluation curves")
    return fig


def device_label(hardware: dict[str, Any]) -> str:
    """The GPUs a run used, else `<CPU model> xN` (`CPU xN` for records that predate the model):
    numbers from different devices, even two x86 CPUs, are not comparable."""
    gpus = hardware.get("gpus")
    return ", ".join(gpus) if gpus else f"{hardware.get('cpu_model') or 'CPU'} x{hardware.get('cpu_count', '?')}"


def provenance_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Where each number came from: commit, versions, hardware, start, state and wall time."""
    rows = []
    for run, times in zip(runs, throughput_table(runs).itertuples()):
        versions = run.config.get("versions") or {}
        rows.append({
            "dataset": run.dataset, "method": run.method, "source": str(run.path),
            "git_commit": short_commit(run.config.get("git_commit")),
            "started": run.config.get("started"), "state": run.status.get("state"),
            "train_time_min": times.train_time_s / 60,
            "hardware": device_label(run.config.get("hardware") or {}),
            "torch": versions.get("torch"), "precision": run.config.get("precision"),
            "seed": run.config.get("seed"),
        })
    return pd.DataFrame(rows)


def config_table(runs: Sequence[Run]) -> pd.DataFrame:
    """The resolved config of every method side by side (one column per method, from its first
    seed: the seeds of a method differ only in the seed), so differences in settings between
    methods are visible; nested provenance fields are left to `provenance_table`."""
    skip = {"versions", "hardware", "git_commit", "started", "seed", "run_dir"}
    columns = {label: {k: (json.dumps(v) if isinstance(v, (list, dict)) else v)
                       for k, v in members[0].config.items() if k not in skip}
               for label, members in group_runs(runs)}
    return pd.DataFrame(columns)


def limits_note(runs: Sequence[Run]) -> str:
    """Markdown: what these numbers are not, stated with the settings actually used."""
    lines = ["**Honest limits of these numbers**", ""]
    for dataset in sorted({r.dataset for r in runs}):
        group = [r for r in runs if r.dataset == dataset]
        cfg = group[0].config
        lines.append(f"- `{dataset}`: {cfg.get('arch')} at {cfg.get('image_size') or 'native'} px, "
                     f"{cfg.get('n_tasks')} tasks, {cfg.get('epochs')} epochs per task, "
                     f"MoCo queue {cfg.get('moco_k')}, batch {cfg.get('batch_size')}.")
        if dataset.startswith("tiny-imagenet-32"):
            lines.append("  Tiny-ImageNet downsampled to 32 px is not ImageNet-Sub at 224 px: "
                         "absolute accuracies are far lower and not comparable to the paper's; "
                         "only the ranking of methods is.")
        if dataset == "demo-digits":
            lines.append("  The demo uses scikit-learn's 8x8 digits upscaled to 32 px, a tiny "
                         "backbone budget and a fast feature probe: it shows the pipeline works; "
                         "an untrained encoder already separates these digits well, so compare "
                         "every method with the untrained rows before reading the ranking.")
        if dataset == "demo-shapes":
            lines.append("  The demo uses shapes and textures drawn at 16 px (docs/data.md), an eighth-width "
                         "ResNet-18, a few hundred steps per run and a fast feature probe: it shows the "
                         "pipeline and what the methods do at a toy scale, not evidence about the paper's "
                         "setting; compare every method with the untrained rows.")
    if not any(matches_paper_setting(r.config) for r in runs):
        lines.append(f"- No run uses the paper's setting ({PAPER_SETTING}); the paper's numbers "
                     f"are shown as a reference for a different setting only.")
    if any(not r.complete for r in runs):
        lines.append("- Some runs are not complete (see `state`): their metrics cover the tasks "
                     "finished so far.")
    seeds = [len(members) for _, members in group_runs(runs) if members[0].method not in BASELINES]
    if seeds and max(seeds) < 2:
        lines.append("- One seed per method: differences of a point or two are within run-to-run "
                     "noise unless repeated with other seeds (`cclnb study --seeds 0 1 2`).")
    elif seeds:
        lines.append(f"- {min(seeds)} to {max(seeds)} seeds per method: the spread shown is between "
                     f"seeds on these machines; a gap is called resolved only when it exceeds twice "
                     f"that spread.")
    lines.append("- Final linear top-1 is the last epoch's (the authors report the best epoch, "
                 "chosen on the validation set).")
    return "\n".join(lines)


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
    from cclnb.augment import IMAGENET_MEAN, IMAGENET_STD

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
