"""Read run directories (or records) into `Run`s and tabulate them with pandas.

The report notebook and the task-sequence notebook only orchestrate: everything they show comes
from the functions here and in `cclnb.study.figures`, so it is tested once and looks the same
everywhere. This module reads the run-directory contract (docs/architecture.md, "Run directory")
and never trains or evaluates, so a report can be rebuilt at any time from what the runs left
behind.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from cclnb.errors import DataError
from cclnb.evaluate import metrics
from cclnb.study.notebooks import REPO_ROOT
from cclnb.training.runs import short_commit

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
        raise DataError(f"{path} is not valid JSON ({error}); the run "
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
    order = {m: i for i, m in enumerate((*study_methods(), *BASELINES))}
    return sorted(runs, key=lambda r: (r.dataset, order.get(r.method, len(order)),
                                       seed_of(r), str(r.path)))


def study_methods() -> tuple[str, ...]:
    """Every registered method and variant, in the registry's order (the paper's first)."""
    from cclnb.training.methods.registry import study_methods as registered

    return registered()


def seed_of(run: Run) -> int:
    """The run's seed (-1 when its config has none), to order and label the seeds of a method."""
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


def seeds_note(members: Sequence[Run]) -> str:
    """", N seeds" for a title when a group averages several seeds, else nothing."""
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
    if config.get("classes"):
        return f"{name}-classes{config['classes']}"
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
    (`cclnb.study.aggregate.summary_table`), n seeds, the chance loss, and the paper's number."""
    from cclnb.study.aggregate import mean_spread_text

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
    method, `cclnb.study.aggregate.summary_table`) in `out_dir`. The accuracy matrices themselves are in
    the study's records."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.csv", out / "summary.csv"]
    for frame, path in zip((table, summary), written):
        frame.to_csv(path, index=False, float_format="%.4f")
    return written

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

def images_seen(runs: Sequence[Run], method: str = "Finetuning") -> float:
    """Images one run of `method` trained on (optimizer steps x batch), the median over its runs:
    the x of a study on the budget axis (every method of a study takes the same number of steps)."""
    seen = [float(r.train_log["global_step"].max()) * int(r.config["batch_size"])
            for r in runs if r.method == method and not r.train_log.empty]
    return float(np.median(seen)) if seen else math.nan

def epochs_per_task(runs: Sequence[Run]) -> float:
    """The epochs per task the study's runs trained (their median): a budget's name on the page."""
    values = [float(r.config["epochs"]) for r in runs if "epochs" in r.config]
    return float(np.median(values)) if values else math.nan


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

def device_label(hardware: dict[str, Any]) -> str:
    """The GPUs a run used, else `<CPU model> xN` (`CPU xN` for records that predate the model),
    marked where the CPU emulated bf16 (records since 2026-12-08 say): numbers from different
    devices, even two x86 CPUs, are not comparable."""
    gpus = hardware.get("gpus")
    if gpus:
        return ", ".join(gpus)
    emulated = " (bf16 emulated)" if str(hardware.get("cpu_bf16", "")).startswith("emulated") else ""
    return f"{hardware.get('cpu_model') or 'CPU'} x{hardware.get('cpu_count', '?')}{emulated}"


def shown_path(path: str | Path) -> str:
    """`path` relative to the repository when it lies inside it, else as given: a committed report
    names the repository's folders, not those of the machine that rendered it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def provenance_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Where each number came from: commit, versions, hardware, start, state and wall time."""
    rows = []
    for run, times in zip(runs, throughput_table(runs).itertuples()):
        versions = run.config.get("versions") or {}
        rows.append({
            "dataset": run.dataset, "method": run.method, "source": shown_path(run.path),
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
            lines.append("  The demo uses shapes and textures drawn at 32 px (docs/data.md), an eighth-width "
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
