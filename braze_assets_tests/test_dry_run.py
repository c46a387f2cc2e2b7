"""A dry run does everything but sending, prints the bill (rows, data points with and without the
attribute diff, requests, minutes at the rate budget) and changes no state."""

from __future__ import annotations

import datetime as dt
import json
import math

import dagster as dg
import yaml

from braze_assets import cli
from braze_assets_tests.conftest import both_backends, events_rows, sync_config
from braze_assets_tests.test_attribute_diff import _users

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)


def _cli_dry_run(
    harness, monkeypatch, capsys, *extra: str, api_key: str = "unused-by-a-dry-run"
) -> list[dict]:
    syncs_file = harness.tmp_path / "syncs.yaml"
    syncs_file.write_text(yaml.safe_dump({"syncs": harness.syncs}))
    monkeypatch.setenv("BRAZE_ASSETS_SYNCS", str(syncs_file))
    monkeypatch.setenv("BRAZE_ASSETS_DUCKDB", str(harness.warehouse))
    monkeypatch.setenv("BRAZE_API_KEY", api_key)
    for name in ("BRAZE_ASSETS_HOME", "DAGSTER_HOME", "BRAZE_ASSETS_PROGRESS_BAR"):  # main() sets them
        monkeypatch.setenv(name, "")
    if harness.state_url:
        monkeypatch.setenv("BRAZE_ASSETS_STATE_URL", harness.state_url)
    else:
        monkeypatch.delenv("BRAZE_ASSETS_STATE_URL", raising=False)
    capsys.readouterr()
    code = cli.main(["run", "--dry-run", "--home", str(harness.tmp_path), *extra])
    out = capsys.readouterr().out
    assert code == (1 if '"error"' in out or "[error]" in out else 0)
    return json.loads(out) if "--json" in extra else [{"text": out}]


def _state(harness, name: str) -> tuple:
    store = harness.delivery_state().store(name)
    return store.log.status_counts(), store.read_watermark().value, store.log.runs()


@both_backends
def test_a_dry_run_prints_the_bill_and_changes_nothing(harness, emulator, monkeypatch, capsys):
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(150, NOW - dt.timedelta(hours=2)))
    [bill] = _cli_dry_run(harness, monkeypatch, capsys, "--json")
    assert (bill["rows_read"], bill["rows_to_send"], bill["rows_unchanged"]) == (150, 150, 0)
    assert bill["data_points"] == bill["data_points_without_diff"] == 600
    assert bill["requests"] == 2  # 75 objects per /users/track request
    assert bill["rate_per_s"] == 800.0  # 3,000 per 3 s, times the default share 0.8
    assert math.isclose(bill["minutes_at_budget"], round(2 / 800 / 60, 2))
    assert emulator.store.stats()["requests"] == 0
    assert _state(harness, "users") == ({}, None, [])

    # what the dry run promised is what a run then sends
    assert harness.run("users").outcome.accepted == 150
    harness.table("users", _users(150, NOW - dt.timedelta(hours=1), {5: {"plan": "gold"}}))
    before = _state(harness, "users")
    [again] = _cli_dry_run(harness, monkeypatch, capsys, "--json")
    assert (again["rows_to_send"], again["rows_unchanged"]) == (1, 149)
    assert (again["data_points"], again["data_points_without_diff"]) == (1, 600)
    assert _state(harness, "users") == before
    [text] = _cli_dry_run(harness, monkeypatch, capsys)
    assert "data points billed 1 (without the diff 600, saved 599)" in text["text"]
    assert "nothing sent, no state changed" in text["text"]


def test_the_dry_run_job_reports_in_the_ui(harness, emulator):
    harness.syncs = [sync_config("ev", "events", "main.ev")]
    harness.table("ev", events_rows(80, NOW - dt.timedelta(hours=1)))
    job = harness.definitions().resolve_job_def("ev_dry_run")
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    [observation] = [
        e.event_specific_data.asset_observation  # type: ignore[union-attr]
        for e in result.all_events
        if e.is_asset_observation
    ]
    metadata = {k: v.value for k, v in observation.metadata.items()}
    assert (metadata["rows_to_send"], metadata["data_points"], metadata["requests"]) == (80, 80, 2)
    assert "nothing sent, no state changed" in metadata["dry_run"]
    assert emulator.store.stats()["requests"] == 0 and harness.ledger("ev") == {}


