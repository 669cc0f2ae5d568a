"""One (method, seed) of a study as a submitit job that SLURM may stop and requeue.

The job runs on its node what a local `cclnb study` runs for that (method, seed): the steps of
its group in `cclnb.study.plan_study`'s plan (task-sequence notebook, linear evaluations, the
record), each notebook in its own papermill process as `--jobs N` runs them. It keeps no state of
its own: every start plans again from the run directory, so a requeued job skips what is finished
and resumes the training from `checkpoints/last.pt`, exactly as rerunning a local study does.

Signals. SLURM warns a job `signal_delay_s` before its time limit, and on preemption, with
submitit's signal (USR2 by default), and later sends SIGTERM, then SIGKILL, to *every* process of
the job. So the job starts its notebooks with SIGTERM and the warning signal ignored (ignored
signals stay ignored across exec, so the papermill process and its kernel keep running); the
trainer installs its own SIGTERM handler while it trains (`cclnb.training.lifecycle.StopFlag`), and torchrun
its own, which forwards to the workers. On the warning, submitit calls `checkpoint` here: it sends
SIGTERM to the running notebook's processes (torchrun's workers directly, `stop_process_tree`),
the trainer finishes its step, saves `last.pt` and stops, and submitit requeues the job, which
resumes on its next start. A linear evaluation or an
untrained baseline has nothing to save and is killed; it runs again from its start.

Phases. A (method, seed) that trains is, on an allocation of several GPUs, a training job and
an evaluation job (`cclnb.launch.cost.choose_layout`): phase `train` runs the task sequence on the
whole allocation (its per-task evaluation on every rank), and phase `evaluate` runs the linear
evaluations and the record on one GPU once the training job has succeeded (SLURM's `afterok`
dependency; under submitit's local executor, which has none, the evaluation job waits for the
training jobs' processes, `after_local`). By default one evaluation job serves every (method,
seed) of a seed (`groups`), the untrained baselines included: it trains all their lincls
classifiers in one pass over the data (linear_eval.ipynb's `also`, `cclnb lincls --also`), each
result equal to its own evaluation's. Phase `all` runs every step in one job. A requeued
evaluation job continues each linear evaluation from its last finished epoch (`lincls_<who>.pt`).

Several nodes: task 0 (node 0) runs the notebooks; the task-sequence notebook starts torchrun with
node rank 0. Every other node's task only joins that training: it builds the same TrainConfig
from the same plan (`cclnb.study.train_config`) and starts torchrun with its own node rank.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import psutil
import submitit

from cclnb import study
from cclnb.errors import ConfigError
from cclnb.evaluate.lincls import AUTO_RESUME
from cclnb.launch import torchrun
from cclnb.launch.resources import Resources
from cclnb.study import run as study_run

POLL_S = 1.0
PHASES = ("all", "train", "evaluate")


def preemption_signal() -> signal.Signals:
    """The signal submitit asks SLURM to send before the time limit (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]


def ignore_scheduler_signals() -> None:
    """`preexec_fn` of a notebook process: ignore SIGTERM and the preemption signal (inherited by
    the kernel and what it starts, until one installs its own handler)."""
    for sig in (signal.SIGTERM, preemption_signal()):
        signal.signal(sig, signal.SIG_IGN)


