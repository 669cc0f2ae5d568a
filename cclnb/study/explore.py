"""What `notebooks/explore.ipynb` shows, computed here so that it is tested once.

The exploration notebook is for a person in JupyterLab: it finds the newest study's runs, shows
how the classes were split into tasks, what the MoCo v2 views look like, which images CCL kept
for replay next to SimpleReplay's random draw, and how a run's encoder embeds the validation set.
Everything reads a run directory (or, without one, the data and an untrained encoder), so the
notebook never trains. `browse` adds ipywidgets controls around a figure in the lab and falls back
to the plain figure under papermill and in the HTML export, where widgets cannot run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from sklearn.decomposition import PCA

from cclnb.config import TrainConfig
from cclnb.data import ImageDataset, load_uint8, open_run_data
from cclnb.data.augment import BatchMoCoV2Augment, normalize_uint8
from cclnb.errors import CclnbError, DataError
from cclnb.evaluate import extract_features
from cclnb.study import figures
from cclnb.study.notebooks import REPO_ROOT
from cclnb.training import SMALL_IMAGE_MAX, plan_tasks, runs
from cclnb.training.checkpoint import backbone_state_dict
from cclnb.training.methods import registry
from cclnb.training.models import build_backbone
from cclnb.training.replay import select_min_variance, select_random

UNTRAINED = "untrained"  # the encoder choice that needs no run


# ----------------------------------------------------------------------------- which runs
@dataclass(frozen=True)
class StudyRuns:
    """The run directories of one study folder (`runs/<study>/...`, e.g. `CCL/seed0`).

    `dirs` and `configs` map each run's label (its path inside the study folder) to its directory
    and its config.json, in the canonical method order; `newest` is the mtime of the most
    recently started run's config.json.
    """

    name: str
    path: Path
    dirs: dict[str, Path]
    configs: dict[str, dict[str, Any]]
    newest: float

    def run_of(self, method: str, seed: int | None = None) -> Path | None:
        """The run of `method`, preferring the one with `seed`; None when the study has none."""
        labels = [label for label, config in self.configs.items() if config.get("method") == method]
        same_seed = [label for label in labels if self.configs[label].get("seed") == seed]
        chosen = (same_seed or labels)[:1]
        return self.dirs[chosen[0]] if chosen else None

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(str(c.get("method")) for c in self.configs.values()))


def resolve_runs_root(runs_root: str | Path) -> Path:
    """`runs_root` as given when it exists; a relative path that does not exist from the working
    directory is looked up in the checkout. JupyterLab starts a notebook's kernel in the
    notebook's own folder (`notebooks/`), so `runs` must still mean the checkout's `runs/`."""
    path = Path(runs_root)
    if path.is_dir() or path.is_absolute():
        return path
    return REPO_ROOT / path


def find_studies(runs_root: str | Path) -> list[StudyRuns]:
    """Every study folder under `runs_root` (its first-level folders holding run directories at
    any depth), newest first. A run directly under `runs_root` counts as a study of its own."""
    root = resolve_runs_root(runs_root)
    grouped: dict[str, dict[str, Path]] = {}
    for config_path in sorted(root.rglob("config.json")) if root.is_dir() else []:
        parts = config_path.relative_to(root).parts
        if "checkpoints" not in parts:
            grouped.setdefault(parts[0], {})["/".join(parts[1:-1]) or parts[0]] = config_path
    order = {m: i for i, m in enumerate(registry.study_methods())}
    studies = []
    for name, paths in grouped.items():
        configs = {label: runs.read_json(path) for label, path in paths.items()}
        ranked = sorted(configs, key=lambda label: (order.get(configs[label].get("method"), len(order)), label))
        studies.append(StudyRuns(name, root / name, {label: paths[label].parent for label in ranked},
                                 {label: configs[label] for label in ranked},
                                 max(path.stat().st_mtime for path in paths.values())))
    return sorted(studies, key=lambda s: s.newest, reverse=True)


def pick_study(runs_root: str | Path, study: str = "") -> StudyRuns | None:
    """The study called `study` (or the newest when empty); None when there are no runs at all.
    A name that does not exist is an error listing the ones that do."""
    studies = find_studies(runs_root)
    if not study:
        return studies[0] if studies else None
    named = [s for s in studies if s.name == study]
    if not named:
        found = ", ".join(s.name for s in studies) or "none"
        raise DataError(f"no study {study!r} under {resolve_runs_root(runs_root)} (found: {found}); "
                        f"run `cclnb study --preset {study}` first, or pass an empty study for the newest")
    return named[0]


def run_label(run_dir: str | Path) -> str:
    """A short name for a run in titles: its method and seed (from config.json)."""
    if str(run_dir) == UNTRAINED:
        return f"{UNTRAINED} encoder"
    config = runs.read_config(Path(run_dir))
    return f"{config.get('method')} seed {config.get('seed')}"


def run_for(study: StudyRuns | None, method: str) -> str:
    """The run directory of `method` in `study` (its first seed), or "untrained" without a study."""
    if study is None:
        return UNTRAINED
    path = study.run_of(method)
    if path is None:
        raise DataError(f"study {study.name!r} has no {method!r} run (it has {', '.join(study.methods)}); "
                        f"set method to one of those")
    return str(path)


def describe(study: StudyRuns | None, runs_root: str | Path, explorer: "Explorer", run_dir: str) -> str:
    """One Markdown paragraph saying what the notebook is looking at and where it came from."""
    data = (f"`{explorer.train.name}`: {len(explorer.train)} train images, "
            f"{len(explorer.train.classes)} classes in {explorer.n_tasks} tasks, {explorer.image_size} px")
    if study is None:
        return (f"No study runs under `{resolve_runs_root(runs_root)}`, so this shows {data} with an "
                f"**untrained** {explorer.config.arch}. Run `make study` (or `cclnb study`) and rerun "
                f"this notebook to explore trained encoders.")
    return (f"Study **{study.name}** (`{study.path}`), {len(study.configs)} runs: "
            f"{', '.join(study.configs)}. Encoder shown first: **{run_label(run_dir)}**. "
            f"Data {data}.")


def run_choices(studies: Sequence[StudyRuns], explorer: "Explorer") -> list[tuple[str, str]]:
    """(label, run directory) pairs for a run picker: every run on the explorer's data (other
    data would need another task split), newest study first, then a fresh untrained encoder
    (value "untrained")."""
    same = (explorer.config.data, explorer.config.dataset, explorer.config.imagenetsub, explorer.config.classes)
    choices = [(f"{study.name} / {label}", str(study.dirs[label])) for study in studies
               for label, config in study.configs.items()
               if (config.get("data"), config.get("dataset"), config.get("imagenetsub"), config.get("classes")) == same]
    return choices + [(f"{UNTRAINED} encoder (no run)", UNTRAINED)]


@dataclass(frozen=True)
class Picks:
    """The ids one method replays after a task, and where they come from (recorded or computed)."""

    method: str
    ids: np.ndarray
    source: str


# ----------------------------------------------------------------------------- the explorer
@dataclass
class Explorer:
    """One dataset split into tasks as a run saw it, plus cached encoders and val features.

    Build it with `from_run` (the run's own data, class order and task split) or `from_data`
    (a dataset and a task count, the authors' class order). `device` runs the encoders.
    """

    config: TrainConfig
    train: ImageDataset
    task_classes: list[np.ndarray]
    task_ids: list[np.ndarray]
    image_size: int
    device: str = "cpu"
    seed: int = 0
    _encoders: dict[tuple[str, str], torch.nn.Module] = field(default_factory=dict, repr=False)
    _val_features: dict[tuple[str, str, int], np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config: TrainConfig, device: str = "cpu", seed: int = 0) -> "Explorer":
        train = open_run_data(config, "train")
        plan = plan_tasks(config, train.targets, len(train.classes))
        size = config.image_size or (train.image_size if train.image_size and
                                     train.image_size <= SMALL_IMAGE_MAX else 224)
        return cls(config, train, plan.task_classes, plan.task_ids, size, device, seed)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu", seed: int = 0) -> "Explorer":
        """The data, class order, subset and task split recorded in a run's config.json."""
        recorded = runs.read_config(Path(run_dir))
        # the data and the split only: the baseline's method is "untrained", options are the method's
        known = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "method_module", "method_options"}
        return cls.from_config(TrainConfig.from_dict({k: v for k, v in recorded.items() if k in known}),
                               device, seed)

    @classmethod
    def from_data(cls, data: str, dataset: str = "auto", n_tasks: int = 5, arch: str = "resnet18",
                  stem: str = "auto", device: str = "cpu", seed: int = 0) -> "Explorer":
        """No run: the data split the authors' way, and an untrained `arch` as the encoder."""
        return cls.from_config(TrainConfig(data=data, dataset=dataset, n_tasks=n_tasks, arch=arch,
                                           stem=stem), device, seed)

    # ------------------------------------------------------------------ labels and images
    @property
    def n_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def small_images(self) -> bool:
        return self.image_size <= SMALL_IMAGE_MAX

    def class_name(self, label: int) -> str:
        return str(self.train.class_names[label])

    def images(self, ids: np.ndarray) -> np.ndarray:
        return load_uint8(self.train, ids=np.asarray(ids, dtype=np.int64), progress=False)

    def task_options(self) -> list[tuple[str, int]]:
        """(label, task index) pairs for a task picker."""
        return [(f"task {t + 1}", t) for t in range(self.n_tasks)]

    def task_of_class(self) -> dict[int, int]:
        return {int(c): t for t, classes in enumerate(self.task_classes) for c in classes}

    def split_table(self) -> pd.DataFrame:
        """One row per task: its classes (by name) and how many training images it has."""
        return pd.DataFrame({"task": range(1, self.n_tasks + 1),
                             "classes": [", ".join(self.class_name(c) for c in cs) for cs in self.task_classes],
                             "train images": [len(ids) for ids in self.task_ids]}).set_index("task")

    def _examples(self, task: int, n: int) -> np.ndarray:
        """Up to `n` ids of `task`, taking each class in turn so every class shows up."""
        by_class = [self.task_ids[task][self.train.targets[self.task_ids[task]] == c]
                    for c in self.task_classes[task]]
        picked = [ids[i] for i in range(max(map(len, by_class), default=0)) for ids in by_class if i < len(ids)]
        return np.asarray(picked[:n], dtype=np.int64)

    def _titles(self, ids: np.ndarray) -> list[str]:
        return [self.class_name(self.train.targets[i]) for i in ids]

    # ------------------------------------------------------------------ figures
    def task_split_figure(self, per_task: int = 8) -> Figure:
        """Rows = tasks, columns = example images cycling through each task's classes."""
        ids = np.concatenate([self._examples(t, per_task) for t in range(self.n_tasks)])
        rows = [t for t in range(self.n_tasks) for _ in self._examples(t, per_task)]
        titles = [f"T{t + 1}: {name}" for t, name in zip(rows, self._titles(ids))]
        return figures.image_grid(self.images(ids), titles, n_cols=per_task, size=1.1,
                                 title=f"{self.train.name}: {self.n_tasks} tasks (one row each)")

    def views_figure(self, task: int, n_images: int = 8, n_views: int = 3) -> Figure:
        """The images of a task (first row), then `n_views` rows of MoCo v2 views of them, drawn by
        the batched augmentation the trainer uses (seeded, so a figure can be reproduced)."""
        ids = self._examples(task, n_images)
        images = self.images(ids)
        augment = BatchMoCoV2Augment(self.image_size, blur=not self.small_images)
        generator = torch.Generator().manual_seed(self.seed + task)
        views = [figures.denormalize(augment(torch.from_numpy(images), generator=generator))
                 for _ in range(n_views)]
        originals = figures.denormalize(normalize_uint8(torch.from_numpy(images), self.image_size))
        titles = self._titles(ids) + [f"view {v + 1}" for v in range(n_views) for _ in ids]
        return figures.image_grid(np.concatenate([originals, *views]), titles, n_cols=len(ids), size=1.1,
                                 title=f"Task {task + 1}: images, then {n_views} MoCo v2 views")

    def encoder(self, run_dir: str, who: str = "student") -> torch.nn.Module:
        """The backbone of `run_dir`'s last checkpoint (`who`: student or teacher), or an untrained
        one for `run_dir="untrained"`; cached, in eval mode on the explorer's device."""
        key = (str(run_dir), who if run_dir != UNTRAINED else "student")
        if key not in self._encoders:
            config = runs.read_config(Path(run_dir)) if run_dir != UNTRAINED else dataclasses.asdict(self.config)
            torch.manual_seed(self.seed)
            backbone = build_backbone(config["arch"], self.small_images, config.get("stem", "auto"),
                                      config.get("width", 64))
            if run_dir != UNTRAINED:
                if who == "teacher" and not _keeps_teacher(config):
                    raise DataError(f"{run_dir} is a {config.get('method')} run, which keeps no "
                                    f"teacher (CCL does); choose who='student'")
                backbone.load_state_dict(backbone_state_dict(runs.checkpoint_path(Path(run_dir)), who))
            self._encoders[key] = backbone.to(self.device).eval()
        return self._encoders[key]

    def min_variance_picks(self, task: int, run_dir: str, who: str = "student", n_save: int = 4,
                           n_views: int = 6, max_images: int = 2000) -> np.ndarray:
        """CCL's selection computed here with `run_dir`'s encoder over a task's first `max_images`
        images: k-means on the anchor features (k = the task's classes), then per cluster the
        `n_save` images whose features move least across `n_views` MoCo v2 views. Measured on
        backbone features (CCL's own selection uses the projection head) and capped in images so
        it stays interactive on a CPU."""
        ids = self.task_ids[task][:max_images]
        backbone = self.encoder(run_dir, who)
        x = torch.from_numpy(self.images(ids)).to(self.device)
        augment = BatchMoCoV2Augment(self.image_size, blur=not self.small_images)
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + task)
        with torch.no_grad():
            views = [torch.cat([backbone(augment(x[i:i + 256], generator=generator))
                                for i in range(0, len(x), 256)]) for _ in range(n_views)]
        anchor = F.normalize(extract_features(backbone, x, self.device, image_size=self.image_size,
                                              progress=False), dim=1)
        stacked = torch.stack([F.normalize(v, dim=1) for v in views] + [anchor])
        return select_min_variance(stacked, anchor, ids, len(self.task_classes[task]), n_save,
                                   self.seed + task)

    def random_picks(self, task: int, n_save: int = 4) -> np.ndarray:
        """SimpleReplay's draw: `n_save` per class of the task, uniformly, with replacement."""
        n = n_save * len(self.task_classes[task])
        return select_random(self.task_ids[task], n, np.random.default_rng(self.seed + task), True)

    def replay_picks(self, task: int, study: StudyRuns | None, run_dir: str, who: str = "student",
                     n_views: int = 6, max_images: int = 2000) -> list[Picks]:
        """What CCL and SimpleReplay kept at the end of `task`: read from the study's run
        directories (`replay/task_<t>.json`) where they exist, else computed here (CCL's with
        `run_dir`'s encoder) with the study's `n_save` (the explorer's config otherwise)."""
        n_save = self.config.n_save
        seed = self.config.seed
        picks = []
        for method in ("CCL", "SimpleReplay"):
            path = study.run_of(method, seed) if study else None
            record = path / "replay" / f"task_{task}.json" if path else None
            if record is not None and record.is_file():
                payload = runs.read_json(record)
                picks.append(Picks(method, np.asarray(payload["ids"], dtype=np.int64),
                                   f"{payload.get('selection')}, recorded by {run_label(path)}"))
            elif method == "CCL":
                encoder = run_label(run_dir) + ("" if run_dir == UNTRAINED else f" {who}")
                picks.append(Picks(method, self.min_variance_picks(task, run_dir, who, n_save, n_views,
                                                                   max_images),
                                   f"min_var, computed here with the {encoder}"))
            else:
                picks.append(Picks(method, self.random_picks(task, n_save), "random, drawn here"))
        return picks

    def replay_figure(self, task: int, picks: Sequence[Picks], n_cols: int = 10, max_show: int = 30
                      ) -> Figure:
        """Each method's replayed images of a task as its own block of rows (at most `max_show`),
        blank tiles filling a block's last row; the title counts distinct ids, since SimpleReplay
        draws with replacement."""
        blocks, titles = [], []
        for pick in picks:
            shown = pick.ids[:max_show]
            pad = -len(shown) % n_cols
            images = self.images(shown)
            blocks += [images, np.full((pad, *images.shape[1:]), 255, dtype=np.uint8)]
            titles += [f"{pick.method}: {name}" for name in self._titles(shown)] + [""] * pad
        summary = "\n".join(f"{p.method} ({p.source}): {len(p.ids)} ids, {len(np.unique(p.ids))} distinct"
                            + (f", first {max_show} shown" if len(p.ids) > max_show else "") for p in picks)
        return figures.image_grid(np.concatenate(blocks), titles, n_cols=n_cols, size=1.1,
                                 title=f"Task {task + 1} replay picks\n{summary}")

    def val_features(self, run_dir: str, who: str = "student", max_points: int = 2000
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(features, task of each image) of up to `max_points` validation images (a seeded random
        sample), cached per encoder."""
        val = open_run_data(self.config, "val")
        keep = np.sort(np.random.default_rng(self.seed).permutation(len(val))[:max_points])
        task_of = self.task_of_class()
        tasks = np.asarray([task_of.get(int(y), -1) for y in val.targets[keep]])
        key = (str(run_dir), who, max_points)
        if key not in self._val_features:
            images = load_uint8(val, ids=keep, progress=False)
            feats = extract_features(self.encoder(run_dir, who), images, self.device,
                                     image_size=self.image_size, progress=False)
            self._val_features[key] = feats.cpu().numpy()
        return self._val_features[key], tasks

    def embedding_figure(self, run_dir: str, who: str = "student", max_points: int = 2000) -> Figure:
        """PCA to 2-D of the encoder's L2-normalized validation features (the cosine geometry the
        contrastive loss and the kNN use; raw features of an untrained net are dominated by a few
        huge activations), coloured by the task of each class."""
        feats, tasks = self.val_features(run_dir, who, max_points)
        unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        points = PCA(n_components=2, random_state=self.seed).fit_transform(unit)
        name = run_label(run_dir) + ("" if run_dir == UNTRAINED else f" ({who})")
        return figures.plot_embedding(points, tasks, title=f"PCA of {name} features (L2-normalized): "
                                                          f"{len(feats)} val images")


# ----------------------------------------------------------------------------- browsing
def browse(render: Callable[..., Figure], interactive: bool,
           **controls: tuple[Any, Sequence[Any]]) -> Any:
    """What a cell shows for `render(**values)`; each control is `name=(value, options)`, options
    being values or (label, value) pairs.

    interactive=False: the figure for the given values, an ordinary cell output that papermill
    keeps and the HTML export embeds. interactive=True: an ipywidgets box, one dropdown per
    control above an Output that is redrawn when a dropdown changes; only a live kernel with a
    widget-aware front end (JupyterLab) can show it, so batch runs pass interactive=False. A
    choice that cannot be drawn (a CclnbError) shows its message instead of a traceback.
    """
    if not interactive:
        return render(**{name: value for name, (value, _) in controls.items()})
    import ipywidgets as widgets
    from IPython.display import Markdown, display

    pickers = {name: widgets.Dropdown(options=list(options), value=value, description=name)
               for name, (value, options) in controls.items()}
    out = widgets.Output()

    def redraw(_: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            try:
                display(render(**{name: picker.value for name, picker in pickers.items()}))
            except CclnbError as error:
                display(Markdown(f"**{type(error).__name__}**: {error}"))

    for picker in pickers.values():
        picker.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(pickers.values())), out])


def _keeps_teacher(config: dict) -> bool:
    """Whether the run a config.json describes kept a teacher (its method says so)."""
    try:
        return registry.method_class(str(config.get("method"))).keeps_teacher
    except CclnbError:
        return False


# ----------------------------------------------------------------------------- a running study's curves
def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV a running run may be appending to: a torn last line is skipped, an absent file is empty."""
    try:
        return pd.read_csv(path, on_bad_lines="skip")
    except (OSError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def study_curves(study: StudyRuns, protocol: str = "knn") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every run's training log (one row per epoch: the epoch's mean once it ended, its newest row
    while it runs) and its per-task `protocol` accuracy of the student after each task, as far as
    the files are written now; both with the run's `run` label, `method` and `seed`."""
    logs, accuracies = [], []
    for label, run_dir in study.dirs.items():
        config = study.configs[label]
        who = {"run": label, "method": config.get("method"), "seed": config.get("seed")}
        log = _read_csv(run_dir / "train_log.csv")
        if not log.empty and {"task", "epoch", "global_step"} <= set(log.columns):
            logs.append(log.groupby(["task", "epoch"], as_index=False).last().assign(**who))
        accuracy = _read_csv(runs.accuracy_path(run_dir, protocol, "student"))
        if not accuracy.empty and "after_task" in accuracy.columns:
            accuracies.append(accuracy.assign(**who))
    return (pd.concat(logs, ignore_index=True) if logs else pd.DataFrame(),
            pd.concat(accuracies, ignore_index=True) if accuracies else pd.DataFrame())


