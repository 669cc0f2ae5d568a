"""`cclnb` command line: `cclnb {train,lincls,study,data,bench} ...`.

Each subcommand lives in `cclnb.commands.<name>` and exposes `add_arguments(parser)` and
`run(args) -> int`. A `CclnbError` is printed as one clear message (no traceback) and becomes the
process exit code, so shell scripts and `cclnb study` can tell what went wrong.
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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cclnb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"cclnb.commands.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"cclnb.commands.{args.command}")
    try:
        return int(module.run(args) or 0)
    except CclnbError as error:
        print(f"cclnb {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