def test_a_dry_run_of_a_sync_never_run_leaves_no_state_behind(harness, emulator, monkeypatch, capsys):
    """The embedded state of a sync that never ran does not exist; a dry run does not make it."""
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(20, NOW - dt.timedelta(hours=2)))
    [bill] = _cli_dry_run(harness, monkeypatch, capsys, "--json")
    assert bill["rows_to_send"] == 20
    made = [p.name for p in harness.tmp_path.rglob("users.*")]
    assert made == [], made


@both_backends
def test_the_bill_runs_at_the_limit_braze_announced_for_the_workspace(harness, emulator, monkeypatch, capsys):
    """Braze's limits differ by contract (an hourly limit on MAU plans): once a sync has heard the
    workspace's limit, the bill's minutes are at a share of that one, read without changing it."""
    from braze_assets.braze.budget import workspace_id
    from braze_assets.braze.budget_stores import budget_store_from_environment
    from braze_assets.braze.client import check_endpoint

    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(150, NOW - dt.timedelta(hours=2)))
    monkeypatch.setenv("BRAZE_REST_ENDPOINT", emulator.base_url)
    [documented] = _cli_dry_run(harness, monkeypatch, capsys, "--json")
    assert (documented["rate_per_s"], documented["rate_from"]) == (800.0, "documented")

    if harness.state_url:
        monkeypatch.setenv("BRAZE_ASSETS_STATE_URL", harness.state_url)
    store = budget_store_from_environment(harness.tmp_path / "state")
    workspace = workspace_id(check_endpoint(emulator.base_url, False), "unused-by-a-dry-run")

    def announce(state, _now):  # as a sync's client keeps what Braze's headers said
        state.limit, state.window_s = 3_600, 3_600.0

    store.exchange(workspace, "/users/track", announce)
    kept = store.peek(workspace, "/users/track")
    [bill] = _cli_dry_run(harness, monkeypatch, capsys, "--json")
    assert (bill["rate_per_s"], bill["rate_from"]) == (0.8, "announced")  # 1 a second, x 0.8
    assert math.isclose(bill["minutes_at_budget"], round(2 / 0.8 / 60, 2))
    assert store.peek(workspace, "/users/track") == kept


def test_a_dry_run_needs_no_api_key(harness, emulator, monkeypatch, capsys):
    """The key only names the workspace whose announced limit the bill may use: without it the
    bill is at the documented limit."""
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(10, NOW - dt.timedelta(hours=2)))
    monkeypatch.setattr(cli, "main", cli.main)
    syncs_file = harness.tmp_path / "syncs.yaml"
    syncs_file.write_text(yaml.safe_dump({"syncs": harness.syncs}))
    monkeypatch.setenv("BRAZE_ASSETS_SYNCS", str(syncs_file))
    monkeypatch.setenv("BRAZE_ASSETS_DUCKDB", str(harness.warehouse))
    monkeypatch.delenv("BRAZE_API_KEY", raising=False)
    monkeypatch.delenv("BRAZE_ASSETS_STATE_URL", raising=False)
    for name in ("BRAZE_ASSETS_HOME", "DAGSTER_HOME", "BRAZE_ASSETS_PROGRESS_BAR"):
        monkeypatch.setenv(name, "")
    capsys.readouterr()
    assert cli.main(["run", "--dry-run", "--home", str(harness.tmp_path), "--json"]) == 0
    [bill] = json.loads(capsys.readouterr().out)
    assert (bill["rows_to_send"], bill["rate_from"]) == (10, "documented")


def test_a_sync_whose_source_fails_does_not_hide_the_other_bills(harness, emulator, monkeypatch, capsys):
    harness.syncs = [
        sync_config("users", "attributes", "main.users"),
        sync_config("gone", "events", "main.no_such_table"),
    ]
    harness.table("users", _users(3, NOW - dt.timedelta(hours=2)))
    bills = {b["sync"]: b for b in _cli_dry_run(harness, monkeypatch, capsys, "--json")}
    assert bills["users"]["rows_to_send"] == 3
    assert "sync gone: " in bills["gone"]["error"] and "main.no_such_table" in bills["gone"]["error"]
    [text] = _cli_dry_run(harness, monkeypatch, capsys)
    assert "== gone  [error]" in text["text"] and "rows to send" not in text["text"].split("== gone")[1]


