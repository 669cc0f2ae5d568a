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

Phases. A (method, seed) that trains is, by default on an allocation of several GPUs, two jobs
(`cclnb.launch.cost.choose_layout`): phase `train` runs the task sequence on the whole allocation
(its per-task evaluation on every rank), and phase `evaluate` runs the linear evaluations and the
record on one GPU once the training job has succeeded (SLURM's `afterok` dependency; under
submitit's local executor, which has none, the evaluation job waits for the training job's
process, `after_local`). Phase `all` runs every step in one job. A requeued evaluation job
continues each linear evaluation from its last finished epoch (`lincls_<who>.pt`).

Several nodes: task 0 (node 0) runs the notebooks; the task-sequence notebook starts torchrun with
node rank 0. Every other node's task only joins that training: it builds the same TrainConfig
from the same plan (`cclnb.study.train_config`) and starts torchrun with its own node rank.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any, Callable

import psutil
import submitit

from cclnb import study
from cclnb.errors import ConfigError
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


def resume_linear_evals(steps: list[study.Step]) -> None:
    """Let every unfinished linear-evaluation notebook among `steps` continue from the state its
    stopped run saved after its last finished epoch (`lincls_<who>.pt`, written atomically), as
    a requeued job must: the lincls protocol is hours at 224 px, and a rerun repeats it exactly
    (each epoch's order and augmentation are drawn from the seed and the epoch alone)."""
    for step in steps:
        if step.notebook != "linear_eval" or step.action is not None or step.done:
            continue
        state = Path(step.parameters["run_dir"]) / f"lincls_{step.parameters['who']}.pt"
        if state.is_file():
            step.parameters["resume"] = str(state)


class StudyJob(submitit.helpers.Checkpointable):
    """The group `group` ("CCL seed 0") of the plan that `plan` (plan_study's keyword
    arguments) describes, run with `resources`; `grace_s`: how long a stopped training may take
    to save before it is killed (less than the warning's lead on the time limit); `phase`: which
    of its steps this job runs (`PHASES`, see the module docstring); `after_local`: the local
    executor's training job an evaluation job waits for."""

    phase = "all"                  # class defaults: a job pickled before phases existed runs it all
    after_local: str | None = None

    def __init__(self, plan: dict[str, Any], group: str, resources: Resources, grace_s: float,
                 phase: str = "all", after_local: str | None = None) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.plan = plan
        self.group = group
        self.resources = resources
        self.grace_s = grace_s
        self.phase = phase
        self.after_local = after_local
        self._running: tuple[study.Step, Any] | None = None   # the notebook running now

    def __getstate__(self) -> dict[str, Any]:
        """What is pickled for the requeued start: the description, never the processes."""
        return {**self.__dict__, "_running": None}

    def planned(self) -> study.Study:
        """The study planned afresh from the run directory, narrowed to this group and the report
        step (which `cclnb.study.preflight` reads for the records folders)."""
        plan = study.plan_study(**self.plan)
        steps = [s for s in plan.steps if s.group == self.group]
        if not steps:
            raise ConfigError(f"the study's plan has no {self.group!r}; it was submitted with other "
                              f"methods or seeds than it now plans. Submit it again")
        return dataclasses.replace(plan, steps=[*steps, plan.steps[-1]])

    def __call__(self, log: Callable[[str], None] = print) -> str:
        from cclnb.study.preflight import check_study

        env = submitit.JobEnvironment()
        while self.after_local is not None and local_job_alive(self.after_local):
            time.sleep(POLL_S)     # the local executor's stand-in for SLURM's afterok
        plan = self.planned()
        steps = plan.steps[:-1]
        if env.global_rank > 0:
            return self._join_training(steps[0], env)
        if self.phase == "evaluate" and not steps[0].done:
            raise ConfigError(f"{self.group}: its training is not complete ({steps[0].output.parent}/status.json), "
                              f"so there is nothing to evaluate; the training job failed or was cancelled (its "
                              f"log says why). Run the same command again: it resubmits the training")
        check_study(plan)          # on this node: its GPUs and its view of the data
        steps = {"all": steps, "train": steps[:1], "evaluate": steps[1:]}[self.phase]
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
        return f"{self.group}: {'trained' if self.phase == 'train' else 'complete'}"

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
            return f"{self.group}: nothing to train on node {env.node}"
        signal.signal(preemption_signal(), signal.SIG_IGN)   # task 0 decides; torchrun inherits this
        args = self.resources.torchrun_args(env.node, env.hostnames[0], master_port(env.job_id))
        torchrun.train(study.train_config(first.parameters), args)
        return f"{self.group}: node {env.node} trained"

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

