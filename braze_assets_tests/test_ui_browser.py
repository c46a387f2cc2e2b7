"""The Dagster UI in a real headless Chromium, operated as a person would operate one sync.

`braze-assets ui` (dg dev: webserver, daemon, code server; the Braze emulator; a seeded DuckDB) runs
on a fresh home with the shipped syncs, their sensors off so that the run started here is the one
that delivers. Chromium, driven by selenium, then:

- opens the app_events group: its lineage, and its assets listed with the sync's description from
  syncs.yaml;
- clicks Materialize, picks the latest partition in the partition dialog ("sync now") and launches
  the run;
- follows the run page until the run ends, and finds it succeeded on that partition;
- opens `app_events_sync_results`: the run's status in the metadata and the `delivery_complete`
  check's result.

A screenshot of each page goes to `tmp_path/screenshots`, or to the folder named by
BRAZE_ASSETS_UI_SCREENSHOTS: `BRAZE_ASSETS_UI_SCREENSHOTS=docs/screenshots` refreshes the ones
docs/ui.md shows. Chromium and ChromeDriver are Debian's (`scripts/ensure-chromium`, run by
`make test`). Select these tests with `-m browser`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from braze_assets.assets import partitions_for
from braze_assets.config import load_syncs
from braze_assets_tests.conftest import process_group
from braze_assets_tests.production_stack import free_port

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SYNCS = ROOT / "braze_assets" / "syncs.yaml"
SYNC = "app_events"
#: workspace.yaml loads the module braze_assets.definitions, which names the code location
LOCATION = "braze_assets.definitions"
#: the seed's app_events table: valid rows, and bad rows rejected on purpose (test_demo.py)
SEED_VALID_EVENTS, SEED_REJECTED_EVENTS = 4000, 11
UI_START_S, PAGE_S, RUN_S = 180, 120, 420


@dataclass
class UiStack:
    url: str
    emulator_url: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def emulator_stats(self) -> dict:
        with urllib.request.urlopen(f"{self.emulator_url}/_emulator/stats", timeout=10) as answer:
            return json.load(answer)


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[UiStack]:
    """`braze-assets ui` on a fresh home, the shipped syncs with their sensors off; stopped with
    Ctrl-C (SIGINT) afterwards, and whatever of it is left is killed."""
    syncs = yaml.safe_load(SHIPPED_SYNCS.read_text())
    for sync in syncs["syncs"]:
        sync["sensor"] = {"enabled": False}
    syncs_file = tmp_path / "syncs.yaml"
    syncs_file.write_text(yaml.safe_dump(syncs, sort_keys=False))
    emulator_port, ui_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRAZE_")}
    env.update(BRAZE_ASSETS_SYNCS=str(syncs_file), PYTHONPATH=str(ROOT))
    log = tmp_path / "ui.log"
    command = [sys.executable, "-m", "braze_assets.cli", "ui", "--home", str(tmp_path / "home")]
    command += ["--port", str(emulator_port), "--ui-port", str(ui_port)]
    with log.open("wb") as out:  # a file, not a pipe: the runs' logs would fill a pipe and block
        cli = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    stack = UiStack(f"http://127.0.0.1:{ui_port}", f"http://127.0.0.1:{emulator_port}", log)
    try:
        deadline = time.monotonic() + UI_START_S
        while True:
            assert cli.poll() is None, f"braze-assets ui exited:\n{stack.log_tail()}"
            assert time.monotonic() < deadline, f"the UI never came up:\n{stack.log_tail()}"
            try:
                with urllib.request.urlopen(f"{stack.url}/server_info", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        yield stack
    finally:
        leaders = _children_of(cli.pid)  # dg dev leads its own process group
        if cli.poll() is None:
            cli.send_signal(signal.SIGINT)
            try:
                cli.wait(timeout=30)
            except subprocess.TimeoutExpired:
                cli.kill()
                cli.wait()
        for leader in leaders:
            for pid in process_group(leader):
                os.kill(pid, signal.SIGKILL)


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("Chromium or ChromeDriver is missing: run scripts/ensure-chromium (make test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        "--lang=en-US",
        # no calls home: this machine reaches only the loopback UI
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.save_screenshot(str(tmp_path / "last-page.png"))  # where a failing test stopped
        driver.quit()


@pytest.fixture
def screenshots(tmp_path: Path):
    folder = Path(os.environ.get("BRAZE_ASSETS_UI_SCREENSHOTS") or tmp_path / "screenshots")
    if not folder.is_absolute():
        folder = ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)

    def take(driver: WebDriver, name: str) -> Path:
        time.sleep(1)  # let the last render and its transitions settle
        path = folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), f"no screenshot {path}"
        return path

    return take


def _xpath(xpath: str) -> tuple[str, str]:
    return (By.XPATH, xpath)


def _literal(text: str) -> str:
    """`text` as an XPath string literal."""
    return f'"{text}"' if '"' not in text else f"'{text}'"


def _visible(driver: WebDriver, xpath: str, seconds: float = PAGE_S) -> WebElement:
    return WebDriverWait(driver, seconds).until(EC.visibility_of_element_located(_xpath(xpath)))


def _dismiss_community_prompt(driver: WebDriver) -> None:
    """A fresh browser is asked once to join Dagster's community: Skip, as a person would."""
    try:
        skip = WebDriverWait(driver, 5).until(
            EC.element_to_be_clickable(
                _xpath(
                    "//*[@role='dialog'][.//*[contains(., 'Join the Dagster community')]]//button[.='Skip']"
                )
            )
        )
    except TimeoutException:
        return
    skip.click()
    WebDriverWait(driver, 10).until(EC.invisibility_of_element(skip))


