"""`cclnb train`: continual MoCo v2 pretraining with the authors' `train.py` command line.

Every flag of the authors' script keeps its name and default, so their ImageNet-Sub command runs
with `python train.py` replaced by `cclnb train` (the positional DIR works too). cclnb's extras
(device, precision, run directory, ...) map one-to-one onto `cclnb.config.TrainConfig`; defaults
are read from it, so the two cannot drift apart. Each method's options get a flag group generated
from the method's `Options` dataclass (CCL's `--ccl-k`, `--no-ccl-distill`, ...), so a method
declares them once; `--method-module FILE.py` loads a method from outside cclnb first (cli.py).
"""

from __future__ import annotations

import argparse
import dataclasses

from cclnb.config import ARCHS, COMPILE_MODES, GROUPED_BN, LOADERS, STEMS, TrainConfig
from cclnb.errors import ConfigError

D = TrainConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("the authors' train.py flags (same names and defaults)")
    a.add_argument("data_dir", nargs="?", metavar="DIR", help="dataset (same as --data)")
    a.add_argument("--data", default=None, help="folder with train/ and val/, a zip of one, a CIFAR folder, or 'demo'")
    a.add_argument("-a", "--arch", default=D.arch, choices=ARCHS)
    a.add_argument("-j", "--workers", type=int, default=D.workers, help="DataLoader workers (large images)")
    a.add_argument("--epochs", type=int, default=D.epochs, help="epochs per task")
    a.add_argument("--start-epoch", type=int, default=D.start_epoch,
                   help="accepted for compatibility; a resume restores the epoch itself")
    a.add_argument("-b", "--batch-size", type=int, default=D.batch_size, help="global batch over all processes")
    a.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=D.lr)
    a.add_argument("--schedule", type=int, nargs="*", default=D.schedule, help="LR x0.1 at these epochs (without --cos)")
    a.add_argument("--momentum", type=float, default=D.momentum)
    a.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=D.weight_decay)
    a.add_argument("-p", "--print-freq", type=int, default=D.print_freq, help="log every N steps")
    a.add_argument("--resume", default=None, help="a run directory or a checkpoint to continue")
    a.add_argument("--world-size", type=int, default=D.world_size, help="accepted; torchrun's WORLD_SIZE rules")
    a.add_argument("--rank", type=int, default=D.rank, help="accepted; torchrun's RANK rules")
    a.add_argument("--dist-url", default=D.dist_url)
    a.add_argument("--dist-backend", default=D.dist_backend, choices=("auto", "nccl", "gloo"))
    a.add_argument("--seed", type=int, default=D.seed)
    a.add_argument("--gpu", type=int, default=D.gpu, help="GPU index for a single-process run")
    a.add_argument("--multiprocessing-distributed", action="store_true",
                   help="one process per visible GPU on this machine")
    a.add_argument("--moco-dim", type=int, default=D.moco_dim)
    a.add_argument("--moco-k", type=int, default=D.moco_k)
    a.add_argument("--moco-m", type=float, default=D.moco_m)
    a.add_argument("--moco-t", type=float, default=D.moco_t)
    a.add_argument("--mlp", action="store_true")
    a.add_argument("--aug-plus", action="store_true", help="MoCo v2 augmentation (cclnb always uses it)")
    a.add_argument("--cos", action="store_true", help="cosine LR per task")
    a.add_argument("--method", default=D.method,
                   help=f"one of {', '.join(study_methods())} (CLL is accepted for CCL)")
    a.add_argument("--n-tasks", "--n_tasks", dest="n_tasks", type=int, default=D.n_tasks)
    a.add_argument("--n-save", "--n_save", dest="n_save", type=int, default=D.n_save)
    a.add_argument("--imagenetsub", action="store_true", help="the first 100 classes (ImageNet-Sub)")

    x = p.add_argument_group("cclnb extras")
    x.add_argument("--dataset", default=D.dataset, choices=("auto", "imagefolder", "zip", "cifar10", "cifar100", "demo"))
    x.add_argument("--classes", default=D.classes, metavar="FIRST-LAST",
                   help="train on a range of the sorted classes, counted from 1 (101-200: the second hundred; "
                        "1-100 is --imagenetsub)")
    x.add_argument("--download", action="store_true", help="CIFAR: download through torchvision if absent")
    x.add_argument("--image-size", type=int, default=D.image_size, help="default: the data's size if <= 64 px, else 224")
    x.add_argument("--stem", default=D.stem, choices=STEMS)
    x.add_argument("--width", type=int, default=D.width,
                   help="channels of the ResNet's first stage (64 = torchvision's; 16: a quarter-width network)")
    x.add_argument("--train-tasks", type=int, default=D.train_tasks,
                   help="train only the first N tasks of the split (a short protocol on the same sequence)")
    x.add_argument("--subset-per-class", type=int, default=D.subset_per_class, help="first N images of each class")
    x.add_argument("--order-seed", type=int, default=D.order_seed, help="class order seed (1 = the authors')")
    x.add_argument("--device", default=D.device, choices=("auto", "cpu", "cuda"))
    x.add_argument("--precision", default=D.precision, choices=("auto", "fp32", "bf16"),
                   help="auto (default): bf16 autocast where native (CUDA, CPUs with AVX512-BF16 or AMX), "
                        "else fp32; the run's config.json records the resolved choice")
    x.add_argument("--loader", default=D.loader, choices=LOADERS,
                   help="auto (default: tensor for <= 64 px data, else workers), tensor (uint8 on the device, "
                        "batched augmentation), workers (the authors' PIL + DataLoader), decode (JPEG files "
                        "decoded on the device per batch, views cropped from the full-resolution image)")
    x.add_argument("--prefetch", action="store_true",
                   help="CUDA: build the next batch on a second stream while the step runs; every batch draws "
                        "from its own generator (another random stream than without it; docs/performance.md)")
    x.add_argument("--grouped-bn", default=D.grouped_bn, choices=GROUPED_BN,
                   help="how the per-GPU BatchNorm groups are normalized: reshape (default) or strided (the same "
                        "statistics on a strided view, no channels_last copies)")
    x.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    x.add_argument("--compile", action="store_true", help="torch.compile the query encoder")
    x.add_argument("--compile-mode", default=D.compile_mode, choices=COMPILE_MODES,
                   help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs)")
    x.add_argument("--deterministic", action="store_true", help="deterministic algorithms (exact resume tests)")
    x.add_argument("--run-dir", default=D.run_dir, help="default runs/<method>-<dataset>-<time>")
    x.add_argument("--save-every", type=int, default=D.save_every, help="also checkpoint every N epochs")
    x.add_argument("--key-bn-groups", type=int, default=D.key_bn_groups,
                   help="shuffled BN of the keys: BatchNorm statistics per group of the shuffled batch "
                        "(default 8 = the authors' 8 GPUs; under torchrun each rank holds its share)")
    x.add_argument("--bn-groups", type=int, default=D.bn_groups,
                   help="per-GPU BatchNorm of the query, anchor and teacher passes: statistics per "
                        "consecutive slice (default 8 = the authors' 8 GPUs without SyncBatchNorm; "
                        "1 = the whole batch)")
    x.add_argument("--eval-each-task", default=D.eval_each_task, choices=("knn", "probe", "both", "none"))
    x.add_argument("--eval-teacher", action="store_true", help="also evaluate CCL's teacher after each task")
    x.add_argument("--eval-bank-per-class", type=int, default=D.eval_bank_per_class,
                   help="per-task evaluation on the first N train images of each class (default: all); "
                        "cuts its cost on a CPU")
    x.add_argument("--knn-k", type=int, default=D.knn_k)
    x.add_argument("--knn-t", type=float, default=D.knn_t)
    x.add_argument("--no-progress", dest="progress", action="store_false")
    x.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files beside train_log.csv (losses, lr, img/s, "
                        "per-task accuracies; needs pip install 'cclnb[tensorboard]'): tensorboard --logdir RUN_DIR")
    x.add_argument("--dist-timeout", type=int, default=D.dist_timeout, help="seconds before a dead rank stops the others")

    x.add_argument("--method-module", default=D.method_module, metavar="FILE.py|MODULE[:CLASS]",
                   help="load a method from outside cclnb (docs/methods.md); its options get flags too")
    x.add_argument("--replay-without-replacement", dest="replay_with_replacement", action="store_false",
                   help="draw random replay ids without duplicates")
    add_method_arguments(p)


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """One flag group per registered method, generated from its `Options`: `--name-with-dashes
    VALUE`, a bool that defaults to True as `--no-...`, one that defaults to False as a switch.
    A flag not given stays out of the config (argparse.SUPPRESS), so the method's own default
    applies and other methods' options never reach a run."""
    from cclnb.training.methods.registry import classes, option_default, option_fields, option_types, value_type

    for cls in classes().values():
        fields, types = option_fields(cls), option_types(cls)
        if not fields:
            continue
        group = p.add_argument_group(f"{cls.name} options (defaults = the method's reference code)")
        for f in fields:
            flag = "--" + f.name.replace("_", "-")
            default = option_default(f)
            help_text = f"{f.metadata.get('help', '')} (default {default!r})".strip()
            if types[f.name] is bool:
                negated = "--no-" + f.name.replace("_", "-")
                group.add_argument(negated if default else flag, dest=f.name, default=argparse.SUPPRESS,
                                   action="store_false" if default else "store_true", help=help_text)
            else:
                group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text,
                                   type=value_type(types[f.name]), choices=f.metadata.get("choices"))


def study_methods() -> tuple[str, ...]:
    from cclnb.training.methods.registry import study_methods as names

    return names()


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Map parsed arguments onto a TrainConfig (every field has a flag)."""
    values = vars(args).copy()
    positional = values.pop("data_dir", None)
    if positional and values.get("data") and positional != values["data"]:
        raise ConfigError(f"two datasets given: DIR {positional!r} and --data {values['data']!r}; pass one")
    values["data"] = values.get("data") or positional
    if values["start_epoch"] and not values["resume"]:
        raise ConfigError("--start-epoch only makes sense with --resume, and then the checkpoint's "
                          "epoch is used; drop --start-epoch")
    from cclnb.training.methods.registry import option_owners, resolve

    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(option_owners())
    return resolve(TrainConfig.from_dict({k: v for k, v in values.items() if k in known}))


def run(args: argparse.Namespace) -> int:
    from cclnb import train

    run_dir = train(config_from_args(args))
    print(f"run directory: {run_dir}")
    return 0
