"""The study's presets: which methods and seeds, on which data, with which notebook parameters.

A preset is a named, committed experiment (`demo`, `tin100-32-cpu`, `imagenet-sub`, ...); `-p`
overrides change one call of it, never the preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from cclnb.errors import ConfigError
from cclnb.study.notebooks import NOTEBOOKS, REPO_ROOT


def shared_data(filename: str) -> str | None:
    """`../shared/data/<filename>` relative to the repository when it exists, else None."""
    path = REPO_ROOT.parent / "shared" / "data" / filename
    return str(path) if path.exists() else None


# The paper's comparison. A preset lists its methods: registering a method changes no study.
PAPER_METHODS = ("Finetuning", "SimpleReplay", "CCL", "Joint")


@dataclass(frozen=True)
class Preset:
    """A named study: which methods, and the notebook parameters every method shares.

    `task_sequence` / `linear_eval` / `report` hold parameter values for those notebooks (names
    must exist in the notebook's `parameters` cell; `test_study` checks). `data_hint` is what the
    error says when the preset's data is not on this machine. `jobs`: how many (method, seed)
    runs proceed at once, each notebook in its own process (one GPU holds several small runs; on
    a small CPU two processes hide each other's kernel start-up). `seeds`: every method runs once
    per seed (`--seeds` overrides). `threads`: CPU threads of every step, pinned (OMP_NUM_THREADS of
    each notebook's process, and torch's for the in-process steps) whatever the machine's core
    count or the caller's environment; None divides the cores among the jobs. A CPU study whose
    numbers must repeat pins it: a bf16 convolution's gradient differs in its last bits between 1
    and 2 threads, and a few hundred steps turn that into different accuracies. `inline_probe`:
    with the probe protocol, each linear evaluation runs in the study's own process (its result
    line in `linear_eval_<who>.log`) instead of a notebook; for presets whose probe takes about a
    second, where a notebook's kernel start and imports take about nine (the demo: 18 of them).
    """

    name: str
    description: str
    task_sequence: Mapping[str, Any]
    linear_eval: Mapping[str, Any]
    methods: tuple[str, ...]          # which methods a study of it runs (`--methods` overrides)
    report: Mapping[str, Any] = field(default_factory=dict)
    data_hint: str = ""
    jobs: int = 1
    seeds: tuple[int, ...] = (0,)
    threads: int | None = None
    inline_probe: bool = False

    def parameters(self, notebook: str) -> dict[str, Any]:
        return dict(getattr(self, notebook))


# MoCo v2 with the authors' flags (mlp, aug_plus, cos, T=0.2) unless a preset says otherwise.
_MOCO_V2 = {"mlp": True, "aug_plus": True, "cos": True, "moco_t": 0.2, "lr": 0.03, "n_save": 20}
# The 32 px GPU studies: 10 tasks, ResNet-18 with the CIFAR stem, a queue sized for 5,000-image
# tasks (65,536 keys would hold every image of a task many times), bf16, per-task kNN.
_GPU_32PX = {**_MOCO_V2, "n_tasks": 10, "epochs": 50, "arch": "resnet18", "stem": "cifar",
             "image_size": 32, "batch_size": 256, "moco_k": 4096, "precision": "bf16",
             "device": "cuda", "eval_each_task": "knn", "eval_teacher": True}
_GPU_LINCLS = {"protocol": "lincls", "epochs": 100, "device": "cuda", "precision": "bf16"}

# What the two CPU presets on Tiny-ImageNet-32 sub100 share (their network differs): the 10-task
# split on 250 images per class, 8 epochs per task, batch 64 in 2 BatchNorm groups, key momentum
# 0.99, a queue of 1024, bf16 pinned, per-task kNN on 50 train images per class.
_CPU_TIN100 = {**_MOCO_V2, "dataset": "zip", "data": shared_data("tiny-imagenet-32-sub100.zip"),
               "subset_per_class": 250, "n_tasks": 10, "epochs": 8, "arch": "resnet18", "image_size": 32,
               "batch_size": 64, "lr": 0.015, "moco_m": 0.99, "moco_k": 1024, "ccl_k": 256, "bn_groups": 2,
               "key_bn_groups": 2, "device": "cpu", "precision": "bf16", "eval_each_task": "knn",
               "eval_teacher": True, "eval_bank_per_class": 50, "knn_k": 20}
_CPU_LINCLS = {"protocol": "probe", "epochs": 100, "device": "cpu", "workers": 0}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        name="demo",
        description="embedded shapes (10 classes, 32 px), 5 tasks of 2 classes, CPU, ResNet-18 at "
                    "an eighth of its width with the 3x3 stem, bf16, fast feature probe, 3 seeds: "
                    "minutes on 2 cores",
        # Chosen by measurement on this project's 2-core CPU (docs/study.md, "The demo preset"):
        # the shapes (cclnb/data/shapes.py), 32 px: random features score about 30% kNN there and
        # MoCo learns form within a few hundred steps; the 3x3 stem keeps every pixel and an eighth
        # of the channels keeps a step cheap; batch 32 = one of the authors' GPUs (query BatchNorm
        # over the 32, keys shuffled over 2 groups of 16), key momentum 0.99 so the key encoder
        # follows within a task of ~50 steps, lr 0.1, a queue of 64, 4 epochs per task. Both
        # precisions and one thread per job are pinned: the numbers then repeat to the last digit
        # on one machine.
        task_sequence={**_MOCO_V2, "dataset": "demo", "data": "demo", "n_tasks": 5, "epochs": 4,
                       "arch": "resnet18", "stem": "cifar", "width": 8, "image_size": 32,
                       "batch_size": 32, "lr": 0.1, "bn_groups": 1, "key_bn_groups": 2, "moco_m": 0.99,
                       "moco_k": 64, "ccl_k": 32, "device": "cpu", "precision": "bf16",
                       "eval_each_task": "knn", "eval_teacher": True, "eval_bank_per_class": 50,
                       "knn_k": 20},
        methods=PAPER_METHODS,
        linear_eval={"protocol": "probe", "epochs": 50, "device": "cpu", "precision": "bf16", "workers": 0},
        report={"title": "cclnb demo study: continual MoCo v2 on embedded shapes"},
        seeds=(0, 1, 2), jobs=2, threads=1, inline_probe=True),
    Preset(
        name="tin100-32",
        description="Tiny-ImageNet-32 sub100 (100 classes), 10 tasks, ResNet-18 at 32 px, "
                    "MoCo queue 4096, bf16 on one GPU (set -p epochs=N)",
        task_sequence={**_GPU_32PX, "dataset": "zip",
                       "data": shared_data("tiny-imagenet-32-sub100.zip")},
        methods=PAPER_METHODS,
        linear_eval=_GPU_LINCLS,
        report={"title": "Continual MoCo v2 on Tiny-ImageNet-32 (100 classes, 10 tasks)"},
        data_hint="tiny-imagenet-32-sub100.zip (ImageNet folder layout inside the zip)",
        jobs=4),
    Preset(
        name="tin100-32-cpu",
        description="Tiny-ImageNet-32 sub100 (100 classes, 250 train images per class), 10 tasks, "
                    "ResNet-18 with the ImageNet stem at 32 px, bf16 (pinned: its records are bf16), 8 epochs per task, "
                    "2 seeds: about 33 minutes per seed on 2 AMD EPYC cores (2 Intel Xeon cores: about 3x longer)",
        # Sized for this project's 2-core CPU (docs/study.md, "The CPU preset"): the ImageNet stem
        # (7x the 3x3 stem's speed at 32 px), key momentum 0.99 (0.999 leaves the MoCo loss at
        # ln(K+1) over a few hundred steps per task), batch 64 in 2 BatchNorm groups of 32 (the
        # authors' per-GPU size), a queue of 1024, 8 epochs per task (4 left Finetuning at 1.36x
        # the untrained-bn kNN, 8 reach 1.58x), per-task kNN on 50 train images per class (k 20),
        # the fast probe at the end.
        task_sequence={**_CPU_TIN100, "stem": "imagenet"},
        methods=PAPER_METHODS,
        linear_eval=_CPU_LINCLS,
        report={"title": "Continual MoCo v2 on Tiny-ImageNet-32 sub100, CPU budget (10 tasks)"},
        data_hint="tiny-imagenet-32-sub100.zip (ImageNet folder layout inside the zip)",
        seeds=(0, 1), jobs=2),
    Preset(
        name="tin100-32-cpu-w16",
        description="Tiny-ImageNet-32 sub100 (100 classes, 250 train images per class), 10 tasks, "
                    "a quarter-width ResNet-18 (16-32-64-128 channels) with the 3x3 stem at full "
                    "resolution, bf16, 8 epochs per task, 5 seeds; with CaSSLe and LUMP beside the paper's "
                    "methods; CCL's ablations available as methods",
        # Chosen from benchmarks/cpu-candidates.md (issue 19): on the first 3 tasks at the same images
        # seen, the quarter-width network that keeps every pixel ends far above the ImageNet stem's
        # 8 px view (Finetuning kNN 14.1 against 11.8, probe 11.4 against 8.4, seed 0) and its
        # training step is faster on these cores. Everything else as tin100-32-cpu (batch 64 in two
        # BatchNorm groups, key momentum 0.99, queue 1024, lr 0.015, 250 images per class, 8 epochs
        # per task); precision pinned to bf16 so that seeds added on another machine are averaged.
        task_sequence={**_CPU_TIN100, "stem": "cifar", "width": 16},
        methods=(*PAPER_METHODS, "CaSSLe", "LUMP"),
        linear_eval=_CPU_LINCLS,
        report={"title": "Continual MoCo v2 on Tiny-ImageNet-32 sub100, CPU budget, quarter-width "
                         "ResNet-18 at full resolution (10 tasks)"},
        data_hint="tiny-imagenet-32-sub100.zip (ImageNet folder layout inside the zip)",
        seeds=(0, 1, 2, 3, 4), jobs=2),
    Preset(
        name="tin100b-32-cpu-w16",
        description="the replication set: Tiny-ImageNet-32 classes 101-200 (the second hundred in sorted wnid "
                    "order, none of them in sub100), otherwise tin100-32-cpu-w16 at 16 epochs per task, "
                    "the paper's methods, 3 seeds",
        # Issue 43: does the one order that holds on sub100 at 16 epochs per task (CCL > SimpleReplay
        # > Finetuning) hold on classes the main study never saw? Same sizes (250 train images per
        # class, 10 tasks of 10 classes) and settings; only the classes differ.
        task_sequence={**_CPU_TIN100, "stem": "cifar", "width": 16, "epochs": 16,
                       "data": shared_data("tiny-imagenet-32.zip"), "classes": "101-200"},
        methods=PAPER_METHODS,
        linear_eval=_CPU_LINCLS,
        report={"title": "Continual MoCo v2 on Tiny-ImageNet-32 classes 101-200 (the replication set), "
                         "CPU budget, quarter-width ResNet-18, 16 epochs per task (10 tasks)"},
        data_hint="tiny-imagenet-32.zip (all 200 classes; the preset keeps classes 101-200)",
        seeds=(0, 1, 2), jobs=2),
    Preset(
        name="tin200-32",
        description="Tiny-ImageNet-32, all 200 classes, 10 tasks of 20, ResNet-18 at 32 px, bf16",
        task_sequence={**_GPU_32PX, "dataset": "zip", "data": shared_data("tiny-imagenet-32.zip")},
        methods=PAPER_METHODS,
        linear_eval=_GPU_LINCLS,
        report={"title": "Continual MoCo v2 on Tiny-ImageNet-32 (200 classes, 10 tasks)"},
        data_hint="tiny-imagenet-32.zip (ImageNet folder layout inside the zip)",
        jobs=4),
    Preset(
        name="imagenet-sub",
        description="the authors' protocol exactly: ImageNet-Sub (classes 0..99), ResNet-50 at "
                    "224 px, 10 tasks, 200 epochs per task, queue 65536, T 0.2, mlp, aug+, cos, "
                    "lr 0.03, batch 256, fp32; lincls 100 epochs",
        task_sequence={**_MOCO_V2, "dataset": "imagefolder", "data": None, "imagenetsub": True,
                       "n_tasks": 10, "epochs": 200, "arch": "resnet50", "stem": "imagenet",
                       "image_size": 224, "batch_size": 256, "moco_k": 65536, "precision": "fp32",
                       "device": "cuda", "eval_each_task": "knn",
                       "eval_teacher": True},
        methods=PAPER_METHODS,
        linear_eval={"protocol": "lincls", "epochs": 100, "device": "cuda", "precision": "fp32"},
        report={"title": "CCL reproduction: ImageNet-Sub, ResNet-50, 10 tasks"},
        data_hint="an ImageNet root holding train/ and val/ class folders"),
    Preset(
        name="cifar100",
        description="CIFAR-100, 10 tasks of 10 classes, ResNet-18 at 32 px, bf16",
        task_sequence={**_GPU_32PX, "dataset": "cifar100", "data": shared_data("cifar-100-python")},
        methods=PAPER_METHODS,
        linear_eval=_GPU_LINCLS,
        report={"title": "Continual MoCo v2 on CIFAR-100 (10 tasks)"},
        data_hint="the cifar-100-python folder (or add -p download=True)",
        jobs=4),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def check_preset(preset: Preset, specs: Mapping[str, Mapping[str, Any]]) -> None:
    """A preset naming a parameter its notebook lacks is a bug in cclnb, not in the user's call."""
    for nb in NOTEBOOKS:
        unknown = sorted(set(preset.parameters(nb)) - set(specs[nb]))
        if unknown:
            raise ConfigError(f"preset {preset.name!r} sets {unknown} that {nb}.ipynb does not "
                              f"declare; add them to its parameters cell or fix the preset")
