"""A sweep as a person sees it in the MLflow UI: a real `mlflow server`, a real sweep, headless Chromium.

Debian's chromium and chromium-driver drive the browser (no browser download: .ci/run installs them). Screenshots
of each page land in the test's temp dir (pytest prints its path when the test fails).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from slimlab.mlflow_tracking import comparison_url
from tests.conftest import FAST, NO_MLFLOW_MODEL, free_port, slimlab, wait_until_healthy

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The flags a closed network needs: no background connections, no first-run UI.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1920,1080",
]
WAIT_S = 60  # the UI is a single-page app that loads its runs after the page itself


def require(path: str, package: str) -> None:
    if Path(path).exists():
        return
    if os.environ.get("SLIMLAB_REQUIRE_SERVICES"):
        pytest.fail(f"{path} is missing (.ci/run installs Debian's {package})")
    pytest.skip(f"{path} is missing (Debian: apt-get install chromium chromium-driver)")


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a sqlite store and served artifacts in the temp dir; stopped by pid."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # uvicorn runs in child processes: stop the whole group
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    require(CHROMIUM, "chromium")
    require(CHROMEDRIVER, "chromium-driver")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for a browser to download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def visible_text(driver, text: str):
    """Wait until an element whose own text is exactly ``text`` is displayed; return it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    locator = (By.XPATH, f"//*[normalize-space(text())={xpath_literal(text)}]")
    return WebDriverWait(driver, WAIT_S).until(expected_conditions.visibility_of_element_located(locator))


def xpath_literal(text: str) -> str:
    return f"'{text}'" if "'" not in text else f'"{text}"'


def close_assistant(driver) -> None:
    """MLflow's assistant panel takes a third of the page; a person closes it too."""
    from selenium.webdriver.common.by import By

    for close in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"):
        close.click()


def chart_points(driver, title: str) -> int:
    """The points a chart card of the runs' chart view plots (plotly draws one path.point per run)."""
    from selenium.webdriver.common.by import By

    card = visible_text(driver, title).find_element(
        By.XPATH, "ancestor::*[@data-testid='experiment-view-compare-runs-card']"
    )
    return len(card.find_elements(By.CSS_SELECTOR, ".scatterlayer path.point"))


def test_a_sweep_reads_well_in_the_mlflow_ui(tmp_path, cache_dir, mlflow_server, browser):
    from selenium.webdriver.common.by import By

    result = slimlab(
        "run", "-m", "experiment=quickstart", "technique.prune.amount=0.5,0.7,0.9", *FAST, NO_MLFLOW_MODEL,
        f"cache_dir={cache_dir}", "experiment_name=ui", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_server},
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("ui")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("slimlab.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and len(runs) == 4
    assert parent.info.run_name == "sweep ui: technique.prune.amount=0.5,0.7,0.9"
    assert {c.info.run_name for c in children} == {
        f"lenet prune({amount},fine_tune_epochs=2)+quantize(int8-wo)" for amount in (0.5, 0.7, 0.9)
    }
    # Every run, and the sweep, print the link to the view: against a server, the server's own page.
    link = comparison_url(mlflow_server, experiment.experiment_id)
    assert result.stdout.count(link) == 4, result.stdout[-3000:]
    shots = tmp_path / "screenshots"
    shots.mkdir()

    # The printed link: the tradeoff charts, each plotting every child (the parent has no point: its metrics
    # are the sweep's summary, named apart), the UI's per-metric charts folded away below.
    browser.get(link)
    visible_text(browser, "Tradeoffs")
    close_assistant(browser)
    for title in ("size_bytes vs. accuracy", "speedup vs. accuracy"):
        assert chart_points(browser, title) == len(children), title
    assert browser.find_elements(By.XPATH, "//*[normalize-space(text())='Evaluation runs']") == []  # not GenAI's
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(visible_text(browser, "Tradeoffs")).perform()  # off the charts' toolbars
    browser.save_screenshot(str(shots / "1-tradeoffs.png"))

    # The same view as a table: the children listed flat, best accuracy first, each metric whole.
    browser.get(comparison_url(mlflow_server, experiment.experiment_id, mode="TABLE"))
    best = max(children, key=lambda c: c.data.metrics["accuracy"])
    visible_text(browser, best.info.run_name)
    close_assistant(browser)
    rows = browser.find_elements(By.CSS_SELECTOR, "[role=row][row-id]")
    listed = [row.get_attribute("row-id") for row in rows if row.get_attribute("row-id") != parent.info.run_id]
    by_accuracy = sorted(children, key=lambda c: -c.data.metrics["accuracy"])
    assert listed[: len(children)] == [c.info.run_id for c in by_accuracy]
    for child in children:
        cells = browser.find_elements(
            By.CSS_SELECTOR, f"[row-id='{child.info.run_id}'] [col-id='metrics.`compression_ratio`']"
        )
        assert [c.text for c in cells] == [repr(child.data.metrics["compression_ratio"])]
        assert "..." not in cells[0].text and cells[0].size["width"] >= 120
    browser.save_screenshot(str(shots / "2-runs-table.png"))

    # The parent on the model-training pages (in its default GenAI mode the UI files a run without a logged model
    # under "Evaluations"): its artifacts hold the sweep's report with the Pareto plot.
    base = f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
    browser.get(f"{base}/artifacts?workflowType=machine_learning")
    visible_text(browser, "Runs")
    assert browser.find_elements(By.XPATH, "//*[normalize-space(text())='Evaluations']") == []
    visible_text(browser, "report").click()
    visible_text(browser, "pareto.png").click()
    visible_text(browser, "report.html").click()  # MLflow's markdown preview shows no images; its HTML one does
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    WebDriverWait(browser, WAIT_S).until(
        expected_conditions.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe"))
    )
    plot = WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.TAG_NAME, "img"))
    WebDriverWait(browser, WAIT_S).until(lambda d: d.execute_script("return arguments[0].naturalWidth", plot) > 0)
    browser.switch_to.default_content()
    browser.save_screenshot(str(shots / "3-parent-artifacts.png"))
    assert sorted(p.name for p in shots.iterdir()) == ["1-tradeoffs.png", "2-runs-table.png", "3-parent-artifacts.png"]
    if os.environ.get("SLIMLAB_UI_SCREENSHOTS"):  # how README's picture is made: a real sweep in the real UI
        shutil.copy(shots / "1-tradeoffs.png", os.environ["SLIMLAB_UI_SCREENSHOTS"])
