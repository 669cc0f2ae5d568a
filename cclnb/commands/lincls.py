"""`cclnb lincls`: the paper's linear evaluation, with the flags of the authors' lincls_eval.py.

Same names and defaults as the authors' script, so their command lines run unchanged (the
distributed flags are accepted; one process on one device does the work). Two fixes: the
`--use_teacher_weight` value is parsed as a real boolean (the authors' `type=bool` turns
"False" into True), and the result is the final epoch, not the best epoch on the val set.
"""

from __future__ import annotations

import argparse

from cclnb.evaluate.lincls_options import add_arguments

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from cclnb.errors import ConfigError
    from cclnb.evaluate.lincls import BEST_NOTE, encoder_arguments, linear_evals, probe_eval, resolve_source
    from cclnb.training.runs import writable_folder

    if args.data_pos and args.data and args.data_pos != args.data:
        raise ConfigError(f"two datasets given ({args.data_pos!r} and --data {args.data!r}); pass one")
    args.data = args.data or args.data_pos
    if args.also and args.protocol == "probe":
        raise ConfigError("--also shares the augmented batches of the lincls protocol; the probe has none "
                          "(its features are extracted once per encoder): run one probe per encoder")
    if not args.evaluate:   # results are written at the end: refuse an unwritable folder first
        for encoder in encoder_arguments(args):
            writable_folder(resolve_source(encoder.pretrained, encoder.out).out_dir, "output folder", "--out")
    if args.protocol == "probe":
        result = probe_eval(args)
        print(f"probe ({result['who']}): top-1 {result['top1']:.2f}  | {result['time_s']:.1f} s")
        return 0
    for result in linear_evals(args):
        if "best_top1" in result:
            print(f"lincls ({result['who']}{', ' + result['pretrained'] if args.also else ''}): final epoch "
                  f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  | {BEST_NOTE}: top-1 "
                  f"{result['best_top1']:.2f} (epoch {result['best_epoch']})  | {result['time_s']:.1f} s")
    return 0
