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

Where the evaluations run (`--eval-job`, default: the layout with the fewest allocated GPU-hours
by `cclnb.launch.cost`): `shared` submits each pair that trains as a training job on the whole
allocation, and each seed's linear evaluations and records, the untrained baselines' included,
as one 1-GPU job that depends on all of that seed's training jobs (`afterok`) and trains every
lincls classifier in one pass over the data; `separate` gives each pair its own 1-GPU evaluation
job after its training job. Either way a pair whose training is complete but has no record gets
only its evaluation, so a failed or killed evaluation never costs a retraining. `with-training`
runs every step in one job. The manifest keeps the training (or only) job under the record's
name and the evaluation job under `<record name>.evaluation` (the same job for a seed's pairs).
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
from typing import Any, Callable, Sequence

import submitit
from submitit.core.utils import JobPaths, pickle_load

from cclnb import study
from cclnb.errors import ConfigError, DataError
from cclnb.launch import cost
from cclnb.launch import resources as res
from cclnb.launch import torchrun
from cclnb.launch.job import StudyJob, evaluation_steps, local_job_alive
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

    @property
    def eval_key(self) -> str:
        """The manifest's name of its evaluation job (when it has one of its own)."""
        return f"{self.key}.evaluation"

    @property
    def trains(self) -> bool:
        return self.steps[0].notebook == "task_sequence"

    def training_complete(self) -> bool:
        """Whether its run directory says the training is complete, now (the plan's `done` is
        as it was when the command started)."""
        status = runs.read_status(Path(self.steps[0].parameters["run_dir"])) or {}
        return self.trains and status.get("state") == "complete"

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
    phase: str = "all"     # which of the pair's steps it runs (`cclnb.launch.job.PHASES`)


@dataclass(frozen=True)
class PlannedJob:
    """A job to submit: which pairs (several only for a seed's shared evaluation job), which of
    their steps (`phase`), on what; `after`: the ids of queued or running training jobs it must
    follow (besides those submitted with it)."""

    pairs: tuple[Pair, ...]
    phase: str
    resources: res.Resources
    after: tuple[str, ...] = ()

    @property
    def pair(self) -> Pair:
        return self.pairs[0]

    @property
    def keys(self) -> list[str]:
        """Its manifest entries: each pair's evaluation, or the one pair's training (or only) job."""
        return [p.eval_key for p in self.pairs] if self.phase == "evaluate" else [self.pair.key]

    @property
    def label(self) -> str:
        return self.pair.group if len(self.pairs) == 1 else f"seed {self.pair.seed}"

    @property
    def name_suffix(self) -> str:
        return "-eval" if self.phase == "evaluate" else ""

    def steps(self, runs_dir: Path) -> list[study.Step]:
        """The steps it runs, in order (an evaluation job's as `evaluation_steps` orders them)."""
        if self.phase != "evaluate":
            return self.pair.steps if self.phase == "all" else self.pair.steps[:1]
        return evaluation_steps([s for p in self.pairs for s in (p.steps[1:] if p.trains else p.steps)], runs_dir)


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

    def script(self, job_name: str, resources: res.Resources, after: Sequence[str] = (), phase: str = "all") -> str:
        raise NotImplementedError

    def executor(self, job_name: str, resources: res.Resources, after: Sequence[str] = (),
                 phase: str = "all") -> submitit.Executor:
        raise NotImplementedError

    def active(self, job_ids: list[str]) -> set[str]:
        raise NotImplementedError

    def submit(self, job: StudyJob, job_name: str, after: Sequence[str] = ()) -> submitit.Job:
        """Submit `job`; `after`: the ids of the jobs whose success it waits for."""
        try:
            return self.executor(job_name, job.resources, after, job.phase).submit(job)
        except (RuntimeError, subprocess.SubprocessError, OSError) as error:   # FailedJobError, no srun, ...
            raise ConfigError(f"the {self.name} submission of {job_name} failed: {error}; the jobs "
                              f"submitted before it are in {self.folder / MANIFEST}. Fix the cause and "
                              f"run the same command again (it submits only what is missing)") from error


def _training_line(resources: res.Resources, phase: str = "all") -> str:
    if phase == "evaluate":
        return "# evaluation: the linear evaluations and the record, each in one process"
    if not resources.uses_torchrun:
        return "# training: one process, in the task-sequence notebook's kernel"
    args = resources.torchrun_args(0, "<node 0 of the allocation>", "<20000 + job id % 20000>")
    return ("# training: the task-sequence notebook on node 0 runs "
            + shlex.join(torchrun.command("<TrainConfig as JSON>", args))
            + ("" if resources.nodes == 1 else "; every other node runs it with its own --node_rank"))


class SlurmBackend(Backend):
    name = "slurm"
    poll_s = 30.0

    def parameters(self, job_name: str, r: res.Resources, after: Sequence[str] = (),
                   phase: str = "all") -> dict[str, Any]:
        """submitit's SlurmExecutor parameters: the same dict writes the dry run's script. `after`:
        start only once those jobs have succeeded, and be cancelled if one fails (else the job
        would wait forever, and so would `--wait`)."""
        memory = f"{int(r.mem_gb)}GB" if r.mem_gb == int(r.mem_gb) else f"{int(r.mem_gb * 1024)}MB"
        dependency = {"dependency": "afterok:" + ":".join(after), "kill_on_invalid_dep": "yes"} if after else {}
        params: dict[str, Any] = {
            "job_name": job_name, "time": r.time_min, "nodes": r.nodes, "ntasks_per_node": 1,
            "cpus_per_task": r.cpus_per_task, "mem": memory, "signal_delay_s": SIGNAL_DELAY_S,
            "setup": [*r.setup, _training_line(r, phase)],
            # the submitting shell's environment (the venv, CCLNB_CACHE, ...) and working directory
            "additional_parameters": {"export": "ALL", "chdir": str(Path.cwd()), **dependency, **dict(r.sbatch)}}
        optional = {"gpus_per_node": r.gpus_per_node or None, "partition": r.partition, "account": r.account}
        params.update({k: v for k, v in optional.items() if v is not None})
        return params

    def script(self, job_name: str, resources: res.Resources, after: Sequence[str] = (), phase: str = "all") -> str:
        from submitit.slurm.slurm import _make_sbatch_string   # what SlurmExecutor writes

        return _make_sbatch_string(command=self.command, folder=self.folder,
                                   **self.parameters(job_name, resources, after, phase))

    def executor(self, job_name: str, resources: res.Resources, after: Sequence[str] = (),
                 phase: str = "all") -> submitit.Executor:
        executor = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=resources.max_requeues)
        executor.update_parameters(**self.parameters(job_name, resources, after, phase))
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

    def script(self, job_name: str, resources: res.Resources, after: Sequence[str] = (), phase: str = "all") -> str:
        waits = [f"# it waits for job(s) {', '.join(after)} to end, and evaluates only if their training completed"
                 ] if after else []
        return "\n".join([f"# {job_name}: submitit's local executor runs no batch script; it starts",
                          f"#   {self.command}",
                          f"# as a process of this machine (time limit {resources.time_min} min, "
                          f"warning {SIGNAL_DELAY_S} s before it)", *waits, *resources.setup,
                          _training_line(resources, phase)])

    def submit(self, job: StudyJob, job_name: str, after: Sequence[str] = ()) -> submitit.Job:
        """The local executor knows no dependencies: the job itself waits for `after`'s processes."""
        job.after_local = tuple(after)
        return super().submit(job, job_name)

    def executor(self, job_name: str, r: res.Resources, after: Sequence[str] = (),
                 phase: str = "all") -> submitit.Executor:
        executor = submitit.LocalExecutor(folder=self.folder, max_num_timeout=r.max_requeues)
        executor.update_parameters(timeout_min=r.time_min, gpus_per_node=r.gpus_per_node, tasks_per_node=1,
                                   signal_delay_s=SIGNAL_DELAY_S, **({"setup": list(r.setup)} if r.setup else {}))
        return executor

    def active(self, job_ids: list[str]) -> set[str]:
        """A local job's id is its controller's pid: active while that process runs."""
        return {job_id for job_id in job_ids if local_job_alive(job_id)}


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
    rates = cost.parse_throughputs(args.throughput, plan.preset.name)
    note = check(args, plan, resources, devices)
    layout = args.eval_job or cost.choose_layout(resources.world_size)
    chosen = "--eval-job" if args.eval_job else "the default: fewer allocated GPU-hours"
    where = {"shared": "each seed's linear evaluations (one pass) and records in one 1-GPU job after all its "
                       "training jobs",
             "separate": "the linear evaluations and the record of each trained pair in a 1-GPU job after its "
                         "training job",
             "with-training": "every step of a pair in one job"}[layout]
    note = "\n".join(filter(None, [note, f"layout: {layout} ({chosen}): {where}",
                                   cost.describe(plan, resources.nodes * resources.gpus_per_node, rates)
                                   if args.dry_run else None]))
    return submit(args, plan_args, plan, backend, resources, log, note, layout)


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
           resources: res.Resources, log: Callable[[str], None], note: str | None,
           layout: str = "with-training") -> int:
    """Submit what is unfinished and not already queued (with --force, after deleting its run
    directories); then wait and report, if asked. `layout`: where the evaluations run (`cost.LAYOUTS`)."""
    name, pairs = plan.name, pairs_of(plan)
    manifest = read_manifest(backend.folder)
    queued = backend.active([manifest[k].job_id for p in pairs for k in (p.key, p.eval_key) if k in manifest])

    def active(key: str) -> bool:
        return key in manifest and manifest[key].job_id in queued

    watched = [p for p in pairs if active(p.key) or active(p.eval_key)]
    if args.force and watched:
        raise ConfigError("--force would delete the run directories of " + ", ".join(
            f"{p.group} (job {manifest[p.key if active(p.key) else p.eval_key].job_id})" for p in watched)
            + " while their jobs are queued or running; cancel them first (scancel ID) or drop --force")
    todo: list[PlannedJob] = []
    shared: dict[int, list[tuple[Pair, str | None]]] = {}   # per seed: the pairs its evaluation job serves
    for pair in pairs:
        split = layout != "with-training" and pair.trains
        training_queued = active(pair.key) and manifest[pair.key].phase == "train"
        after = manifest[pair.key].job_id if training_queued else None
        if active(pair.eval_key) or (active(pair.key) and not (split and training_queued)):
            job_id = manifest[pair.eval_key if active(pair.eval_key) else pair.key].job_id
            log(f"{pair.group}: already queued or running as job {job_id} (not submitted again)")
        elif pair.record.is_file() and not args.force:
            log(f"{pair.group}: finished, record {pair.record} (not submitted)")
        elif pair.trained:
            if not args.dry_run:
                pair.steps[-1].action()
            log(f"{pair.group}: finished in {pair.steps[0].output.parent}; record "
                f"{'would be ' if args.dry_run else ''}written here: {pair.record}")
        elif split and (pair.steps[0].done or training_queued):
            log(f"{pair.group}: " + (f"its training job {after} is queued or running; its evaluation job is "
                                     f"submitted after it" if after else
                                     f"trained in {pair.steps[0].output.parent}; only its evaluation is submitted"))
            if layout == "shared":
                shared.setdefault(pair.seed, []).append((pair, after))
            else:
                todo.append(PlannedJob((pair,), "evaluate", resources.evaluation_only(), (after,) if after else ()))
        elif layout == "shared":
            if pair.trains:
                todo.append(PlannedJob((pair,), "train", resources))
            shared.setdefault(pair.seed, []).append((pair, None))
        elif split:
            todo += [PlannedJob((pair,), "train", resources),
                     PlannedJob((pair,), "evaluate", resources.evaluation_only())]
        else:
            todo.append(PlannedJob((pair,), "all", pair.resources(resources)))
    for members in shared.values():       # after the training jobs, whose ids they wait for
        todo.append(PlannedJob(tuple(p for p, _ in members), "evaluate", resources.evaluation_only(),
                               tuple(a for _, a in members if a)))
    log(f"{len({job.pair.key for job in todo})} of {len(pairs)} (method, seed) to submit with --launcher "
        f"{backend.name} ({len(todo)} job(s)); each training job: {resources.describe()}")
    if resources.evaluation_only() != resources:
        what = "the evaluation jobs and " if layout != "with-training" else ""
        log(f"{what}the untrained baselines only evaluate: {resources.evaluation_only().describe()}")
    if note:
        log(note)
    if args.force and todo:
        log(f"--force: their run directories {'would be' if args.dry_run else 'were'} deleted; they train "
            f"from the start")
    if args.dry_run:
        trained_now = {p.pair.key for p in todo if p.phase == "train"}
        for planned in todo:
            placeholders = [f"{p.key}_JOB_ID" for p in planned.pairs
                            if planned.phase == "evaluate" and p.key in trained_now]
            after = [*planned.after, *placeholders]
            named = (f" ({', '.join(placeholders)}: the id{'s' if len(placeholders) > 1 else ''} its training "
                     f"job{'s get' if len(placeholders) > 1 else ' gets'})" if placeholders else "")
            log(f"\n=== {planned.label}: {_what(planned.phase)} script{named} ===\n"
                f"{backend.script(job_name(name, planned), planned.resources, after, planned.phase)}\n"
                f"# it runs, in order: " + "; ".join(step.label.split(": ", 1)[1] for step in planned.steps(plan.runs_dir)))
        log(f"\ndry run: nothing submitted ({name}: {len(todo)} job(s) would be)")
        return 0
    for run_dir in plan.forced:          # planned as if empty: deleted only now, after every check
        shutil.rmtree(run_dir)
    pending: dict[str, tuple[list[Pair], str]] = {}
    for pair in watched:
        for key in (pair.key, pair.eval_key):
            if active(key):
                pending.setdefault(manifest[key].job_id, ([], manifest[key].phase))[0].append(pair)
    submitted_now: dict[str, str] = {}
    for planned in todo:
        pair = planned.pair
        after = list(planned.after)
        if planned.phase == "evaluate":           # the training jobs submitted just before it
            after += [submitted_now[p.key] for p in planned.pairs if p.key in submitted_now]
        job = backend.submit(StudyJob({**plan_args, "seeds": [pair.seed]}, [p.group for p in planned.pairs],
                                      planned.resources, GRACE_S, planned.phase), job_name(name, planned), after)
        if planned.phase != "evaluate":
            manifest.pop(pair.eval_key, None)     # an earlier evaluation job belongs to an earlier training
        for key in planned.keys:
            manifest[key] = Submitted(str(job.job_id), str(job.paths.stdout), str(job.paths.stderr),
                                      datetime.datetime.now().isoformat(timespec="seconds"), planned.phase)
            submitted_now[key] = str(job.job_id)
        pending[str(job.job_id)] = (list(planned.pairs), planned.phase)
        write_manifest(backend.folder, manifest)
        log(f"{planned.label}: {_what(planned.phase)} {job.job_id}" + (f" (after job {', '.join(after)})" if after else "")
            + f", log {job.paths.stdout} (errors: {job.paths.stderr}); notebook logs in {pair.steps[0].output.parent}")
    if not args.wait:
        log("to watch them: the same command with --wait; to render the report from the records that "
            "exist: the same command with --report-only")
        return 0
    wait(pending, backend, log)
    missing = report(plan_args, pairs, backend, log)
    if missing:
        failures = [study.StepFailure(f"{m['method']} seed {m['seed']}", f"job {m['job']}", m["error"], Path(m["log"]))
                    for m in missing]
        raise study.StudyStepFailed(failures, f"{len(missing)} (method, seed) of {len(pairs)} have no record: "
                                    + "; ".join(f"{m['method']} seed {m['seed']} ({m['error']})" for m in missing)
                                    + ". The report lists them; run the same command again to submit them again")
    return 0