def master_port(job_id: str) -> int:
    """A port for torchrun's rendezvous that differs between jobs sharing a node."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def local_job_alive(job_id: str) -> bool:
    """Whether submitit's local executor still runs job `job_id` (its controller's pid)."""
    try:
        process = psutil.Process(int(job_id))
        return ("submitit.local._local" in " ".join(process.cmdline())
                and process.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def one_pass(steps: Sequence[study.Step]) -> bool:
    """Whether these linear-evaluation steps can train their classifiers in one pass: notebooks of
    the lincls protocol (the probe extracts each encoder's features once; nothing to share) with
    the same settings but for whose encoder (the batches depend only on them)."""
    def settings(step: study.Step) -> dict[str, Any]:
        return {k: v for k, v in step.parameters.items() if k not in ("run_dir", "who", "resume", "also")}

    return (len(steps) > 1 and all(s.notebook == "linear_eval" and s.action is None for s in steps)
            and all(s.parameters.get("protocol", "lincls") == "lincls" for s in steps)
            and all(settings(s) == settings(steps[0]) for s in steps))


def evaluation_steps(steps: list[study.Step], runs_dir: Path) -> list[study.Step]:
    """What an evaluation job runs of its groups' `steps`, in order: each untrained baseline's
    encoder, the linear evaluations (those left to do in one pass when `one_pass` allows,
    `linear_evals_seed<k>.ipynb` in the study's runs folder), then the records."""
    firsts = [s for s in steps if s.notebook == "untrained"]
    evaluations = [s for s in steps if s.notebook == "linear_eval"]
    records = [s for s in steps if s.notebook == "record"]
    left = [s for s in evaluations if not s.done]
    if not one_pass(left):
        return [*firsts, *evaluations, *records]
    first = left[0]
    seeds = sorted({s.parameters.get("seed") for s in left})
    name = "seed" + "-".join(map(str, seeds))
    merged = study.Step(f"{name}: linear evals in one pass ({len(left)} encoders: "
                        + ", ".join(s.label.split(": ")[0] + f" {s.parameters['who']}" for s in left) + ")",
                        "linear_eval", runs_dir / f"linear_evals_{name}.ipynb",
                        {**first.parameters, "resume": AUTO_RESUME,
                         "also": [f"{s.parameters['run_dir']}:{s.parameters['who']}" for s in left[1:]]},
                        group=first.group)
    return [*firsts, merged, *records]


def resume_linear_evals(steps: list[study.Step]) -> None:
    """Let every unfinished linear-evaluation notebook among `steps` continue from the state its
    stopped run saved after its last finished epoch (`lincls_<who>.pt`, written atomically), as
    a requeued job must: the lincls protocol is hours at 224 px, and a rerun repeats it exactly
    (each epoch's order and augmentation are drawn from the seed and the epoch alone)."""
    for step in steps:
        if (step.notebook != "linear_eval" or step.action is not None or step.done
                or step.parameters.get("resume") == AUTO_RESUME):
            continue
        state = Path(step.parameters["run_dir"]) / f"lincls_{step.parameters['who']}.pt"
        if state.is_file():
            step.parameters["resume"] = str(state)


class StudyJob(submitit.helpers.Checkpointable):
    """The groups `groups` ("CCL seed 0", ...; several only for phase `evaluate`) of the plan that
    `plan` (plan_study's keyword arguments) describes, run with `resources`; `grace_s`: how long a
    stopped training may take to save before it is killed (less than the warning's lead on the
    time limit); `phase`: which of their steps this job runs (`PHASES`, see the module docstring);
    `after_local`: the local executor's training jobs an evaluation job waits for."""

    def __init__(self, plan: dict[str, Any], groups: Sequence[str], resources: Resources, grace_s: float,
                 phase: str = "all", after_local: Sequence[str] = ()) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if len(groups) != 1 and phase != "evaluate":
            raise ValueError(f"only an evaluation job serves several (method, seed); got {list(groups)} for {phase!r}")
        self.plan = plan
        self.groups = tuple(groups)
        self.resources = resources
        self.grace_s = grace_s
        self.phase = phase
        self.after_local = tuple(after_local)
        self._running: tuple[study.Step, Any] | None = None   # the notebook running now

    @property
    def label(self) -> str:
        return self.groups[0] if len(self.groups) == 1 else f"the evaluations of {', '.join(self.groups)}"

    def __getstate__(self) -> dict[str, Any]:
        """What is pickled for the requeued start: the description, never the processes."""
        return {**self.__dict__, "_running": None}

    def planned(self) -> study.Study:
        """The study planned afresh from the run directory, narrowed to these groups and the
        report step (which `cclnb.study.preflight` reads for the records folders)."""
        plan = study.plan_study(**self.plan)
        steps = [s for s in plan.steps if s.group in self.groups]
        absent = set(self.groups) - {s.group for s in steps}
        if absent:
            raise ConfigError(f"the study's plan has no {', '.join(sorted(absent))}; it was submitted with other "
                              f"methods or seeds than it now plans. Submit it again")
        return dataclasses.replace(plan, steps=[*steps, plan.steps[-1]])

    def __call__(self, log: Callable[[str], None] = print) -> str:
        from cclnb.study.preflight import check_study

        env = submitit.JobEnvironment()
        while any(local_job_alive(job_id) for job_id in self.after_local):
            time.sleep(POLL_S)     # the local executor's stand-in for SLURM's afterok
        plan = self.planned()
        steps = plan.steps[:-1]
        if env.global_rank > 0:
            return self._join_training(steps[0], env)
        if self.phase == "evaluate":
            untrained = [s for s in steps if s.notebook == "task_sequence" and not s.done]
            if untrained:
                raise ConfigError(f"{', '.join(s.group for s in untrained)}: the training is not complete ("
                                  f"{untrained[0].output.parent}/status.json), so there is nothing to evaluate; the "
                                  f"training job failed or was cancelled (its log says why). Run the same command "
                                  f"again: it resubmits the training")
        check_study(plan)          # on this node: its GPUs and its view of the data
        steps = evaluation_steps(steps, plan.runs_dir) if self.phase == "evaluate" else \
            {"all": steps, "train": steps[:1]}[self.phase]
        if self.resources.uses_torchrun and steps[0].notebook == "task_sequence":
            steps[0].parameters["torchrun_args"] = self.resources.torchrun_args(
                0, env.hostnames[0], master_port(env.job_id))
        resume_linear_evals(steps)
        total = len(steps)
        with study_run.pinned_threads(plan.preset.threads):   # a preset's pinned threads hold here too
            for index, step in enumerate(steps, start=1):
                if step.done:
                    log(f"[{index}/{total}] {step.label}: already complete, skipped ({step.output.parent})")
                    continue
                failure = (study_run._run_action(step, index, total, log) if step.action is not None
                           else self._run_notebook(step, index, total, log))
                if failure is not None:
                    raise study_run._failed([failure], plan.runs_dir / "failures.log")
        return f"{self.label}: {'trained' if self.phase == 'train' else 'complete'}"

    def _run_notebook(self, step: study.Step, index: int, total: int,
                      log: Callable[[str], None]) -> study.StepFailure | None:
        """Run one notebook in its own process (deaf to the scheduler's signals), polling: the
        signal handler that may stop it runs in this thread and must be able to reap it."""
        threads = max(1, self.resources.cpus_per_task // self.resources.processes_per_node)
        log(f"[{index}/{total}] {step.label} ... (log {step.output.with_suffix('.log')})")
        tic = time.monotonic()
        process = study_run._launch(step, self.plan.get("notebooks_dir"), threads,
                                preexec_fn=ignore_scheduler_signals)
        self._running = (step, process)
        try:
            while process.poll() is None:
                time.sleep(POLL_S)
        finally:
            self._running = None
        if process.returncode != 0:
            return study_run._subprocess_failure(step, index, total)
        log(f"[{index}/{total}] {step.label}: done in {time.monotonic() - tic:.0f} s")
        return None

    def _join_training(self, first: study.Step, env: submitit.JobEnvironment) -> str:
        """Node > 0 of a multi-node job: train this node's share of the task sequence."""
        if first.notebook != "task_sequence" or first.done or self.phase == "evaluate":
            return f"{self.label}: nothing to train on node {env.node}"
        signal.signal(preemption_signal(), signal.SIG_IGN)   # task 0 decides; torchrun inherits this
        args = self.resources.torchrun_args(env.node, env.hostnames[0], master_port(env.job_id))
        torchrun.train(study.train_config(first.parameters), args)
        return f"{self.label}: node {env.node} trained"

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit's hook on the warning signal: stop the running notebook so that its training
        saves, then requeue this job unchanged (its next start plans from the run directory)."""
        if self._running is not None:
            step, process = self._running
            stop_process_tree(process, signal.SIGTERM if step.notebook == "task_sequence" else signal.SIGKILL,
                              self.grace_s)
        return super().checkpoint(*args, **kwargs)


def _torchrun_agent(member: psutil.Process) -> bool:
    try:
        return "torch.distributed.run" in " ".join(member.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_process_tree(process: Any, sig: int, grace_s: float) -> None:
    """Send `sig` to `process` and every process below it, wait up to `grace_s` for `process`
    to end, then kill what is left. A torchrun agent is spared a SIGTERM: it would forward it and
    give its workers only 30 s to save before killing them; signalled directly, the workers take
    what their checkpoint needs and the agent exits after them."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        if sig == signal.SIGTERM and _torchrun_agent(member):
            continue
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S / 4)
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()

