"""`cclnb study --launcher slurm`: every unfinished (method, seed) as one job, records joining.

The plan is the local study's (`cclnb.study.plan_study`): its groups, one per (method, seed),
become jobs (`cclnb.launch.job.StudyJob`), each running on its node what `cclnb study` would run
here and writing the same run directory and record. This module decides which pairs to submit,
checks everything knowable before submitting (`cclnb.launch.resources`), submits through
submitit, remembers the job ids (`runs/<study>/<launcher>/jobs.json`, beside submitit's scripts
and logs), waits when asked, and renders the report from the records, listing every pair that
has none with its job's log and the error's last line.

A pair is finished when its record exists (records are results that cost GPU-hours: unlike a
local study, a cluster study never reruns a pair that has one, even if its run directory is
elsewhere) or when its run directory is complete (its record is then written here). A pair whose
job is still queued or running is watched, not submitted again. `--force` resubmits the selected
pairs from scratch, and refuses while one of their jobs is still queued or running.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import submitit
from submitit.core.utils import JobPaths, pickle_load

from cclnb import study
from cclnb.errors import ConfigError, DataError
from cclnb.launch import resources as res
from cclnb.launch import torchrun
from cclnb.launch.job import StudyJob
from cclnb.study import records
from cclnb.training import runs

SIGNAL_DELAY_S = 120   # SLURM's warning before the time limit; a stopped training saves within it
GRACE_S = SIGNAL_DELAY_S - 30
MANIFEST = "jobs.json"


@dataclass
class Pair:
    """One (method, seed) of the plan: its group of steps, the last of which writes its record."""

    group: str
    steps: list[study.Step]

    @property
    def method(self) -> str:
        return str(self.steps[0].parameters["method"])

    @property
    def seed(self) -> int:
        return int(self.steps[0].parameters["seed"])

    @property
    def record(self) -> Path:
        return self.steps[-1].output

    @property
    def key(self) -> str:
        return self.record.stem            # "CCL-seed0", the record's name

    def resources(self, allocation: res.Resources) -> res.Resources:
        """The job's allocation: the study's, or one GPU's share for a pair that never trains."""
        return allocation if self.steps[0].notebook == "task_sequence" else allocation.evaluation_only()

    @property
    def trained(self) -> bool:
        """Every step but the record is done: the record can be written here."""
        return all(step.done for step in self.steps[:-1])


def pairs_of(plan: study.Study) -> list[Pair]:
    groups: dict[str, list[study.Step]] = {}
    for step in plan.steps:
        if step.group:
            groups.setdefault(step.group, []).append(step)
    return [Pair(group, steps) for group, steps in groups.items()]


@dataclass(frozen=True)
class Submitted:
    """A job as remembered in the manifest."""

    job_id: str
    log: str
    errors: str
    submitted: str


def read_manifest(folder: Path) -> dict[str, Submitted]:
    path = folder / MANIFEST
    return {key: Submitted(**entry) for key, entry in runs.read_json(path).items()} if path.is_file() else {}


def write_manifest(folder: Path, manifest: dict[str, Submitted]) -> None:
    runs.write_json(folder / MANIFEST, {key: asdict(entry) for key, entry in sorted(manifest.items())})


# ----------------------------------------------------------------------------- where jobs go
class Backend:
    """SLURM, or submitit's local executor: the same jobs as processes of this machine."""

    name = ""
    poll_s = 1.0

    def __init__(self, folder: Path) -> None:
        self.folder = folder.absolute()

    @property
    def command(self) -> str:
        """What submitit runs for a job (its `_submit` entry point with this folder)."""
        return f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(self.folder))}"

    def script(self, job_name: str, resources: res.Resources) -> str:
        raise NotImplementedError

    def executor(self, job_name: str, resources: res.Resources) -> submitit.Executor:
        raise NotImplementedError

    def active(self, job_ids: list[str]) -> set[str]:
        raise NotImplementedError

    def submit(self, job: StudyJob, job_name: str) -> submitit.Job:
        try:
            return self.executor(job_name, job.resources).submit(job)
        except (RuntimeError, subprocess.SubprocessError, OSError) as error:   # FailedJobError, no srun, ...
            raise ConfigError(f"the {self.name} submission of {job_name} failed: {error}; the jobs "
                              f"submitted before it are in {self.folder / MANIFEST}. Fix the cause and "
                              f"run the same command again (it submits only what is missing)") from error