@both_backends
def test_exact_copies_and_future_rows_are_in_the_bill_as_a_run_counts_them(
    harness, emulator, monkeypatch, capsys
):
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(4, NOW - dt.timedelta(hours=3)))
    assert harness.run("users").outcome.accepted == 4
    # user 1 changed one of four attributes; its row is there twice, and one row is stamped ahead
    changed = _users(4, NOW - dt.timedelta(hours=2), {1: {"plan": "gold"}})
    ahead = _users(1, NOW + dt.timedelta(hours=2))
    harness.table("users", [changed[1], changed[1], *ahead])
    [bill] = _cli_dry_run(harness, monkeypatch, capsys, "--json")
    assert (bill["rows_to_send"], bill["rows_duplicate"], bill["rows_future"]) == (1, 1, 1)
    assert (bill["data_points"], bill["data_points_without_diff"]) == (1, 4)
    run = harness.run("users")
    assert (run.outcome.estimated_data_points, run.outcome.data_points_saved) == (1, 3)


def test_a_sync_of_one_request_keeps_the_limit_braze_announced(tmp_path, monkeypatch, capsys):
    """The first request of a workspace goes out before any limit is known; its answer's headers
    announce one, kept for every process and for the bill even when no other request follows."""
    from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig
    from braze_assets_tests.conftest import API_KEY, Harness

    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, rate_limit=300, rate_window_s=3.0)) as emulator:
        harness = Harness(tmp_path, emulator)
        harness.syncs = [sync_config("users", "attributes", "main.users")]
        harness.table("users", _users(3, NOW - dt.timedelta(hours=2)))
        assert harness.run("users").outcome.requests == 1
        monkeypatch.setenv("BRAZE_REST_ENDPOINT", emulator.base_url)
        harness.table("users", _users(3, NOW - dt.timedelta(hours=1), {0: {"plan": "gold"}}))
        [bill] = _cli_dry_run(harness, monkeypatch, capsys, "--json", api_key=API_KEY)
    assert (bill["rate_per_s"], bill["rate_from"]) == (80.0, "announced")  # 300 per 3 s, x 0.8


@both_backends
def test_a_bill_says_how_many_rows_a_stopped_run_left_in_flight(harness, emulator, monkeypatch, capsys):
    """Recovery settles the requests Braze answered before the next run sends: the bill, which
    recovers nothing, says how many rows may be settled that way."""
    from braze_assets_tests.test_state_backends import planned_rows

    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(3, NOW - dt.timedelta(hours=2)))
    assert harness.run("users").outcome.accepted == 3
    with harness.delivery_state().store("users").session() as ledger:  # a run that died mid-send
        ledger.plan(planned_rows(["a1", "a2"], ["d-0-0", "d-0-0"]))
    [bill] = _cli_dry_run(harness, monkeypatch, capsys, "--json")
    assert bill["rows_in_flight"] == 2
    [text] = _cli_dry_run(harness, monkeypatch, capsys)
    assert "2 rows of a run that stopped (or is still sending) are in flight" in text["text"]
    with harness.delivery_state().store("users").session() as ledger:
        assert ledger.planned_rows() == 2, "the dry run recovered nothing"


def test_a_dry_run_while_a_run_holds_the_state_says_so_without_waiting(
    harness, emulator, monkeypatch, capsys
):
    """A run delivering holds its sync's state file: the dry run does not wait for it to end (up
    to the lock timeout, then a traceback), it says that sync is busy and bills the others."""
    import subprocess
    import sys
    import time

    harness.syncs = [
        sync_config("users", "attributes", "main.users"),
        sync_config("events", "events", "main.events"),
    ]
    harness.table("users", _users(3, NOW - dt.timedelta(hours=2)))
    harness.table("events", events_rows(4, NOW - dt.timedelta(hours=2)))
    assert harness.run("users").result.success
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('open', flush=True); "
            "time.sleep(120)",
            str(harness.state_dir / "users.duckdb"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        started = time.monotonic()
        bills = {b["sync"]: b for b in _cli_dry_run(harness, monkeypatch, capsys, "--json")}
        assert time.monotonic() - started < 60, "the dry run waited for the run to end"
    finally:
        holder.kill()
        holder.wait()
    assert bills["events"]["rows_to_send"] == 4
    assert "sync users: " in bills["users"]["error"] and "in use" in bills["users"]["error"], bills["users"]
