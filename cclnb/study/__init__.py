"""The study: presets, its plan of notebook steps, running them, records, aggregation and the report.

`presets` + `notebooks` (what may be asked) -> `plan` (the steps) -> `preflight` (the first knowable
failure, before any step) -> `run` (papermill, several steps at once) -> `baseline` (the untrained
encoders) and `records` (one small JSON per finished (method, seed)) -> `aggregate` (pure tables
of per-seed rows) and `report` / `figures` (what the notebooks show); `explore` reads run
directories for explore.ipynb. May import the shared basics, the data, training and evaluation
stages; never `cclnb.launch` or `cclnb.commands`.
"""

from cclnb.study.notebooks import (NOTEBOOKS, REPO_ROOT, notebook_parameters, notebook_path, parse_value,
                                   split_overrides)
from cclnb.study.plan import Step, Study, plan_study, train_config, untrained_config
from cclnb.study.presets import PRESETS, Preset, check_preset, get_preset, shared_data
from cclnb.study.run import StepFailure, StudyStepFailed, execute_step, render_html, run_study

__all__ = ["NOTEBOOKS", "PRESETS", "REPO_ROOT", "Preset", "Step", "StepFailure", "Study", "StudyStepFailed",
           "check_preset", "execute_step", "get_preset", "notebook_parameters", "notebook_path", "parse_value",
           "plan_study", "render_html", "run_study", "shared_data", "split_overrides", "train_config",
           "untrained_config"]