def _what(phase: str) -> str:
    return {"all": "job", "train": "training job", "evaluate": "evaluation job"}[phase]


def job_name(study_name: str, planned: PlannedJob) -> str:
    who = planned.pair.key if len(planned.pairs) == 1 else f"seed{planned.pair.seed}"
    return f"cclnb-{study_name}-{who}{planned.name_suffix}"


def wait(pending: dict[str, tuple[list[Pair], str]], backend: Backend, log: Callable[[str], None]) -> None:
    """Poll until none of the jobs `pending` (id -> its pairs and phase) is queued or running,
    saying when each ends and what became of each of its pairs."""
    pending = dict(pending)
    log(f"waiting for {len(pending)} job(s) (every {backend.poll_s:.0f} s) ...")
    while pending:
        time.sleep(backend.poll_s)
        still = backend.active(list(pending))
        for job_id in [j for j in pending if j not in still]:
            pairs, phase = pending.pop(job_id)
            for pair in pairs:
                if pair.record.is_file():
                    outcome = "record written"
                elif phase == "train":
                    outcome = "trained" if pair.training_complete() else "the training failed"
                else:
                    outcome = "no record: it failed"
                log(f"{pair.group}: {_what(phase)} {job_id} ended, {outcome}")


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
    """Every pair without a record, with its job, log and the error's last line: the evaluation
    job's once the training is complete, else the training (or only) job's."""
    manifest = read_manifest(backend.folder)
    absent = [p for p in pairs if not p.record.is_file()]
    queued = backend.active([manifest[k].job_id for p in absent for k in (p.key, p.eval_key) if k in manifest])
    found = []
    for pair in absent:
        training, evaluation = manifest.get(pair.key), manifest.get(pair.eval_key)
        entry = evaluation if evaluation is not None and (training is None or pair.training_complete()) else training
        if any(e is not None and e.job_id in queued for e in (training, evaluation)):
            entry = next(e for e in (evaluation, training) if e is not None and e.job_id in queued)
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

