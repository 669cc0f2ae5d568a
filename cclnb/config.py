"""The resolved configuration of a continual pretraining run.

One dataclass holds the trainer's knobs: the authors' `train.py` flags (same names, same
defaults, so their command lines keep their meaning) plus cclnb's extras. A method's own options
(CCL's `ccl_k`, CaSSLe's `cassle_t`, ...) are declared once, by the method (`Method.Options`), and
ride along in `method_options`: flat names, read as attributes (`config.ccl_k`), flat in
`to_dict()` and so in config.json and the records. This module knows no method: which options a
method has, and their defaults and checks, is `cclnb.training.methods.registry.resolve`'s job
(the training stage), which every entry point calls before a run starts. The CLI, the notebooks
and `cclnb study` all build a `TrainConfig`; the trainer reads nothing else, and the resolved
config is what a run directory records.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from cclnb.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# ResNet stems: `imagenet` 7x7/2 conv + 3x3/2 max-pool; `cifar` 3x3/1 conv, no pooling (the 32 px
# protocol); `cifar_pool` the 3x3/1 conv then the max-pool, half the CIFAR stem's resolution (a CPU
# budget's middle ground); `auto` = cifar for images <= 64 px, else imagenet.
STEMS = ("auto", "cifar", "cifar_pool", "imagenet")
STEM_DOWNSAMPLING = {"cifar": 1, "cifar_pool": 2, "imagenet": 4}   # input side / first block's side
LOADERS = ("auto", "tensor", "workers", "decode")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")   # torch.compile's `mode`
GROUPED_BN = ("reshape", "strided")     # how the per-GPU BatchNorm groups are normalized (cclnb.training.bn)


def resolve_stem(stem: str, small_images: bool | None) -> str:
    """`auto` -> cifar for small images, else imagenet; the others pass through."""
    return stem if stem != "auto" else ("cifar" if small_images else "imagenet")


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
    mlp: bool = False
    aug_plus: bool = False
    cos: bool = False
    method: str = "Finetuning"             # a registered method (cclnb.training.methods.registry) or one of its variants
    n_tasks: int = 10
    n_save: int = 20
    imagenetsub: bool = False

    # --- cclnb extras ---
    classes: str | None = None              # FIRST-LAST: a range of the sorted classes, from 1 (101-200: the second hundred); None: all (cclnb.data.selection)
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
    loader: str = "auto"                    # auto | tensor (uint8 batches, batched aug) | workers | decode (JPEG files decoded on the device per batch, cclnb.data.jpeg)
    # Speed options (docs/performance.md). prefetch changes the GPU random stream (every batch
    # draws from its own generator), so records with and without it are not averaged.
    prefetch: bool = False                  # build the next batch on a second CUDA stream while the step runs (CUDA, tensor/decode loaders)
    grouped_bn: str = "reshape"             # per-GPU BatchNorm groups: reshape (one batch_norm over the batch reshaped into channels) | strided (a strided view: no layout copies)
    channels_last: bool = True
    compile: bool = False                   # torch.compile the encoders
    compile_mode: str = "default"           # with compile: torch.compile's mode, default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
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
    tensorboard: bool = False               # also write TensorBoard event files beside train_log.csv (needs the tensorboard extra)
    dist_timeout: int = 1800                # seconds a collective may wait before a dead rank stops the rest
    replay_with_replacement: bool = True    # SimpleReplay draws with replacement, as the code does
    method_module: str | None = None        # where a method outside cclnb lives: a .py file or "package.module[:Class]"
    method_options: dict[str, Any] = field(default_factory=dict)   # the method's options (flat names; see above)

    def __getattr__(self, name: str) -> Any:
        """A method's option reads as a field (`config.ccl_k`): options are flat names, declared
        by the method (`Method.Options`) and held in `method_options`."""
        options = self.__dict__.get("method_options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__} has no field or option {name!r}"
                             + (f" for method {self.method!r}" if options is not None else ""))

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
            (self.loader in LOADERS, f"--loader must be one of {', '.join(LOADERS)}, got {self.loader!r}"),
            (self.grouped_bn in GROUPED_BN, f"--grouped-bn must be one of {', '.join(GROUPED_BN)}, got {self.grouped_bn!r}"),
            (self.compile_mode in COMPILE_MODES,
             f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}"),
            (self.compile or self.compile_mode == "default",
             f"--compile-mode {self.compile_mode} is a mode of torch.compile: add --compile (or drop the mode)"),
            (self.eval_each_task in ("knn", "probe", "both", "none"),
             f"--eval-each-task must be knn, probe, both or none, got {self.eval_each_task!r}"),
            (self.stem in STEMS, f"--stem must be one of {', '.join(STEMS)}, got {self.stem!r}"),
            (self.key_bn_groups >= 1, "--key-bn-groups must be >= 1"),
            (self.bn_groups >= 1, "--bn-groups must be >= 1"),
            (self.batch_size % self.bn_groups == 0,
             f"--batch-size {self.batch_size} must be divisible by --bn-groups {self.bn_groups} (BatchNorm "
             f"normalizes each of the groups, one per emulated GPU, over an equal share); change one of them"),
            (self.batch_size % self.key_bn_groups == 0,
             f"--batch-size {self.batch_size} must be divisible by --key-bn-groups {self.key_bn_groups}; "
             f"change one of them"),
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
        check_class_selection(self.imagenetsub, self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Flat: the fields, then the method's options under their own names (config.json)."""
        values = dataclasses.asdict(self)
        return {**values, **values.pop("method_options")}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config from a flat dict (config.json's form); see `__init__` for options."""
        return cls(**values)

    def with_options(self, **options: Any) -> "TrainConfig":
        """A copy with these method options set (as `dataclasses.replace` does for fields)."""
        return dataclasses.replace(self, method_options={**self.method_options, **options})

    # Fields whose change makes a checkpoint belong to another experiment (resume refuses them;
    # every method option counts too, see `identity`).
    IDENTITY_FIELDS = ("data", "dataset", "imagenetsub", "classes", "arch", "method", "method_module", "n_tasks",
                       "n_save", "moco_dim", "moco_k", "mlp", "image_size", "subset_per_class",
                       "order_seed", "batch_size", "epochs", "stem", "width", "train_tasks")

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed with this config: the identity fields and
        the method's options."""
        return {**{f: getattr(self, f) for f in self.IDENTITY_FIELDS}, **self.method_options}


def parse_class_range(text: str) -> tuple[int, int]:
    """'101-200' -> (101, 200); a clear error for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(text))
    if match is None or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(f"--classes {text!r}: write FIRST-LAST, positions in the sorted class order counted "
                          f"from 1, both included (e.g. --classes 101-200 for the second hundred)")
    return int(match.group(1)), int(match.group(2))


def check_class_selection(imagenetsub: bool, class_range: str | None) -> None:
    """Both select classes: one of them at most."""
    if class_range is not None:
        parse_class_range(class_range)
        if imagenetsub:
            raise ConfigError(f"--imagenetsub and --classes {class_range} both choose the classes; keep one "
                              f"(--imagenetsub is --classes 1-100)")


def _taking_options(init: Callable[..., None]) -> Callable[..., None]:
    """TrainConfig's constructor: fields by name as the dataclass takes them, and every other
    keyword a method option (`TrainConfig(method="CCL", ccl_k=128)`, and `dataclasses.replace`
    with an option). Options are checked (unknown names refused, naming the valid ones) when the
    method resolves them (`cclnb.training.methods.registry.resolve`), which this module cannot do:
    it knows no method."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}

    @functools.wraps(init)
    def __init__(self: TrainConfig, *args: Any, method_options: dict[str, Any] | None = None,
                 **values: Any) -> None:
        options = {**(method_options or {}), **{k: v for k, v in values.items() if k not in names}}
        init(self, *args, **{k: v for k, v in values.items() if k in names}, method_options=options)

    return __init__


TrainConfig.__init__ = _taking_options(TrainConfig.__init__)   # type: ignore[method-assign]
