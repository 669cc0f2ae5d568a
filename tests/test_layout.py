"""The package's folders are the study's stages, and imports flow one way through them.

data -> training -> evaluate -> study -> launch -> commands: a module may import the shared
basics (`cclnb.errors`, `cclnb.config`), its own stage and earlier ones, never a later one, so a
researcher changing a method (training) cannot find the report (study) depending on it the other
way round. Every import is checked, also the ones inside functions (a lazy import is still a
dependency). The public names of `cclnb` resolve to the module that defines them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cclnb

PACKAGE = Path(cclnb.__file__).resolve().parent
STAGES = ("data", "training", "evaluate", "study", "launch", "commands")
BASICS = ("errors", "config")
FLAT = {"__init__", "__main__", *BASICS}


def stage_of(module: str) -> int:
    """0 for the shared basics, 1.. for the stages in flow order; the entry point comes last."""
    parts = module.split(".")
    if parts[0] != "cclnb" or len(parts) == 1:
        raise ValueError(module)
    if parts[1] in BASICS:
        return 0
    if parts[1] == "__main__":
        return len(STAGES) + 1
    return STAGES.index(parts[1]) + 1


def facade_target(name: str) -> str:
    """The module a `from cclnb import NAME` really reaches."""
    if name == "__version__":
        return "cclnb.errors"          # a constant: as cheap as the basics
    if name == "train":
        return "cclnb.evaluate"        # the training stage's train with the evaluation stage's evaluator
    if name in cclnb._EXPORTS:
        return cclnb._EXPORTS[name]
    return f"cclnb.{name}"             # a stage folder or basic module


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, target module) of every cclnb import in `path`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cclnb.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cclnb":
                found += [(node.lineno, facade_target(a.name)) for a in node.names]
            elif node.module.startswith("cclnb."):
                found.append((node.lineno, node.module))
    return found


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_only_the_shared_basics_lie_flat_beside_the_stage_folders():
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert flat == FLAT
    assert folders == set(STAGES)


def test_no_module_imports_a_later_stage():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue   # the public surface: names from every stage, imported on first use
        module = module_name(path)
        for line, target in imported_modules(path):
            if stage_of(target) > stage_of(module):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({module}) imports {target}")
    assert not wrong, "imports against the flow:\n" + "\n".join(wrong)


def test_every_stage_says_what_it_may_import():
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "may import" in doc.lower(), f"cclnb/{stage}/__init__.py: say what the stage may import"


def test_importing_cclnb_stays_cheap_and_its_names_resolve():
    code = ("import sys, cclnb; assert 'torch' not in sys.modules, 'import cclnb loaded torch'; "
            "from cclnb import Trainer, TrainConfig, Batch, StepResult, open_dataset, train; "
            "assert Trainer.__module__ == 'cclnb.training.loop'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in cclnb.__all__:
        assert getattr(cclnb, name) is not None