def _training_line(resources: res.Resources) -> str:
    if not resources.uses_torchrun:
        return "# training: one process, in the task-sequence notebook's kernel"
    args = resources.torchrun_args(0, "<node 0 of the allocation>", "<20000 + job id % 20000>")
    return ("# training: the task-sequence notebook on node 0 runs "
            + shlex.join(torchrun.command("<TrainConfig as JSON>", args))
            + ("" if resources.nodes == 1 else "; every other node runs it with its own --node_rank"))


class SlurmBackend(Backend):
    name = "slurm"
    poll_s = 30.0

    def parameters(self, job_name: str, r: res.Resources) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters: the same dict writes the dry run's script."""
        memory = f"{int(r.mem_gb)}GB" if r.mem_gb == int(r.mem_gb) else f"{int(r.mem_gb * 1024)}MB"
        params: dict[str, Any] = {
            "job_name": job_name, "time": r.time_min, "nodes": r.nodes, "ntasks_per_node": 1,
            "cpus_per_task": r.cpus_per_task, "mem": memory, "signal_delay_s": SIGNAL_DELAY_S,
            "setup": [*r.setup, _training_line(r)],
            # the submitting shell's environment (the venv, CCLNB_CACHE, ...) and working directory
            "additional_parameters": {"export": "ALL", "chdir": str(Path.cwd()), **dict(r.sbatch)}}
        optional = {"gpus_per_node": r.gpus_per_node or None, "partition": r.partition, "account": r.account}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params

    def script(self, job_name: str, resources: res.Resources) -> str:
        from submitit.slurm.slurm import _make_sbatch_string   # what SlurmExecutor writes

        return _make_sbatch_string(command=self.command, folder=self.folder, **self.parameters(job_name, resources))

    def executor(self, job_name: str, resources: res.Resources) -> submitit.Executor:
        executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=resources.max_requeues)
        executor.update_parameters(**self.parameters(job_name, resources))
        return executor

    def active(self, job_ids: list[str]) -> set[str]:
        """The ids among `job_ids` that squeue still lists (pending, running, requeued)."""
        if not job_ids:
            return set()
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i", "-u", getpass.getuser()], capture_output=True,
                                 text=True, timeout=120, check=True).stdout
        except (subprocess.SubprocessError, OSError) as error:
            raise ConfigError(f"squeue failed ({error}), so which jobs still run is unknown; check that "
                              f"SLURM answers (squeue -u $USER) and run the command again") from error
        return set(job_ids) & set(out.split())


class LocalBackend(Backend):
    name = "submitit-local"
    poll_s = 1.0

    def script(self, job_name: str, resources: res.Resources) -> str:
        return "\n".join([f"# {job_name}: submitit's local executor runs no batch script; it starts",
                          f"#   {self.command}",
                          f"# as a process of this machine (time limit {resources.time_min} min, "
                          f"warning {SIGNAL_DELAY_S} s before it)", *resources.setup, _training_line(resources)])

    def executor(self, job_name: str, r: res.Resources) -> submitit.Executor:
        executor = submitit.LocalExecutor(folder=self.folder, max_num_timeout=r.max_requeues)
        executor.update_parameters(timeout_min=r.time_min, gpus_per_node=r.gpus_per_node, tasks_per_node=1,
                                   signal_delay_s=SIGNAL_DELAY_S, **({"setup": list(r.setup)} if r.setup else {}))
        return executor

    def active(self, job_ids: list[str]) -> set[str]:
        """A local job's id is its controller's pid: active while that process runs."""
        alive = set()
        for job_id in job_ids:
            try:
                process = psutil.Process(int(job_id))
                if "submitit.local._local" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                    alive.add(job_id)
            except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
                continue
        return alive


# ----------------------------------------------------------------------------- the command
def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """Check, then submit the unfinished pairs (or show them, or only report); see the module."""
    if args.jobs is not None:
        raise ConfigError(f"--jobs sets how many runs proceed at once on this machine; with --launcher "
                          f"{args.launcher} the scheduler runs the jobs: drop --jobs")
    if any(p.partition("=")[0].strip().rpartition(".")[2] == "torchrun_args" for p in args.param):
        raise ConfigError("-p torchrun_args is set by the cluster launcher from --nodes and --gpus-per-node; "
                          "drop it")
    plan_args: dict[str, Any] = {
        "preset": args.preset, "overrides": list(args.param), "methods": args.methods, "study": args.study,
        "seeds": args.seeds, "baseline": args.baseline,
        "runs_root": str(Path(args.runs_root).resolve()), "reports_root": str(Path(args.reports_root).resolve()),
        "records": [str(Path(folder).resolve()) for folder in args.records]}
    plan = study.plan_study(**plan_args, force=args.force)   # every -p is checked here first
    pairs = pairs_of(plan)
    devices = {step.notebook: step.parameters.get("device") for step in plan.steps
               if step.notebook in ("task_sequence", "linear_eval")}
    resources = res.with_options(
        res.for_preset(plan.preset.name, list(devices.values())), nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
        time_min=res.parse_time(args.time) if args.time else None, partition=args.partition,
        account=args.account, sbatch=res.parse_sbatch(args.sbatch) or None,
        setup=tuple(args.setup) or None, max_requeues=args.max_requeues)
    backend = (SlurmBackend if args.launcher == "slurm" else LocalBackend)(plan.runs_dir / args.launcher)
    if args.report_only:
        if args.dry_run or args.wait or args.force:
            raise ConfigError("--report-only renders the records and submits nothing: drop --dry-run, "
                              "--wait and --force")
        report(plan_args, pairs, backend, log)
        return 0
    note = check(args, plan, resources, devices)
    return submit(args, plan_args, plan, backend, resources, log, note)


