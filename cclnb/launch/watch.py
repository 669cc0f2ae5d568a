"""Where a cluster study's jobs are, for `cclnb study --status`: the job ids the launcher kept
(`runs/<study>/<launcher>/jobs.json`, `cclnb.launch.cluster`) and their scheduler states through
submitit (sacct for SLURM; the controller process for submitit's local executor). Reads only.
"""

from __future__ import annotations

from pathlib import Path

import submitit

from cclnb.launch.cluster import Backend, LocalBackend, SlurmBackend, read_manifest
from cclnb.study.status import ACTIVE_JOB_STATES, WAITING_JOB_STATES, JobInfo


def _state(backend: Backend, job_id: str) -> str:
    if isinstance(backend, SlurmBackend):
        return submitit.SlurmJob(backend.folder, job_id).state     # UNKNOWN when sacct cannot tell
    return "RUNNING" if backend.active([job_id]) else "ENDED"


def _rank(info: JobInfo) -> int:
    """Which of a pair's jobs (its training, its evaluation) speaks for it: one that runs, else one
    that waits, else the last submitted."""
    word = info.state.split()[0].upper() if info.state else ""
    return 2 if word in ACTIVE_JOB_STATES else 1 if word in WAITING_JOB_STATES else 0


def job_states(runs_dir: Path) -> dict[str, JobInfo]:
    """Every submitted (method, seed) of the study in `runs_dir`, by record name ("CCL-seed0"),
    with the job that speaks for it now."""
    found: dict[str, JobInfo] = {}
    for backend in (SlurmBackend(Path(runs_dir) / "slurm"), LocalBackend(Path(runs_dir) / "submitit-local")):
        for key, entry in sorted(read_manifest(backend.folder).items()):   # a pair's evaluation job after it
            info = JobInfo(backend.name, entry.job_id, _state(backend, entry.job_id), entry.log)
            pair = key.split(".")[0]
            if pair not in found or _rank(info) >= _rank(found[pair]):
                found[pair] = info
    return found
