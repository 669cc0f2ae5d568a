"""The resolved configuration of a continual pretraining run.

One dataclass holds every knob: the authors' `train.py` flags (same names, same defaults, so their
command lines keep their meaning) plus cclnb's extras. The CLI, the notebooks and `cclnb study` all
build a `TrainConfig`; the trainer reads nothing else. `resolve()` fills the values that depend on
the data (image size, protocol), and the resolved config is what a run directory records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cclnb.errors import ConfigError

METHODS = ("Finetuning", "SimpleReplay", "CCL", "Joint")
# CCL taken apart: each ablation is CCL with one of its two additions switched off. A study runs
# them as methods of their own (a record, a row, paired differences), named for what they drop.
ABLATIONS: dict[str, dict[str, Any]] = {"CCL-no-distill": {"ccl_distill": False},
                                        "CCL-no-extra-queue": {"ccl_extra_queue": False}}
STUDY_METHODS = (*METHODS, *ABLATIONS)   # every name `--method` and a study's `--methods` take
METHOD_ALIASES = {"CLL": "CCL", "finetuning": "Finetuning", "simplereplay": "SimpleReplay",
                  "ccl": "CCL", "cll": "CCL", "joint": "Joint", "FT": "Finetuning", "SR": "SimpleReplay",
                  **{name.lower(): name for name in ABLATIONS}}
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# ResNet stems: `imagenet` 7x7/2 conv + 3x3/2 max-pool; `cifar` 3x3/1 conv, no pooling (the 32 px
# protocol); `cifar_pool` the 3x3/1 conv then the max-pool, half the CIFAR stem's resolution (a CPU
# budget's middle ground); `auto` = cifar for images <= 64 px, else imagenet.
STEMS = ("auto", "cifar", "cifar_pool", "imagenet")
STEM_DOWNSAMPLING = {"cifar": 1, "cifar_pool": 2, "imagenet": 4}   # input side / first block's side


def resolve_stem(stem: str, small_images: bool | None) -> str:
    """`auto` -> cifar for small images, else imagenet; the others pass through."""
    return stem if stem != "auto" else ("cifar" if small_images else "imagenet")


def canonical_method(name: str) -> str:
    """Map a method name (or an accepted alias such as the authors' README spelling `CLL`) to its
    canonical form; unknown names are an error that lists the valid ones."""
    if name in STUDY_METHODS:
        return name
    if name in METHOD_ALIASES:
        return METHOD_ALIASES[name]
    raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(STUDY_METHODS)} "
                      f"(CLL is accepted for CCL)")


def base_method(name: str) -> str:
    """The method class that trains `name`: an ablation trains as CCL with its switch off."""
    name = canonical_method(name)
    return "CCL" if name in ABLATIONS else name


@dataclass
class TrainConfig:
    """Everything a continual MoCo v2 run depends on.

    Fields up to `n_save` mirror the authors' `train.py` (names and defaults); the rest are
    cclnb's extras, each defaulting to the authors' behaviour unless noted in the README.
    """

    # --- the authors' flags (MoCo reference + CCL additions) ---
    data: str | None = None                 # dataset root / zip / CIFAR folder; "demo" = embedded
    arch: str = "resnet50"
    workers: int = 32
    epochs: int = 200                       # per task
    start_epoch: int = 0
    batch_size: int = 256
    lr: float = 0.03
    schedule: list[int] = field(default_factory=lambda: [120, 160])
    momentum: float = 0.9
    weight_decay: float = 1e-4
    print_freq: int = 10
    resume: str | None = None
    world_size: int = -1
    rank: int = -1
    dist_url: str = "env://"
    dist_backend: str = "auto"              # nccl on GPU, gloo on CPU
    seed: int | None = None
    gpu: int | None = None
    multiprocessing_distributed: bool = False
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.07
    ccl_teacher_m: float = 0.996
    ccl_k: int = 256
    mlp: bool = False
    aug_plus: bool = False
    cos: bool = False
    method: str = "Finetuning"
    n_tasks: int = 10
    n_save: int = 20
    imagenetsub: bool = False

    # --- cclnb extras ---
    dataset: str = "auto"                   # auto | imagefolder | zip | cifar10 | cifar100 | demo
    download: bool = False                  # CIFAR only: download through torchvision if absent
    image_size: int | None = None           # None: the data's size if <= 64 px, else 224
    stem: str = "auto"                      # one of STEMS (auto: cifar stem for <= 64 px)
    width: int = 64                         # channels of the ResNet's first stage (64 = torchvision's; 16 = a quarter-width network for CPU budgets)
    train_tasks: int | None = None          # train (and evaluate on) only the first N tasks of the split: short protocols; None = all
    subset_per_class: int | None = None     # first N train images of each class (quick runs)
    order_seed: int = 1                     # class-order seed; 1 = the authors' order
    device: str = "auto"                    # auto | cpu | cuda
    precision: str = "auto"                 # auto (bf16 where native: CUDA, AVX512-BF16/AMX CPUs) | fp32 | bf16
    loader: str = "auto"                    # auto | tensor (uint8 batches, batched aug) | workers
    channels_last: bool = True
    compile: bool = False                   # torch.compile the encoders
    deterministic: bool = False             # deterministic algorithms (CPU tests of exact resume)
    run_dir: str | None = None
    save_every: int = 0                     # extra checkpoint every N epochs (0: end of task only)
    bn_groups: int = 8                      # per-GPU BatchNorm of query/anchor/teacher passes (8 = the authors' 8 GPUs; 1 = whole batch)
    key_bn_groups: int = 8                  # shuffled BN of the keys in groups (8 = 8 GPUs; 1 = whole batch)
    eval_each_task: str = "knn"             # knn | probe | both | none
    eval_teacher: bool = False              # also measure the CCL teacher after each task
    eval_bank_per_class: int | None = None  # per-task evaluation: first N train images of each class as the kNN bank / probe set (None: all)
    knn_k: int = 200
    knn_t: float = 0.1
    progress: bool = True                   # tqdm bars on rank 0
    dist_timeout: int = 1800                # seconds a collective may wait before a dead rank stops the rest
    # CCL ablation switches (defaults = the authors' code, see README)
    ccl_selection: str = "min_var"          # min_var | random
    ccl_extra_queue: bool = True
    ccl_distill: bool = True
    ccl_teacher_mode: str = "code"          # code (train mode after epoch 1) | eval
    ccl_teacher_stats: str = "own"          # own (the authors': a task start copies parameters only) | student
    ccl_distill_group: int = 32             # distill within slices of N samples; 0 = whole batch
    ccl_extra_weight: float = 0.1
    ccl_distill_weight: float = 0.1
    ccl_t_student: float = 0.07
    ccl_t_teacher: float = 0.04
    replay_with_replacement: bool = True    # SimpleReplay draws with replacement, as the code does

    def __post_init__(self) -> None:
        self.method = canonical_method(self.method)
        for switch, value in ABLATIONS.get(self.method, {}).items():   # the ablation is its switch
            setattr(self, switch, value)

    # ------------------------------------------------------------------ helpers
    @property
    def small_images(self) -> bool:
        """The 32-px protocol (3x3 stem, no max-pool, no blur, anchor = the image) applies."""
        return self.image_size is not None and self.image_size <= 64

    def validate(self) -> None:
        """Reject inconsistent settings with a message that says what to change."""
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        checks = [
            (self.n_tasks >= 1, f"--n-tasks must be >= 1, got {self.n_tasks}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"--batch-size must be >= 2, got {self.batch_size}"),
            (self.n_save >= 0, f"--n-save must be >= 0, got {self.n_save}"),
            (self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}"),
            (self.precision in ("auto", "fp32", "bf16"),
             f"--precision must be auto, fp32 or bf16, got {self.precision!r}"),
            (self.loader in ("auto", "tensor", "workers"), f"--loader must be auto, tensor or workers, got {self.loader!r}"),
            (self.eval_each_task in ("knn", "probe", "both", "none"),
             f"--eval-each-task must be knn, probe, both or none, got {self.eval_each_task!r}"),
            (self.ccl_selection in ("min_var", "random"), f"--ccl-selection must be min_var or random, got {self.ccl_selection!r}"),
            (self.ccl_teacher_mode in ("code", "eval"), f"--ccl-teacher-mode must be code or eval, got {self.ccl_teacher_mode!r}"),
            (self.ccl_distill_group >= 0, "--ccl-distill-group must be >= 0 (0 = whole batch)"),
            (self.stem in STEMS, f"--stem must be one of {', '.join(STEMS)}, got {self.stem!r}"),
            (self.key_bn_groups >= 1, "--key-bn-groups must be >= 1"),
            (self.bn_groups >= 1, "--bn-groups must be >= 1"),
            (self.batch_size % self.bn_groups == 0,
             f"--batch-size {self.batch_size} must be divisible by --bn-groups {self.bn_groups} (BatchNorm "
             f"normalizes each of the groups, one per emulated GPU, over an equal share); change one of them"),
            (self.batch_size % self.key_bn_groups == 0,
             f"--batch-size {self.batch_size} must be divisible by --key-bn-groups {self.key_bn_groups}; "
             f"change one of them"),
            (self.ccl_teacher_stats in ("own", "student"),
             f"--ccl-teacher-stats must be own or student, got {self.ccl_teacher_stats!r}"),
            (self.subset_per_class is None or self.subset_per_class >= 1, "--subset-per-class must be >= 1"),
            (self.width >= 1, f"--width must be >= 1 (channels of the first stage; 64 = torchvision's), got {self.width}"),
            (self.train_tasks is None or 1 <= self.train_tasks <= self.n_tasks,
             f"--train-tasks must be between 1 and --n-tasks {self.n_tasks} (or left out: every task), "
             f"got {self.train_tasks}"),
            (self.eval_bank_per_class is None or self.eval_bank_per_class >= 1,
             "--eval-bank-per-class must be >= 1 (or left out: every training image)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config from a dict, refusing unknown keys (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown configuration key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**values)

    # Fields whose change makes a checkpoint belong to another experiment (resume refuses them).
    IDENTITY_FIELDS = ("data", "dataset", "imagenetsub", "arch", "method", "n_tasks", "n_save",
                       "moco_dim", "moco_k", "mlp", "image_size", "subset_per_class", "order_seed",
                       "ccl_k", "batch_size", "epochs", "stem", "width", "train_tasks")