def check(args: argparse.Namespace, plan: study.Study, resources: res.Resources,
          devices: dict[str, Any]) -> str | None:
    """Everything knowable before a job is submitted; returns a note for the terminal, if any."""
    from cclnb.study.preflight import check_study

    check_study(plan, here=False)    # the runs' configs, linear evals, records and output folders
    note = res.check_devices(devices, resources, plan.preset.name)
    first = next((s for s in plan.steps if s.notebook == "task_sequence"), None)
    if first is not None:
        res.check_world(first.parameters, resources)
    if args.launcher == "submitit-local" and resources.nodes > 1:
        raise ConfigError(f"--launcher submitit-local runs jobs on this one machine; --nodes {resources.nodes} "
                          f"needs --launcher slurm")
    if args.launcher != "slurm":
        return note
    found = res.partitions()
    if found is None and not args.dry_run:
        raise ConfigError("SLURM is not reachable from here (no sinfo on PATH); run on the cluster's login "
                          "node, use --dry-run to see the job scripts, or --launcher submitit-local to run "
                          "the same jobs on this machine")
    if found is None:
        note = "\n".join(filter(None, [note, "note: sinfo not found: the partition is not checked"]))
    else:
        res.check_partition(resources, found)
    if not args.assume_shared_fs:
        res.check_shared({"runs root": plan.runs_dir, "records folder": plan.records_dir})
    return note


def submit(args: argparse.Namespace, plan_args: dict[str, Any], plan: study.Study, backend: Backend,
           resources: res.Resources, log: Callable[[str], None], note: str | None) -> int:
    """Submit what is unfinished and not already queued (with --force, after deleting its run
    directories); then wait and report, if asked."""
    name, pairs = plan.name, pairs_of(plan)
    manifest = read_manifest(backend.folder)
    queued = backend.active([manifest[p.key].job_id for p in pairs if p.key in manifest])
    watched = [p for p in pairs if p.key in manifest and manifest[p.key].job_id in queued]
    if args.force and watched:
        raise ConfigError("--force would delete the run directories of " + ", ".join(
            f"{p.group} (job {manifest[p.key].job_id})" for p in watched) + " while their jobs are queued or "
            "running; cancel them first (scancel ID) or drop --force")
    todo: list[Pair] = []
    for pair in pairs:
        if pair in watched:
            log(f"{pair.group}: already queued or running as job {manifest[pair.key].job_id} (not submitted again)")
        elif pair.record.is_file() and not args.force:
            log(f"{pair.group}: finished, record {pair.record} (not submitted)")
        elif pair.trained:
            if not args.dry_run:
                pair.steps[-1].action()
            log(f"{pair.group}: finished in {pair.steps[0].output.parent}; record "
                f"{'would be ' if args.dry_run else ''}written here: {pair.record}")
        else:
            todo.append(pair)
    log(f"{len(todo)} of {len(pairs)} (method, seed) to submit with --launcher {backend.name}; each job: "
        f"{resources.describe()}")
    if resources.evaluation_only() != resources:
        log(f"the untrained baselines only evaluate: {resources.evaluation_only().describe()}")
    if note:
        log(note)
    if args.force and todo:
        log(f"--force: their run directories {'would be' if args.dry_run else 'were'} deleted; they train "
            f"from the start")
    if args.dry_run:
        for pair in todo:
            log(f"\n=== {pair.group}: job script ===\n{backend.script(job_name(name, pair), pair.resources(resources))}\n"
                f"# it runs, in order: " + "; ".join(step.label.split(": ", 1)[1] for step in pair.steps))
        log(f"\ndry run: nothing submitted ({name}: {len(todo)} job(s) would be)")
        return 0
    for run_dir in plan.forced:          # planned as if empty: deleted only now, after every check
        shutil.rmtree(run_dir)
    for pair in todo:
        job = backend.submit(StudyJob({**plan_args, "seeds": [pair.seed]}, pair.group, pair.resources(resources),
                                      GRACE_S), job_name(name, pair))
        manifest[pair.key] = Submitted(str(job.job_id), str(job.paths.stdout), str(job.paths.stderr),
                                       datetime.datetime.now().isoformat(timespec="seconds"))
        write_manifest(backend.folder, manifest)
        log(f"{pair.group}: job {job.job_id}, log {job.paths.stdout} (errors: {job.paths.stderr}); "
            f"notebook logs in {pair.steps[0].output.parent}")
    if not args.wait:
        log("to watch them: the same command with --wait; to render the report from the records that "
            "exist: the same command with --report-only")
        return 0
    wait([*watched, *todo], manifest, backend, log)
    missing = report(plan_args, pairs, backend, log)
    if missing:
        failures = [study.StepFailure(f"{m['method']} seed {m['seed']}", f"job {m['job']}", m["error"], Path(m["log"]))
                    for m in missing]
        raise study.StudyStepFailed(failures, f"{len(missing)} (method, seed) of {len(pairs)} have no record: "
                                    + "; ".join(f"{m['method']} seed {m['seed']} ({m['error']})" for m in missing)
                                    + ". The report lists them; run the same command again to submit them again")
    return 0


