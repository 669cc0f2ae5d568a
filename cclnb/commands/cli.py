"""`cclnb` command line: `cclnb {train,lincls,study,data,bench,report} ...`.

Each subcommand lives in `cclnb.commands.<name>` and exposes `add_arguments(parser)` and
`run(args) -> int`. Only the chosen subcommand's module is imported, so `cclnb data info` does not
pay for importing the trainer. A `CclnbError` is printed as one clear message (no traceback) and
becomes the process exit code, so shell scripts and `cclnb study` can tell what went wrong.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cclnb.errors import CclnbError

SUBCOMMANDS = {
    "train": "continual MoCo v2 pretraining (accepts the authors' train.py flags)",
    "lincls": "linear evaluation (accepts the authors' lincls_eval.py flags)",
    "study": "run a preset study through papermill and render its HTML report",
    "data": "inspect a dataset: `cclnb data info PATH --n-tasks 10`",
    "bench": "throughput benchmark table (authors' pipeline vs cclnb fast path vs ceiling)",
    "report": "pages from committed study records: the gallery, the docs' tables, record migration",
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s own arguments are loaded (all names are listed)."""
    parser = argparse.ArgumentParser(prog="cclnb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(f"cclnb.commands.{name}").add_arguments(sub_parser)
    return parser


def preload_methods(argv: list[str]) -> None:
    """Register the methods `--method-module` names before the parser is built, so that their
    options get flags and their names are accepted like the built-ins'."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)   # `--method` is not `--method-module`
    pre.add_argument("--method-module", action="append", default=[])
    specs = pre.parse_known_args(argv)[0].method_module
    if specs:
        from cclnb.training.methods.registry import load

        for spec in specs:
            load(spec)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        preload_methods(argv)
    except CclnbError as error:
        print(f"cclnb {command}: error: {error}", file=sys.stderr)
        return error.exit_code
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    module = importlib.import_module(f"cclnb.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except CclnbError as error:
        print(f"cclnb {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
