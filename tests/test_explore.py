"""The exploration helpers (`cclnb.study.explore`), the notebooks' parameters cells, and the lab's
dependencies.

Runs are fake where only their files matter (config.json, replay/task_<t>.json): which study is
newest, which run a method means, recorded replay picks. Encoders are untrained ResNet-18s with
the ImageNet stem on the embedded shapes, fast on a CPU. The notebook's static path (papermill,
then the HTML export) runs once on the data alone; the trained-run and browser paths are in
test_notebooks.py and test_lab.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import tomllib
from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest
from matplotlib.figure import Figure
from nbconvert import HTMLExporter

from cclnb import study
from cclnb.errors import ConfigError, DataError
from cclnb.study import explore

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _fake_run(run_dir: Path, method: str, seed: int = 0, mtime: float | None = None,
              replay: dict[int, list[int]] | None = None) -> Path:
    run_dir.mkdir(parents=True)
    config = {"method": method, "seed": seed, "data": "demo", "dataset": "demo", "imagenetsub": False,
              "arch": "resnet18", "stem": "imagenet", "n_tasks": 5, "n_save": 2}
    (run_dir / "config.json").write_text(json.dumps(config))
    for task, ids in (replay or {}).items():
        (run_dir / "replay").mkdir(exist_ok=True)
        (run_dir / "replay" / f"task_{task}.json").write_text(
            json.dumps({"task": task, "ids": ids, "selection": "min_var" if method == "CCL" else "random"}))
    if mtime is not None:
        os.utime(run_dir / "config.json", (mtime, mtime))
    return run_dir


@pytest.fixture(scope="module")
def explorer() -> explore.Explorer:
    return explore.Explorer.from_data("demo", "demo", n_tasks=5, arch="resnet18", stem="imagenet")


# ----------------------------------------------------------------------------- notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_first_and_every_parameter_described(path: Path) -> None:
    nb = nbformat.read(str(path), as_version=4)
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    first = nb.cells[code[0]]
    assert "parameters" in first.metadata.get("tags", []), "the first code cell must be the parameters cell"
    assert all(nb.cells[i].cell_type == "markdown" for i in range(code[0])) and code[0] <= 1
    assigned = [t.id for node in ast.parse(first.source).body
                for t in ([node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", []))]
    described = papermill.inspect_notebook(str(path))
    # papermill must parse every line (a comment containing "=" makes it skip the parameter)
    assert list(described) == assigned
    assert not [name for name, spec in described.items() if not spec["help"].strip()], \
        "every parameter needs a one-line description after it (`name = value  # what it does`)"
    assert all(not cell.get("outputs") and not cell.get("execution_count") for cell in nb.cells
               if cell.cell_type == "code"), "notebooks are committed with outputs stripped"


def test_a_misspelled_study_parameter_is_still_an_error() -> None:
    specs = {nb: study.notebook_parameters(study.notebook_path(nb)) for nb in study.NOTEBOOKS}
    with pytest.raises(ConfigError, match="unknown parameter 'epoch'"):
        study.split_overrides(["epoch=3"], specs)


def test_environment_yml_names_the_same_jupyter_packages_as_pyproject() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {spec.split("#")[0].strip() for specs in extras.values() for spec in specs}
    pip_section = (REPO / "environment.yml").read_text().split("- pip:", 1)[1]
    named = [spec for spec in re.findall(r"^\s+- (\S+)", pip_section, re.M)
             if not spec.startswith(("torch", "-e"))]
    assert {"jupyterlab>=4.2", "ipywidgets>=8"} <= set(named) and set(named) <= declared


# ----------------------------------------------------------------------------- which runs
def test_newest_study_and_its_runs(tmp_path: Path) -> None:
    _fake_run(tmp_path / "old" / "CCL" / "seed0", "CCL", mtime=1_000)
    _fake_run(tmp_path / "new" / "CCL" / "seed1", "CCL", seed=1, mtime=2_000)
    _fake_run(tmp_path / "new" / "CCL" / "seed0", "CCL", mtime=2_000)
    _fake_run(tmp_path / "new" / "Finetuning" / "seed0", "Finetuning", mtime=2_000)
    newest = explore.pick_study(tmp_path)
    assert newest.name == "new"
    assert list(newest.configs) == ["Finetuning/seed0", "CCL/seed0", "CCL/seed1"]  # method order
    assert explore.run_for(newest, "CCL") == str(tmp_path / "new" / "CCL" / "seed0")
    assert newest.run_of("CCL", seed=1) == tmp_path / "new" / "CCL" / "seed1"
    assert explore.pick_study(tmp_path, "old").name == "old"
    with pytest.raises(DataError, match=r"no study 'demo' .*found: new, old"):
        explore.pick_study(tmp_path, "demo")
    with pytest.raises(DataError, match="has no 'Joint' run .*Finetuning, CCL"):
        explore.run_for(newest, "Joint")
    assert explore.pick_study(tmp_path / "missing") is None
    assert explore.run_for(None, "CCL") == explore.UNTRAINED


def test_relative_runs_root_falls_back_to_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # like a kernel started in notebooks/
    assert explore.resolve_runs_root("runs") == explore.REPO_ROOT / "runs"
    (tmp_path / "runs").mkdir()
    assert explore.resolve_runs_root("runs") == Path("runs")


# ----------------------------------------------------------------------------- the explorer
def test_split_views_and_embedding_figures(explorer: explore.Explorer) -> None:
    table = explorer.split_table()
    assert len(table) == 5 and table["train images"].sum() == len(explorer.train)
    assert sorted(c for cs in table["classes"] for c in cs.split(", ")) == sorted(explorer.train.classes)
    assert isinstance(explorer.task_split_figure(4), Figure)
    assert len(explorer.views_figure(1, n_images=4, n_views=2).axes) == 12  # images + 2 rows of views
    assert isinstance(explorer.embedding_figure(explore.UNTRAINED, max_points=100), Figure)


def test_replay_picks_recorded_by_runs_else_computed(tmp_path: Path, explorer: explore.Explorer) -> None:
    # no study: CCL's min-variance picks and SimpleReplay's random draw are computed here
    computed = explorer.replay_picks(0, None, explore.UNTRAINED, n_views=2, max_images=100)
    assert [p.method for p in computed] == ["CCL", "SimpleReplay"]
    k = len(explorer.task_classes[0])
    assert len(computed[0].ids) <= explorer.config.n_save * k == len(computed[1].ids)
    assert set(np.concatenate([p.ids for p in computed])) <= set(explorer.task_ids[0])
    assert "computed here" in computed[0].source
    # a study with both runs: their recorded ids, labelled as recorded
    ccl_ids, random_ids = explorer.task_ids[0][:3].tolist(), explorer.task_ids[0][-2:].tolist()
    _fake_run(tmp_path / "s" / "CCL" / "seed0", "CCL", replay={0: ccl_ids})
    _fake_run(tmp_path / "s" / "SimpleReplay" / "seed0", "SimpleReplay", replay={0: random_ids})
    recorded = explorer.replay_picks(0, explore.pick_study(tmp_path), explore.UNTRAINED)
    assert [p.ids.tolist() for p in recorded] == [ccl_ids, random_ids]
    assert recorded[0].source == "min_var, recorded by CCL seed 0"
    figure = explorer.replay_figure(0, recorded, n_cols=4)
    assert len(figure.axes) == 8  # 3 + 1 blank, then 2 + 2 blank


def test_teacher_of_a_run_without_one_is_a_clear_error(tmp_path: Path, explorer: explore.Explorer) -> None:
    run = _fake_run(tmp_path / "s" / "Finetuning" / "seed0", "Finetuning")
    with pytest.raises(DataError, match="keeps no teacher .*who='student'"):
        explorer.encoder(str(run), "teacher")


def test_run_choices_keep_runs_on_the_same_data(tmp_path: Path, explorer: explore.Explorer) -> None:
    _fake_run(tmp_path / "s" / "CCL" / "seed0", "CCL")
    other = _fake_run(tmp_path / "s" / "Joint" / "seed0", "Joint")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "data": "/data/imagenet", "dataset": "auto"}))
    choices = explore.run_choices(explore.find_studies(tmp_path), explorer)
    assert [label for label, _ in choices] == ["s / CCL/seed0", "untrained encoder (no run)"]


def test_browse_static_and_interactive() -> None:
    drawn: list[int] = []

    def render(task: int) -> Figure:
        drawn.append(task)
        return Figure()

    assert isinstance(explore.browse(render, False, task=(1, [0, 1, 2])), Figure) and drawn == [1]
    box = explore.browse(render, True, task=(1, [("task 1", 0), ("task 2", 1)]))
    picker = box.children[0].children[0]
    picker.value = 0  # what choosing "task 1" in the lab does
    assert drawn == [1, 1, 0]

    def fails(task: int) -> Figure:
        raise DataError("cannot draw this task")

    explore.browse(fails, True, task=(0, [0]))  # the message is shown in the widget, not raised


# ----------------------------------------------------------------------------- the static path
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_explore_notebook_static_under_papermill_and_in_html(tmp_path: Path) -> None:
    out = tmp_path / "explore.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks" / "explore.ipynb"), str(out), kernel_name="python3",
                               parameters={"runs_root": str(tmp_path / "no-runs"), "interactive": False,
                                           "max_points": 200, "n_views": 2},
                               progress_bar=False, cwd=str(tmp_path))
    nb = nbformat.read(str(out), as_version=4)
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 5   # + one CCL step's terms
    assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"]
    html, _ = HTMLExporter(exclude_input=True).from_notebook_node(nb)
    assert len(re.findall(r"<img [^>]*src=\"data:image/png;base64", html)) == 5 and "untrained" in html
