"""User-facing errors.

Every mistake a user can make (a wrong path, an impossible task split, a typo'd parameter) raises
a `CclnbError` whose message names the problem *and* the fix. The CLI prints the message without
a traceback and exits with `exit_code`, so scripts and `cclnb study` can tell failures apart.
"""

from __future__ import annotations


class CclnbError(Exception):
    """A problem with the user's input or environment, explained in plain words."""

    exit_code: int = 2


class DataError(CclnbError):
    """The dataset is missing, malformed or unreadable."""

    exit_code = 3


class ConfigError(CclnbError):
    """The configuration is inconsistent (bad flag combination, unknown method, ...)."""

    exit_code = 2


class CheckpointError(CclnbError):
    """A checkpoint is corrupt, truncated, foreign, or belongs to another configuration."""

    exit_code = 4


class TrainingDiverged(CclnbError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 5


class RankLost(CclnbError):
    """Another process of a multi-process run died or stopped answering; this one stops too."""

    exit_code = 7


class Interrupted(CclnbError):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed."""

    exit_code = 130


class StudyBusy(CclnbError):
    """Another `cclnb study` runs the same study (runs root + name) now; nothing was run."""

    exit_code = 8
