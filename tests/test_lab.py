"""JupyterLab for real: the exploration notebook opened and run in a browser through the lab's UI.

A JupyterLab server is started from this interpreter (the project's venv, as `make lab` does) on
a free localhost port with a token, and headless Chromium (Debian's `chromium` driven through
`chromium-driver` by selenium) opens a copy of `notebooks/explore.ipynb` pointed at a tiny study
trained here, clicks Run > Run All Cells, and reads the rendered page: every code cell executed,
no error or stderr output, the figures and the ipywidgets dropdowns present, and a dropdown that
redraws its figure. The screenshot goes to the test's temporary folder and, when
`$CCLNB_LAB_SCREENSHOT` names a file, there too (how `docs/jupyterlab_explore.png` was made).

Without a browser the test skips saying what to install; under CI (`CI` set) it fails instead,
because `.ci/run` installs the browser and a skip there would hide a broken lab.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import papermill
import pytest

from cclnb.config import TrainConfig
from cclnb import train

REPO = Path(__file__).resolve().parents[1]
BROWSER = {"chromium": shutil.which("chromium"), "chromium-driver": shutil.which("chromedriver")}
SMALL = {"max_points": 200, "n_views": 2}  # the notebook's parameters, small enough for 2 CPU cores


def _require_browser() -> None:
    missing = [name for name, path in BROWSER.items() if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the project's `test` extra)")
    if missing:
        why = (f"no headless browser for the JupyterLab test: {', '.join(missing)} missing; install "
               f"them with `apt-get install -y chromium chromium-driver` and `pip install -e .[test]` "
               f"(.ci/run does)")
        if os.environ.get("CI"):
            pytest.fail(why + "; CI must run this test")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _tiny_study(runs_root: Path) -> Path:
    """One CCL run over 2 demo tasks, 8 images per class, 2 steps per task: a real run directory
    (config, checkpoints, recorded replay picks) in seconds. SimpleReplay's picks, absent from
    this study, are drawn by the notebook itself."""
    run_dir = runs_root / "tiny" / "CCL" / "seed0"
    train(TrainConfig(data="demo", dataset="demo", method="CCL", n_tasks=2, epochs=1, subset_per_class=8,
                      batch_size=16, moco_k=64, ccl_k=16, n_save=4, arch="resnet18", stem="imagenet",
                      mlp=True, aug_plus=True, cos=True, eval_each_task="none", progress=False,
                      device="cpu", seed=0, workers=0, bn_groups=2, key_bn_groups=2,
                      run_dir=str(run_dir)))
    return run_dir


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A JupyterLab server rooted at tmp_path: yields (base URL, token, root). Its config and
    runtime folders are temporary, the news check is off (the machine may be offline), and the
    server is stopped afterwards."""
    port, token = _free_port(), secrets.token_hex(16)
    settings = tmp_path / "lab-settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(json.dumps(
        {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"))
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={tmp_path}", f"--LabApp.app_settings_dir={settings}"]
    command += ["--allow-root"] if os.geteuid() == 0 else []
    log = tmp_path / "jupyterlab.log"
    with log.open("w") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get_json(f"{base}/api/status?token={token}")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start: {log.read_text()[-2000:]}")
                time.sleep(0.3)
        yield base, token, tmp_path
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture()
def browser() -> Iterator["selenium.webdriver.Chrome"]:  # noqa: F821
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = BROWSER["chromium"]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1600,1240"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(BROWSER["chromium-driver"]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _prompts(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [p.text.strip() for p in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_explore_notebook_runs_in_jupyterlab(browser, lab: tuple[str, str, Path]) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    base, token, root = lab
    # the lab's kernel is this interpreter: `python` in the spec means the server's own python
    spec = _get_json(f"{base}/api/kernelspecs?token={token}")["kernelspecs"]["python3"]["spec"]
    assert spec["argv"][0] in ("python", sys.executable), spec["argv"]

    _tiny_study(root / "runs")
    notebook = root / "notebooks" / "explore.ipynb"
    notebook.parent.mkdir()
    papermill.iorw.write_ipynb(papermill.parameterize.parameterize_notebook(
        papermill.iorw.load_notebook_node(str(REPO / "notebooks" / "explore.ipynb")),
        {"runs_root": str(root / "runs"), **SMALL}), str(notebook))

    # a redraw (a dropdown's new figure, a cell's output) replaces DOM nodes: a node found a moment
    # ago may be gone or not there yet, which means "not yet", not failure
    wait = WebDriverWait(browser, 120, poll_frequency=0.5,
                         ignored_exceptions=(StaleElementReferenceException, IndexError))
    browser.get(f"{base}/lab/tree/notebooks/explore.ipynb?token={token}")
    # the parameters cell comes first, each parameter with its description
    first = wait.until(lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[:1]
                                  if "runs_root" in c.text])[0]
    assert "jp-CodeCell" in first.get_attribute("class") and "# folder of study runs" in first.text

    menu = next(m for m in browser.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if m.text == "Run")
    menu.click()
    wait.until(lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "li.lm-Menu-item")
                          if i.text.startswith("Run All Cells")])[0].click()
    executed = wait.until(lambda d: (p := _prompts(d)) and all(x[1:-2].isdigit() for x in p) and p)
    assert len(executed) == 9, executed  # parameters, injected parameters, then 7 cells

    errors = browser.find_elements(By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.stderr']")
    assert not errors, [e.text[:500] for e in errors]
    assert "Study tiny" in browser.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
    figures = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
    assert len(figures) == 6  # the study's curves, task split, views, replay picks, embedding, one CCL step
    pickers = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output select")
    assert len(pickers) == 4  # task (views), task (replay), run and who (embedding)
    assert [o.text for o in Select(pickers[2]).options] == ["tiny / CCL/seed0", "untrained encoder (no run)"]

    # a dropdown redraws its figure: the views of task 2 replace those of task 1
    views = figures[2].get_attribute("src")      # after the curves and the task split
    Select(pickers[0]).select_by_visible_text("task 2")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")[2]
               .get_attribute("src") != views)

    replay = browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[10]  # its heading
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", replay)
    time.sleep(0.5)
    shot = root / "jupyterlab_explore.png"
    assert browser.save_screenshot(str(shot)), "the browser could not save a screenshot"
    if os.environ.get("CCLNB_LAB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CCLNB_LAB_SCREENSHOT"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_gallery_opens_in_the_browser_and_links_every_study(browser) -> None:
    """reports/index.html as a reader opens it: one row per committed study, every link reaching a
    report page that exists, the budget axis drawn; the main study's page opens with its figure
    above the verdict and says what it shows and cannot show."""
    from urllib.parse import unquote, urlparse

    from selenium.webdriver.common.by import By

    reports = REPO / "reports"
    studies = {p.parent.parent.name for p in reports.glob("*/runs/*-seed*.json")}
    browser.get((reports / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#studies tbody tr")
    assert len(rows) == len(studies) > 0
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#studies a")]
    assert sorted(Path(unquote(urlparse(h).path)).parent.name for h in links) == sorted(studies)
    assert all(Path(unquote(urlparse(h).path)).is_file() for h in links)
    axes = browser.find_elements(By.CSS_SELECTOR, "figure img")
    assert axes and all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in axes)

    next(a for a in browser.find_elements(By.CSS_SELECTOR, "#studies a")
         if a.get_attribute("href").endswith("/tin100-32-cpu-w16/index.html")).click()
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "h1, h2")]
    at = {prefix: next(i for i, h in enumerate(headings) if h.startswith(prefix))
          for prefix in ("Verdict", "What this shows, and what it cannot")}
    assert at["Verdict"] < at["What this shows, and what it cannot"]
    verdict = browser.find_element(By.XPATH, "//h2[starts-with(normalize-space(.), 'Verdict')]")
    first_image = browser.find_element(By.CSS_SELECTOR, "img")
    assert first_image.location["y"] < verdict.location["y"], "the page opens with its figure"
