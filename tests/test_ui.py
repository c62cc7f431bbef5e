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

from slimlab.tracking import comparison_url
from tests.conftest import FAST, free_port, slimlab, wait_until_healthy

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The flags NOTES.md gives for this closed network: no background connections, no first-run UI.
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


def widen_column(driver, column_id: str, by: int) -> None:
    """Drag the column's resize handle to the right, as a person would."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    header = driver.find_element(By.CSS_SELECTOR, f"[role=columnheader][col-id='{column_id}']")
    handle = header.find_element(By.CSS_SELECTOR, ".ag-header-cell-resize")
    ActionChains(driver).click_and_hold(handle).move_by_offset(by, 0).release().perform()


def xpath_literal(text: str) -> str:
    return f"'{text}'" if "'" not in text else f'"{text}"'


def test_a_sweep_reads_well_in_the_mlflow_ui(tmp_path, cache_dir, mlflow_server, browser):
    from selenium.webdriver.common.by import By

    result = slimlab(
        "run", "-m", "experiment=quickstart", "technique.prune.amount=0.5,0.9", *FAST, f"cache_dir={cache_dir}",
        "experiment_name=ui", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_server}, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("ui")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("slimlab.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert parent.info.run_name == "sweep ui: technique.prune.amount=0.5,0.9"
    assert {c.info.run_name for c in children} == {
        "lenet prune(0.5)+quantize(int8-wo)",
        "lenet prune(0.9)+quantize(int8-wo)",
    }
    shots = tmp_path / "screenshots"
    shots.mkdir()

    # The runs table, in the comparison view slimlab gave the experiment: the parent, collapsed, then expanded.
    browser.get(comparison_url(mlflow_server, experiment.experiment_id))
    visible_text(browser, parent.info.run_name)
    for close in browser.find_elements(
        By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"
    ):
        close.click()  # MLflow's assistant panel takes a third of the page; a person closes it too
    for column in ("accuracy", "compression_ratio"):
        assert visible_text(browser, column).is_displayed(), column
    browser.save_screenshot(str(shots / "1-runs-collapsed.png"))
    widen_column(browser, "attributes.`Run Name`", by=160)  # to read the technique chains whole
    row = browser.find_element(By.CSS_SELECTOR, f"[role=row][row-id='{parent.info.run_id}']")
    row.find_element(By.CSS_SELECTOR, "button[data-component-id*=runnamecellrenderer]").click()  # expand
    for child in children:
        visible_text(browser, child.info.run_name)
        # the child's row shows its metrics: compression_ratio as logged
        cells = browser.find_elements(
            By.CSS_SELECTOR, f"[row-id='{child.info.run_id}'] [col-id='metrics.`compression_ratio`']"
        )
        assert [c.text for c in cells] == [repr(child.data.metrics["compression_ratio"])]
    browser.save_screenshot(str(shots / "2-runs-expanded.png"))

    # The parent's artifacts: the sweep report, with its Pareto plot.
    browser.get(f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts")
    visible_text(browser, "report").click()
    visible_text(browser, "pareto.png").click()
    browser.save_screenshot(str(shots / "3-parent-artifacts.png"))
    assert sorted(p.name for p in shots.iterdir()) == [
        "1-runs-collapsed.png",
        "2-runs-expanded.png",
        "3-parent-artifacts.png",
    ]