def curves_figure(study: StudyRuns, protocol: str | None = None) -> Figure:
    """A study's curves while it trains, from its CSV files: the MoCo loss and img/s per epoch
    against the training step, and the per-task `protocol` accuracy (default: the one the runs
    measure, kNN when both) on all classes after each task; one line per run, a colour per
    method. Call it again to see the newest epochs; before any has ended, the axes are empty and
    the title says so."""
    measured = next(iter(study.configs.values()), {}).get("eval_each_task", "knn")
    protocol = protocol or ("probe" if measured == "probe" else "knn")
    log, accuracy = study_curves(study, protocol)
    methods = list(dict.fromkeys(log["method"])) if not log.empty else []
    colours = dict(zip(methods, sns.color_palette("deep", len(methods))))
    fig = Figure(figsize=(15, 3.8), layout="constrained")
    loss_ax, accuracy_ax, speed_ax = fig.subplots(1, 3)
    for _, rows in (log.groupby("run", sort=False) if not log.empty else []):
        method = rows["method"].iloc[0]
        loss_ax.plot(rows["global_step"], rows["loss_moco"], color=colours[method], lw=1.2, alpha=0.85)
        speed = rows[rows["img_per_s"] > 0]
        speed_ax.plot(speed["global_step"], speed["img_per_s"], color=colours[method], lw=1, alpha=0.85)
    for _, rows in (accuracy.groupby("run", sort=False) if not accuracy.empty else []):
        accuracy_ax.plot(rows["after_task"], rows["all"], "-o", ms=3, color=colours.get(rows["method"].iloc[0]),
                         lw=1.2, alpha=0.85)
    accuracy_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    name = {"knn": "kNN", "probe": "probe"}.get(protocol, protocol)
    for ax, title, x, y in ((loss_ax, "MoCo loss (epoch mean)", "step", "loss"),
                            (accuracy_ax, f"{name} accuracy of the student, all classes", "after task", "%"),
                            (speed_ax, "throughput", "step", "img/s")):
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    if log.empty:
        fig.suptitle(f"Study {study.name!r}: no run has logged a training row yet; run this again once "
                     f"its first epoch has passed")
        return fig
    loss_ax.legend(handles=[Line2D([], [], color=colours[m], label=f"{m} ({log[log['method'] == m]['run'].nunique()} "
                                   f"runs)") for m in methods], fontsize=7)
    fig.suptitle(f"Study {study.name!r} as its files say now: {log['run'].nunique()} runs have trained so far "
                 f"(one line per run)")
    return fig
