"""`cclnb study --preset NAME [-p key=value ...]`: run a preset study and render its report.

The work is in `cclnb.study`; this module only maps command-line options onto it.
"""

from __future__ import annotations

import argparse

from cclnb.errors import ConfigError
from cclnb.launch import options as launch_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cclnb.study import PRESETS

    presets = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
    parser.add_argument("--preset", required=True, choices=list(PRESETS), metavar="NAME",
                        help=f"which study ({presets})")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override a notebook parameter (checked against the notebooks' "
                             "parameters cells; prefix linear_eval. or report. to target one)")
    from cclnb.training.methods.registry import study_methods

    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help=f"only these methods (default: the preset's; from {', '.join(study_methods())}, "
                             f"or yours with --method-module)")
    parser.add_argument("--method-module", metavar="FILE.py|MODULE[:CLASS]",
                        help="load methods from outside cclnb (docs/methods.md); same as "
                             "-p method_module=..., which every run of the study records")
    parser.add_argument("--study", metavar="NAME",
                        help="study name for runs/<study> and reports/<study> (default: the preset)")
    parser.add_argument("--runs-root", default="runs", help="where run directories go (default runs)")
    parser.add_argument("--reports-root", default="reports",
                        help="where the HTML report goes (default reports)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="K",
                        help="run every method once per seed, in runs/<study>/<method>/seed<K> "
                             "(default: the preset's; demo 0 1 2); seeds already finished are skipped, "
                             "so naming new seeds later adds them to the study")
    parser.add_argument("--records", action="append", default=[], metavar="DIR",
                        help="also read the study records (<method>-seed<K>.json) in DIR, e.g. from "
                             "another machine (repeatable); reports/<study>/runs is always read")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: render the report from the records")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the untrained-encoder baselines (as built, and with BatchNorm statistics of the data; evaluated per seed by default)")
    parser.add_argument("--force", action="store_true",
                        help="delete the selected methods' runs (for the selected seeds) and train "
                             "them again")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="finished runs made with other parameters than this command's are run again "
                             "with this command's, their old runs and records moved to runs/<study>/.replaced/ "
                             "(without it the study stops and names the differences)")
    parser.add_argument("--jobs", type=int, metavar="N",
                        help="how many (method, seed) runs proceed at once, each notebook in its own "
                             "process (default: the preset's; 1 = one notebook at a time, output here)")
    parser.add_argument("--status", action="store_true",
                        help="change nothing: show where every (method, seed) of the study stands "
                             "(done, running, queued, failed, preempted), its task and epoch, img/s and "
                             "time left, and when the study ends at --jobs; works while it runs elsewhere")
    launch_options.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from cclnb.study import plan_study, run_study

    if args.method_module:
        args.param = [*args.param, f"method_module={args.method_module}"]
    if args.status:
        return show_status(args)
    if args.launcher != "local":
        if args.rerun_changed:
            raise ConfigError(f"--rerun-changed compares and moves runs of a study run here; with --launcher "
                              f"{args.launcher} use another --study NAME (or --force) instead")
        return launch_options.run(args)
    launch_options.refuse_cluster_options(args)
    study = plan_study(args.preset, args.param, runs_root=args.runs_root,
                       reports_root=args.reports_root, methods=args.methods, study=args.study,
                       force=args.force, jobs=args.jobs, seeds=args.seeds,
                       baseline=args.baseline, records=args.records, report_only=args.report_only,
                       rerun_changed=args.rerun_changed)
    run_study(study)
    return 0


def show_status(args: argparse.Namespace) -> int:
    """`--status`: the study these options name, as its files say (reads only; exit 0)."""
    from cclnb.study import plan_study, status

    study = plan_study(args.preset, args.param, runs_root=args.runs_root, reports_root=args.reports_root,
                       methods=args.methods, study=args.study, jobs=args.jobs, seeds=args.seeds,
                       baseline=args.baseline, records=args.records)
    jobs = {}
    if any(study.runs_dir.glob("*/jobs.json")):     # submitted with --launcher slurm|submitit-local
        from cclnb.launch.watch import job_states

        jobs = job_states(study.runs_dir)
    print(status.table(status.study_status(study, jobs, status.study_liveness(study.runs_dir))))
    return 0