def job_name(study_name: str, pair: Pair) -> str:
    return f"cclnb-{study_name}-{pair.key}"


def wait(pairs: list[Pair], manifest: dict[str, Submitted], backend: Backend, log: Callable[[str], None]) -> None:
    """Poll until none of the pairs' jobs is queued or running, saying when each ends."""
    pending = {manifest[p.key].job_id: p for p in pairs}
    log(f"waiting for {len(pending)} job(s) (every {backend.poll_s:.0f} s) ...")
    while pending:
        time.sleep(backend.poll_s)
        still = backend.active(list(pending))
        for job_id in [j for j in pending if j not in still]:
            pair = pending.pop(job_id)
            outcome = "record written" if pair.record.is_file() else "no record: it failed"
            log(f"{pair.group}: job {job_id} ended, {outcome}")


def last_error_line(backend: Backend, entry: Submitted) -> str:
    """The failed job's error: the last line of the traceback submitit kept, else of its stderr."""
    result = JobPaths(backend.folder, job_id=entry.job_id, task_id=0).result_pickle
    texts: list[str] = []
    if result.is_file():
        try:
            outcome, value = pickle_load(result)
            if outcome == "error":
                texts.append(str(value))
        except Exception as error:     # a cut or foreign pickle: fall back on the log
            texts.append(f"(its result file {result} is unreadable: {error})")
    errors = Path(entry.errors)
    if errors.is_file():
        texts.append(errors.read_text(encoding="utf-8", errors="replace"))
    for text in texts:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "no error recorded: the job was cancelled or killed before it ended (see sacct -j ID)"


def missing_pairs(pairs: list[Pair], backend: Backend) -> list[dict[str, Any]]:
    """Every pair without a record, with its job, log and the error's last line."""
    manifest = read_manifest(backend.folder)
    absent = [p for p in pairs if not p.record.is_file()]
    queued = backend.active([manifest[p.key].job_id for p in absent if p.key in manifest])
    found = []
    for pair in absent:
        entry = manifest.get(pair.key)
        if entry is None:
            error = f"never submitted with --launcher {backend.name}"
        elif entry.job_id in queued:
            error = "still queued or running"
        else:
            error = last_error_line(backend, entry)
        found.append({"method": pair.method, "seed": pair.seed, "job": entry.job_id if entry else "-",
                      "log": entry.log if entry else "-", "error": error})
    return found


def report(plan_args: dict[str, Any], pairs: list[Pair], backend: Backend, log: Callable[[str], None]
           ) -> list[dict[str, Any]]:
    """Render the report from the records that exist, listing the pairs that have none."""
    missing = missing_pairs(pairs, backend)
    for m in missing:
        log(f"missing: {m['method']} seed {m['seed']} (job {m['job']}, log {m['log']}): {m['error']}")
    plan = study.plan_study(**plan_args, report_only=True)
    step = plan.steps[-1]
    if not records.load_records(step.parameters["records"]):
        raise DataError(f"no (method, seed) of study {plan.name!r} has a record yet ({len(missing)} missing, "
                        f"listed above), so there is nothing to report; run the same command again once "
                        f"jobs have finished")
    step.parameters["missing"] = missing
    study.run_study(plan, log=log)
    return missing

