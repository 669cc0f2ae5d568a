"""The study: presets, its plan of notebook steps, running them, records, aggregation and the report.

`presets` + `notebooks` (what may be asked) -> `plan` (the steps) -> `preflight` (the first knowable
failure, before any step) -> `run` (papermill, several steps at once) -> `baseline` (the untrained
encoders) and `records` (one small JSON per finished (method, seed)) -> `aggregate` (pure tables
of per-seed rows) and `report` / `figures` (what the notebooks show); `explore` reads run
directories for explore.ipynb. May import the shared basics, the data, training and evaluation
stages; never `cclnb.launch` or `cclnb.commands`.

The names below are imported on first use (as `cclnb`'s own), so that a process which needs one
light module, such as a notebook step's (`papermill_step`), does not import torch with the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module of this package that defines it
_EXPORTS = {
    **dict.fromkeys(("NOTEBOOKS", "REPO_ROOT", "notebook_parameters", "notebook_path", "parse_value",
                     "split_overrides"), "notebooks"),
    **dict.fromkeys(("Step", "Study", "expected_cost", "plan_study", "train_config", "untrained_config"), "plan"),
    **dict.fromkeys(("PRESETS", "Preset", "check_preset", "get_preset", "shared_data"), "presets"),
    **dict.fromkeys(("StepFailure", "StudyStepFailed", "execute_step", "render_html", "run_study"), "run"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """An exported name, or a module of this package (`cclnb.study.plan`), imported on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"cclnb.study.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"cclnb.study.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"cclnb.study.{name}":
            raise
        raise AttributeError(f"module 'cclnb.study' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