def _metadata_value(driver: WebDriver, key: str) -> str:
    """The value of one row of a metadata table (key, [timestamp,] value)."""
    cell = _visible(driver, f"//tr[td[1][normalize-space()={_literal(key)}]]/td[last()]")
    return cell.text.strip()


def test_sync_now_from_the_ui_delivers_and_shows_status_and_check(ui, browser, screenshots):
    sync = next(s for s in load_syncs(SHIPPED_SYNCS) if s.name == SYNC)
    assert sync.description, "the shipped sync has a description to find in the UI"
    assets = [f"{SYNC}_delta", f"{SYNC}_sync_results"]
    group_path = f"/locations/{LOCATION}/asset-groups/{SYNC}"

    # The group's lineage: the source table, the delta and the results.
    browser.get(ui.url + group_path)
    for name in ["braze_events", *assets]:
        _visible(browser, f"//*[normalize-space(text())={_literal(name)}]")
    _dismiss_community_prompt(browser)
    screenshots(browser, "group-lineage")

    # The group's asset list: each of the sync's assets leads with its description.
    browser.find_element(By.XPATH, f"//a[@href='{group_path}/list']").click()  # the List tab
    for name in assets:
        link = _visible(browser, f"//a[@href='/assets/{name}']")
        # its row: the outermost element around the link holding no other asset's link
        row = link.find_element(
            By.XPATH, "./ancestor::*[count(.//a[starts-with(@href, '/assets/')]) = 1][last()]"
        )
        assert sync.description in row.text, row.text
    screenshots(browser, "group-assets")
    assert ui.emulator_stats()["events"] == 0, "nothing was sent before the UI's run"

    # Sync now: Materialize, the latest partition in the partition dialog, launch one run.
    # the group's Lineage tab (not the navigation's global Lineage)
    browser.find_element(By.XPATH, f"//a[starts-with(@href, '{group_path}')][.='Lineage']").click()
    materialize = WebDriverWait(browser, PAGE_S).until(
        EC.element_to_be_clickable(_xpath("//button[starts-with(normalize-space(), 'Materialize all')]"))
    )
    materialize.click()
    dialog = _visible(browser, "//*[@role='dialog'][.//*[contains(., 'Launch runs to materialize')]]")
    assert f"Launch runs to materialize {len(assets)} assets" in dialog.text, dialog.text
    latest = {partitions_for(sync).get_last_partition_key()}
    dialog.find_element(By.XPATH, ".//button[normalize-space()='Latest']").click()
    launch = WebDriverWait(browser, 30).until(
        EC.element_to_be_clickable(_xpath("//*[@role='dialog']//button[normalize-space()='Launch 1 run']"))
    )
    chosen = dialog.find_element(By.XPATH, ".//input[contains(@placeholder, 'ex:')]").get_attribute("value")
    latest.add(partitions_for(sync).get_last_partition_key())  # the day may turn meanwhile
    assert chosen in latest, (chosen, latest)
    screenshots(browser, "materialize-latest-partition")
    launch.click()
    view = _visible(browser, "//a[normalize-space()='View'][contains(@href, '/runs/')]", 60)
    run_url = view.get_attribute("href")

    # The run page, followed until the run ends: it succeeded, on the chosen partition.
    browser.get(run_url)
    _visible(browser, f"//*[normalize-space()='partition: {chosen}']")
    _visible(browser, f"//*[normalize-space()='{len(assets)} assets']")
    ended = " or ".join(f"normalize-space(text())='{s}'" for s in ("Success", "Failure", "Canceled"))
    try:
        status = WebDriverWait(browser, RUN_S, poll_frequency=2).until(
            EC.visibility_of_element_located(_xpath(f"//*[{ended}]"))
        )
    except TimeoutException:
        pytest.fail(f"the run did not end within {RUN_S}s:\n{ui.log_tail()}")
    assert status.text.strip() == "Success", f"{status.text}:\n{ui.log_tail()}"
    _visible(browser, "//*[normalize-space()='Errored (0)']")
    screenshots(browser, "run-success")

    # The results asset: the run's status in its metadata, counted from what Braze accepted.
    browser.get(f"{ui.url}/assets/{SYNC}_sync_results")
    _visible(browser, f"//*[normalize-space(text())={_literal(chosen)}]")  # the latest materialization
    assert _metadata_value(browser, "status") == "partial_success"
    status_detail = _metadata_value(browser, "status_detail")
    assert status_detail == f"{SEED_REJECTED_EVENTS} rejected by validation"
    assert _metadata_value(browser, "rows_accepted") == str(SEED_VALID_EVENTS)
    assert _metadata_value(browser, "rows_rejected_by_validation") == str(SEED_REJECTED_EVENTS)
    screenshots(browser, "sync-results")
    stats = ui.emulator_stats()
    assert stats["events"] == SEED_VALID_EVENTS, "the UI's run delivered the sync's events"
    assert stats["purchases"] == stats["deletions"] == 0, "and nothing of the other syncs"

    # The delivery_complete check: not passed (WARN, non-blocking) with the run's status and why.
    browser.find_element(By.XPATH, "//a[contains(@href, 'view=checks')]").click()  # the Checks tab
    _visible(browser, "//*[normalize-space(text())='delivery_complete']")
    result = _visible(browser, "//*[normalize-space(text())='Evaluation result']/following-sibling::*[1]")
    assert result.text.strip() == "Failed"
    _visible(browser, "//*[text()[contains(., 'non-blocking')]]")
    _visible(browser, f"//*[normalize-space(text())={_literal(status_detail)}]")
    assert _metadata_value(browser, "status") == "partial_success"
    screenshots(browser, "delivery-complete-check")
