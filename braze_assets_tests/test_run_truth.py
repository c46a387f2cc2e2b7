"""Every run says truthfully what happened: its status, its counts, and why it stopped.

The status is CDI's: success, partial success, held (rows parked for a person) or error; a run that
delivered nothing because Braze could not be reached fails, and a wrong API key stops the whole
delivery at Braze's first refusal instead of sending every other request into the same 401.
"""

from __future__ import annotations

import datetime as dt

from braze_assets.braze.client import BrazeClient
from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
from braze_assets.datatypes import DATA_TYPES
from braze_assets.delivery import Delivery
from braze_assets.delta import DeltaManifest
from braze_assets.state import EmbeddedStateStore
from braze_assets.sync_outcome import EXIT_CODES, worst_status
from braze_assets_tests.conftest import API_KEY, Harness, earlier_today, events_rows, sync_config

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)


def _step_error(run) -> str:
    failure = next(e for e in run.result.all_events if e.is_step_failure)
    return failure.step_failure_data.error.to_string()


def test_a_wrong_api_key_stops_delivery_at_the_first_refusal(tmp_path):
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, faults=FaultConfig(latency_ms=5))) as emu:
        harness = Harness(tmp_path, emu, api_key="wrong-key-0000")
        harness.table("events", events_rows(3000, NOW - dt.timedelta(hours=1)))  # 40 requests
        harness.syncs = [sync_config("events", "events", "main.events", max_in_flight=4)]
        run = harness.run("events")
        assert not run.result.success
        # only the requests already on their way when the first 401 came back went out
        assert emu.store.stats()["requests"] <= 4
        message = _step_error(run)
        assert "401" in message and "stopped at the first refusal" in message
        assert "3,000 rows not sent" in message
        assert "wrong-key-0000" not in message
        assert harness.ledger("events") == {} and harness.watermark("events") is None


def test_braze_unreachable_is_an_error_not_a_success(tmp_path, emulator):
    harness = Harness(
        tmp_path,
        emulator,
        braze_overrides={"rest_endpoint": "http://127.0.0.1:9", "max_attempts": 2, "timeout_s": 1.0},
    )
    harness.table("events", events_rows(200, NOW - dt.timedelta(hours=1)))
    harness.syncs = [sync_config("events", "events", "main.events")]
    run = harness.run("events")
    assert not run.result.success
    assert "none of 200 rows reached Braze: 200 not sent" in _step_error(run)
    assert harness.ledger("events") == {} and harness.watermark("events") is None
    # once Braze is back, the next run sends everything
    harness.braze_overrides = {}
    again = harness.run("events")
    assert again.result.success and again.outcome.accepted == 200
    assert again.outcome.status == "success"


def test_held_rows_make_the_run_held_not_success(tmp_path):
    faults = FaultConfig(rate_5xx_after=1.0, seed=3)  # processed, then 500/504: ambiguous
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, faults=faults)) as emu:
        harness = Harness(tmp_path, emu)
        harness.table("events", events_rows(150, NOW - dt.timedelta(hours=1)))
        harness.syncs = [sync_config("events", "events", "main.events")]
        run = harness.run("events")
        assert run.result.success
        assert run.outcome.status == "held" and run.outcome.held_total == 150
        assert "150 held with an unknown outcome" in run.outcome.status_detail


def test_partial_success_names_what_did_not_go(tmp_path, emulator):
    harness = Harness(tmp_path, emulator)
    rows = events_rows(20, earlier_today(dt.timedelta(hours=1), NOW))
    rows[0]["PAYLOAD"] = "{not json"
    harness.table("events", rows)
    harness.syncs = [sync_config("events", "events", "main.events")]
    run = harness.run("events")
    assert run.outcome.status == "partial_success"
    assert run.outcome.status_detail == "1 rejected by validation"
    # the UI shows it on the results asset: a WARN check with the reason
    [check] = [e for e in run.result.get_asset_check_evaluations() if e.check_name == "delivery_complete"]
    assert not check.passed and check.severity.value == "WARN"
    assert check.description == "1 rejected by validation"
    [schema] = [e for e in run.result.get_asset_check_evaluations() if e.check_name == "pandera_schema"]
    assert schema.description == (
        "1 of 20 rows failed the cdi_events schema and are rejected with their reasons, never sent "
        "(most common: PAYLOAD is not valid JSON); the other rows match it"
    )


def test_a_delta_already_delivered_by_another_run_says_so(tmp_path, emulator):
    """Two runs computed the same delta; the second to deliver finds every row settled."""
    harness = Harness(tmp_path, emulator)
    harness.table("events", events_rows(100, NOW - dt.timedelta(hours=1)))
    harness.syncs = [sync_config("events", "events", "main.events")]
    first = harness.run("events")
    manifest = DeltaManifest(**first.delta.to_dict())  # the same delta, handed to a second run
    store = EmbeddedStateStore(harness.state_dir, "events")
    late = Delivery(
        spec=DATA_TYPES["events"],
        store=store,
        manifest=manifest,
        client=BrazeClient(emulator.base_url, API_KEY),
        policy="hold",
        max_in_flight=4,
        run_id="late-run",
        log=lambda _: None,
    ).run()
    assert late.accepted == 0 and late.settled_since_delta == 100
    assert late.status == "success"
    assert late.status_detail == (
        "nothing to send: all 100 rows of this delta were already delivered by another run"
    )
    assert len(emulator.store.events()) == 100


def test_exit_codes_follow_the_worst_status():
    assert EXIT_CODES[worst_status([])] == 0
    assert worst_status(["success", "partial_success"]) == "partial_success"
    assert worst_status(["held", "partial_success"]) == "held"
    assert worst_status(["success", "error", "held"]) == "error"
    assert {EXIT_CODES[s] for s in ("success", "partial_success", "held", "error")} == {0, 3, 4, 1}
