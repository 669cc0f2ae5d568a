"""The study's notebooks and their `parameters` cells: where they are, what they accept.

Why the checks here exist: papermill only *warns* about a misspelled parameter and then runs
with the default, which silently produces the wrong experiment; so every `-p name=value` is
checked against the notebooks' `parameters` cells and typed from their defaults.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from cclnb.errors import ConfigError

if TYPE_CHECKING:       # presets imports this module
    from cclnb.study.presets import Preset

REPO_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("task_sequence", "linear_eval", "report")
# Parameters the runner sets for every step; -p cannot override them (use the CLI options).
RUNNER_PARAMETERS = {"task_sequence": {"method", "run_dir", "resume", "seed"},
                     "linear_eval": {"run_dir", "who", "seed", "resume"},
                     "report": {"records", "out_dir", "study"}}
RUNNER_OPTIONS = {"seed": "--seeds", "records": "--records"}  # the option to use instead of -p


def notebook_path(notebook: str, notebooks_dir: str | Path | None = None) -> Path:
    path = Path(notebooks_dir or REPO_ROOT / "notebooks") / f"{notebook}.ipynb"
    if not path.is_file():
        raise ConfigError(f"notebook {path} not found; run from a cclnb checkout (the notebooks "
                          f"ship in its notebooks/ folder) or pass notebooks_dir")
    return path


def notebook_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """The `parameters` cell of a notebook as papermill reads it: name -> {default, type, help}."""
    import papermill

    params = papermill.inspect_notebook(str(path))
    if not params:
        raise ConfigError(f"{path} has no cell tagged `parameters`; tag the cell that holds the "
                          f"defaults so papermill can inject values")
    return params


def notebook_defaults(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The values a notebook's `parameters` cell assigns (what a run gets for a name no one set)."""
    return {name: _literal(spec.get("default", "None")) for name, spec in specs.items()}


_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict,
                           "list": list}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _declared_type(spec: Mapping[str, Any]) -> tuple[type | None, bool]:
    """(type, may be None) of a parameter, from its annotation or else its default's type."""
    annotation = spec.get("inferred_type_name") or "None"
    optional = re.fullmatch(r"Optional\[(\w+)\]", annotation)
    if optional:
        return _TYPES.get(optional.group(1)), True
    if annotation in _TYPES:
        return _TYPES[annotation], False
    default = _literal(spec.get("default", "None"))
    return (None, True) if default is None else (type(default), False)


def parse_value(name: str, raw: str, spec: Mapping[str, Any], now: str | None = None) -> Any:
    """Convert the text of `-p name=raw` to the type of the parameter's default; `now`: what the
    study sets it to, for the error ("the preset demo has 0.1"; default: the notebook's default)."""
    kind, optional = _declared_type(spec)
    text = raw.strip()
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return raw
        if kind in (list, dict):
            value = json.loads(text) if text[:1] in "[{" else ast.literal_eval(text)
            if not isinstance(value, kind):
                raise ValueError
            return value
    except (ValueError, SyntaxError, json.JSONDecodeError):
        expected = f"{kind.__name__}{' or None' if optional else ''}"
        said = now or f"default {spec.get('default')}"
        raise ConfigError(f"-p {name}={raw!r}: expected {expected} ({said})")
    return _literal(text)  # untyped default None: a Python literal, else the text itself


def split_overrides(pairs: Sequence[str], specs: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    preset: Preset | None = None) -> dict[str, dict[str, Any]]:
    """Route `name=value` pairs to the notebooks that declare `name`, typed from the defaults.

    An unprefixed name goes to the first notebook (task_sequence, linear_eval, report) that has
    it, so `-p epochs=5` means pretraining epochs; `linear_eval.epochs=30` targets one notebook.
    Unknown names are a ConfigError listing every valid name: papermill would only warn. A value of
    the wrong type quotes what `preset` sets the name to, else the notebook's default.
    """
    routed: dict[str, dict[str, Any]] = {nb: {} for nb in specs}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"-p {pair!r}: write parameters as name=value, e.g. -p epochs=5")
        notebook, dot, name = key.rpartition(".")
        if dot and notebook not in specs:
            raise ConfigError(f"-p {key}: unknown notebook prefix {notebook!r}; use one of "
                              f"{', '.join(specs)} (e.g. -p linear_eval.epochs=30)")
        candidates = [notebook] if dot else [nb for nb in specs if name in specs[nb]]
        target = next((nb for nb in candidates if name in specs[nb]), None)
        if target is None:
            valid = "; ".join(f"{nb}: {', '.join(sorted(set(specs[nb]) - RUNNER_PARAMETERS[nb]))}"
                              for nb in specs)
            raise ConfigError(f"unknown parameter {key!r}; valid names are -> {valid}")
        if name in RUNNER_PARAMETERS[target]:
            option = RUNNER_OPTIONS.get(name, "--methods, --runs-root, --reports-root or --study")
            raise ConfigError(f"-p {key}: `{name}` is set by the study runner for each step; use "
                              f"{option} instead")
        values = preset.parameters(target) if preset is not None else {}
        now = f"the preset {preset.name} has {values[name]!r}" if name in values else None
        routed[target][name] = parse_value(key, raw, specs[target][name], now)
    return routed
