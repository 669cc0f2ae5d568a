"""The flags of the authors' lincls_eval.py (same names and defaults), for `cclnb lincls` and the
linear-evaluation notebook.

One parser serves both: the notebook's parameters become these flags (`notebook_args`), so the
command and the notebook share one set of defaults and checks, and the study's pre-flight can run
those checks before any notebook starts. `--use_teacher_weight` is parsed as a real boolean (the
authors' `type=bool` turns "False" into True).
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from cclnb.config import ARCHS, STEMS

_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")


def parse_bool(text: str) -> bool:
    """'False', 'false', '0', 'no' are false; 'True', 'true', '1', 'yes' are true."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0, yes/no), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The authors' lincls_eval.py flags (same names, same defaults) plus cclnb's extras."""
    parser.add_argument("data_pos", nargs="?", metavar="DIR", default=None,
                        help="dataset: folder with train/ and val/, a zip of one, a CIFAR folder, or demo")
    parser.add_argument("--data", default=None, help="the dataset, as the positional DIR "
                        "(default: the pretraining run's data when --pretrained is a run)")
    parser.add_argument("-a", "--arch", default=None, choices=ARCHS,
                        help="backbone (default: the run's arch, else resnet50)")
    parser.add_argument("-j", "--workers", type=int, default=32,
                        help="DataLoader workers for images > 64 px (capped at the CPU count; default 32)")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs (default 100)")
    parser.add_argument("--start-epoch", type=int, default=0, help="first epoch (overwritten by --resume)")
    parser.add_argument("-b", "--batch-size", type=int, default=256, help="mini-batch size (default 256)")
    parser.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=30.0,
                        help="initial learning rate (default 30)")
    parser.add_argument("--schedule", type=int, nargs="*", default=[60, 80],
                        help="epochs at which the LR is multiplied by 0.1 (default 60 80)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=0.0,
                        help="weight decay (default 0)")
    parser.add_argument("-p", "--print-freq", type=int, default=10, help="progress-bar update frequency (steps)")
    parser.add_argument("--resume", default="", help="a lincls_<who>.pt written by an earlier cclnb lincls; "
                        "'auto': each encoder's own lincls_<who>.pt in its output folder, where there is one")
    parser.add_argument("-e", "--evaluate", action="store_true",
                        help="only score the classifier restored by --resume on the val set")
    parser.add_argument("--world-size", type=int, default=-1, help="accepted; > 1 is refused (one process)")
    parser.add_argument("--rank", type=int, default=-1, help="accepted for compatibility; unused")
    parser.add_argument("--dist-url", default="tcp://224.66.41.62:23456", help="accepted; unused")
    parser.add_argument("--dist-backend", default="nccl", help="accepted; unused")
    parser.add_argument("--seed", type=int, default=None, help="seed of the crop/flip draws and batch order "
                        "(default: 0, so a rerun repeats)")
    parser.add_argument("--gpu", type=int, default=None, help="GPU index to use")
    parser.add_argument("--multiprocessing-distributed", action="store_true",
                        help="accepted; one process runs the evaluation")
    parser.add_argument("--pretrained", default="",
                        help="cclnb run directory, cclnb checkpoint, or the authors' checkpoint")
    parser.add_argument("--use_teacher_weight", "--use-teacher-weight", dest="use_teacher_weight",
                        type=parse_bool, nargs="?", const=True, default=False,
                        help="evaluate the CCL teacher instead of the student; a bare flag or True "
                             "means yes, False/0 means no (default False)")
    parser.add_argument("--imagenetsub", action="store_true",
                        help="ImageNet-Sub: the first 100 classes in sorted order")
    parser.add_argument("--classes", default=None, metavar="FIRST-LAST",
                        help="a range of the sorted classes, counted from 1 (default: the run's)")
    # --- cclnb extras ---
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="backbone forward precision (the fc always trains in fp32); auto: bf16 "
                             "where native (CUDA, AVX512-BF16/AMX CPUs), else fp32")
    parser.add_argument("--dataset", default=None,
                        help="dataset kind: auto | imagefolder | zip | cifar10 | cifar100 | demo")
    parser.add_argument("--stem", default=None, choices=STEMS,
                        help="ResNet stem (default: the run's, else auto = cifar stem for <= 64 px)")
    parser.add_argument("--width", type=int, default=None,
                        help="channels of the first stage (default: the run's, else 64)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="evaluation size (default: native if <= 64 px, else 224)")
    parser.add_argument("--subset-per-class", type=int, default=None,
                        help="train the classifier on the first N train images of each class")
    parser.add_argument("--out", default=None, help="folder for lincls_<who>.json (default: the run "
                        "directory, else the checkpoint's folder)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    parser.add_argument("--also", nargs="+", default=[], metavar="PATH[:teacher]",
                        help="more encoders (run directories or checkpoints; ':teacher' for a run's teacher) "
                             "whose classifiers train in the same pass: each batch is read and augmented once, "
                             "every result equals its own run's; each is written next to its encoder")
    parser.add_argument("--protocol", choices=("lincls", "probe"), default="lincls",
                        help="lincls: the paper's protocol (default); probe: one L-BFGS fit on frozen "
                             "features of un-augmented images (<= 64 px, --epochs = iterations)")


# linear_eval.ipynb's parameters that are `cclnb lincls` flags of the same meaning
NOTEBOOK_FLAGS = {"run_dir": "--pretrained", "protocol": "--protocol", "epochs": "--epochs", "batch_size": "-b",
                  "lr": "--lr", "device": "--device", "precision": "--precision", "seed": "--seed", "workers": "-j",
                  "resume": "--resume"}


def notebook_args(parameters: Mapping[str, Any]) -> argparse.Namespace:
    """The `cclnb lincls` arguments for linear_eval.ipynb's parameters (its cell calls this).

    The notebook's parameters become this command's flags, so the two share one set of defaults
    and checks, and `cclnb study` can run those checks before any notebook starts (`cclnb.study.preflight`).
    A parameter left out takes the command's default. A value the flag refuses is a ConfigError
    naming the flag, where argparse would end the process.
    """
    from cclnb.errors import ConfigError

    who = parameters.get("who", "student")
    if who not in ("student", "teacher"):
        raise ConfigError(f"who must be student or teacher, got {who!r}")
    argv = ["--use-teacher-weight", str(who == "teacher")]
    for name, flag in NOTEBOOK_FLAGS.items():
        if name in parameters:
            argv += [flag, str(parameters[name])]
    if "schedule" in parameters:
        argv += ["--schedule", *map(str, parameters["schedule"])]
    if parameters.get("subset_per_class"):
        argv += ["--subset-per-class", str(parameters["subset_per_class"])]
    if parameters.get("also"):
        argv += ["--also", *map(str, parameters["also"])]
    if not parameters.get("progress", True):
        argv.append("--no-progress")
    parser = argparse.ArgumentParser(prog="linear_eval.ipynb", exit_on_error=False)
    add_arguments(parser)
    try:
        return parser.parse_args(argv)
    except argparse.ArgumentError as error:
        raise ConfigError(str(error)) from error
