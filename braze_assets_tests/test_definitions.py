"""Definitions load cleanly (deprecations are errors, see pyproject), and schedules, sensors and the
release job behave as the UI will drive them."""

from __future__ import annotations

import datetime as dt
import json
import warnings
from unittest import mock

import dagster as dg
import duckdb
import pytest

from braze_assets.automation import NothingToSyncYet, incremental_range
from braze_assets.sources.factory import make_source
from braze_assets_tests.conftest import cdi_row, events_rows, sync_config

UTC = dt.UTC
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def test_shipped_definitions_load_and_resolve_everything(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAZE_API_KEY", "never-shown")
    monkeypatch.setenv("BRAZE_ASSETS_HOME", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        from braze_assets.config import load_syncs
        from braze_assets.definitions import build_definitions

        defs = build_definitions(load_syncs())
        repo = defs.get_repository_def()
        repo.load_all_definitions()  # what a code server does: op and job names must not clash
    names = {s.name for s in load_syncs()}
    assert names == {
        "user_attributes",
        "profile_snapshot",
        "product_catalog",
        "app_events",
        "store_purchases",
        "user_deletions",
    }
    for name in names:
        job = repo.get_job(f"{name}_job")
        assert {str(k.path[-1]) for k in job.asset_layer.executable_asset_keys} == {
            f"{name}_delta",
            f"{name}_sync_results",
        }
        assert repo.get_schedule_def(f"{name}_schedule").execution_timezone
        assert repo.get_sensor_def(f"{name}_sensor").job_name == f"{name}_job"
    check_names = {key.name for key in repo.asset_checks_defs_by_key}
    assert {"pandera_schema", "row_error_rate", "mass_deletion_guard"} <= check_names
    assert repo.get_job("release_held_job")
    assert repo.get_sensor_def("sync_failure_alert")
    groups = {spec.group_name for spec in defs.resolve_all_asset_specs()}
    assert groups == names, "every sync is its own group in the UI"


def test_schedule_requests_the_range_from_watermark_minus_lookback(harness):
    now = dt.datetime.now(UTC)
    harness.table("ev", events_rows(3, now - dt.timedelta(days=5)))
    harness.syncs = [
        sync_config(
            "ev",
            "events",
            "main.ev",
            lookback="P1D",
            schedule={"cron": "*/15 * * * *", "timezone": "Europe/Paris"},
        )
    ]
    defs = harness.definitions()
    schedule = defs.resolve_schedule_def("ev_schedule")
    assert schedule.execution_timezone == "Europe/Paris"
    with dg.build_schedule_context(resources=harness.resources()) as context:
        first = schedule.evaluate_tick(context).run_requests[0]
    oldest_day = (now - dt.timedelta(days=5)).strftime("%Y-%m-%d")
    assert first.tags[RANGE_START] == oldest_day, "a first sync starts at the oldest row's day"
    assert first.tags[RANGE_END] == now.strftime("%Y-%m-%d")

    assert harness.run("ev").outcome.accepted == 3
    watermark = harness.watermark("ev")
    with dg.build_schedule_context(resources=harness.resources()) as context:
        later = schedule.evaluate_tick(context).run_requests[0]
    assert later.tags[RANGE_START] == (watermark - dt.timedelta(days=1)).strftime("%Y-%m-%d")


def test_sensor_launches_only_its_sync_on_new_rows_with_deterministic_run_keys(harness):
    now = dt.datetime.now(UTC)
    harness.table("ev", events_rows(2, now - dt.timedelta(hours=2)))
    harness.table(
        "pu",
        [
            cdi_row(
                (now - dt.timedelta(hours=1)).replace(tzinfo=None),
                json.dumps({"product_id": "p", "currency": "USD", "price": 1}),
                external_id="u",
            )
        ],
    )
    harness.syncs = [
        sync_config("ev", "events", "main.ev", sensor={"enabled": True}),
        sync_config("pu", "purchases", "main.pu"),
    ]
    sensor = harness.definitions().resolve_sensor_def("ev_sensor")
    instance = dg.DagsterInstance.ephemeral()
    with dg.build_sensor_context(instance=instance, resources=harness.resources()) as context:
        first = sensor.evaluate_tick(context)
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    assert request.job_name in (None, "ev_job") and request.run_key.startswith("ev:")
    assert first.asset_events and first.asset_events[0].asset_key == dg.AssetKey(["duckdb", "main", "ev"])

    with dg.build_sensor_context(
        instance=instance, cursor=first.cursor, resources=harness.resources()
    ) as context:
        idle = sensor.evaluate_tick(context)
    assert not idle.run_requests
    # the tick says why it launched nothing, in the terms it compared
    assert idle.skip_message.startswith("no new or changed rows since the last launch (newest UPDATED_AT ")
    assert idle.skip_message.endswith(", 2 rows)")

    harness.table("ev", events_rows(1, now - dt.timedelta(minutes=5), start=2))
    with dg.build_sensor_context(
        instance=instance, cursor=first.cursor, resources=harness.resources()
    ) as context:
        again = sensor.evaluate_tick(context)
    assert len(again.run_requests) == 1
    assert again.run_requests[0].run_key != request.run_key


def test_release_held_rows_sends_them_on_the_next_run(harness, emulator):
    from braze_assets.braze.emulator import FaultConfig

    now = dt.datetime.now(UTC)
    harness.table("ev", events_rows(75, now - dt.timedelta(hours=1)))
    harness.syncs = [sync_config("ev", "events", "main.ev")]
    emulator.set_faults(FaultConfig(rate_5xx_after=1.0))
    held = harness.run("ev")
    assert held.outcome.held == 75 and held.outcome.ambiguous == 75
    assert len(emulator.store.events()) == 75, "processed by Braze, answer lost"
    emulator.store.reset()
    emulator.set_faults(FaultConfig())
    assert harness.run("ev").outcome.requests == 0, "held rows are not resent on their own"

    release = harness.definitions().resolve_job_def("release_held_job")
    result = release.execute_in_process(
        run_config={"ops": {"release_held_rows": {"config": {"sync": "ev"}}}},
        resources={"delivery_state": harness.resources()["delivery_state"]},
    )
    assert result.success
    assert harness.run("ev").outcome.accepted == 75
    assert len(emulator.store.events()) == 75


def test_incremental_range_survives_a_missing_table(harness):
    harness.syncs = [sync_config("ev", "events", "main.missing")]
    sync = harness.config("ev")
    resources = harness.resources()
    keys = incremental_range(
        sync, resources["delivery_state"], dt.datetime.now(UTC), make_source(sync, resources["duckdb"])
    )
    assert keys.start == keys.end == dt.datetime.now(UTC).strftime("%Y-%m-%d")


def test_incremental_range_before_the_first_partition_says_there_is_nothing_to_sync_yet(harness):
    """A clock behind partitions_start (the file was checked on another machine's clock): no day
    exists yet, and the schedule and sensor skip with the reason instead of failing the tick."""
    harness.syncs = [sync_config("ev", "events", "main.ev", sensor={"enabled": True})]
    harness.table("ev", events_rows(1, dt.datetime.now(UTC)))
    sync = harness.config("ev")
    resources = harness.resources()
    before = dt.datetime(2023, 6, 1, tzinfo=UTC)  # the fixture's partitions start on 2024-01-01
    with pytest.raises(NothingToSyncYet, match="nothing to sync yet: its partitions start on 2024-01-01"):
        incremental_range(sync, resources["delivery_state"], before, make_source(sync, resources["duckdb"]))

    defs = harness.definitions()
    with mock.patch("braze_assets.automation.utc_now", return_value=before):
        with dg.build_schedule_context(resources=resources) as context:
            tick = defs.resolve_schedule_def("ev_schedule").evaluate_tick(context)
        assert not tick.run_requests and "nothing to sync yet" in (tick.skip_message or "")
        with dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), resources=resources) as context:
            tick = defs.resolve_sensor_def("ev_sensor").evaluate_tick(context)
        assert not tick.run_requests and "nothing to sync yet" in (tick.skip_message or "")


def test_a_syncs_description_leads_its_assets_descriptions(tmp_path, emulator):
    from braze_assets_tests.conftest import Harness

    harness = Harness(tmp_path, emulator)
    harness.syncs = [sync_config("ev", "events", "main.ev", description="App events for CRM.")]
    graph = harness.definitions().resolve_asset_graph()
    for key in (
        dg.AssetKey("ev_delta"),
        dg.AssetKey("ev_sync_results"),
        dg.AssetKey(["duckdb", "main", "ev"]),
    ):
        assert graph.get(key).description.startswith("App events for CRM.\n\n")


def _tick(harness, instance: dg.DagsterInstance, cursor: str | None = None):
    """One evaluation of the `ev` sync's sensor, after `cursor`."""
    sensor = harness.definitions().resolve_sensor_def("ev_sensor")
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=harness.resources()) as context:
        return sensor.evaluate_tick(context)


def test_a_row_stamped_in_the_future_does_not_hide_rows_updated_in_place(harness):
    """The sensor compares the newest row that is due, not the newest row: a row stamped in the
    future would otherwise keep the newest UPDATED_AT, and a row updated in place (same count,
    stamped now) would never launch the sync."""
    now = dt.datetime.now(UTC)
    rows = events_rows(2, now - dt.timedelta(hours=2)) + events_rows(1, now + dt.timedelta(days=3), start=2)
    harness.table("ev", rows)
    harness.syncs = [sync_config("ev", "events", "main.ev", sensor={"enabled": True})]
    instance = dg.DagsterInstance.ephemeral()
    first = _tick(harness, instance)
    assert len(first.run_requests) == 1
    with duckdb.connect(str(harness.warehouse)) as con:  # one row updated in place, stamped now
        con.execute(
            'UPDATE ev SET UPDATED_AT = ?, PAYLOAD = \'{"name": "changed"}\' '
            "WHERE PAYLOAD LIKE '%\"seq\": 0}%'",
            [(now - dt.timedelta(seconds=30)).replace(tzinfo=None)],
        )
    again = _tick(harness, instance, first.cursor)
    assert len(again.run_requests) == 1, again.skip_message


def test_the_sensor_launches_again_after_a_run_that_left_rows_for_the_next_run(
    harness, emulator, monkeypatch
):
    """A run that could not reach Braze leaves its rows "for the next run": with the table
    unchanged, the sensor must be that next run once the retry wait has passed, or a sync driven
    by its sensor alone would never send them."""
    from braze_assets import automation
    from braze_assets.braze.emulator import FaultConfig

    now = dt.datetime.now(UTC)
    harness.table("ev", events_rows(3, now - dt.timedelta(hours=1)))
    harness.syncs = [sync_config("ev", "events", "main.ev", sensor={"enabled": True})]
    instance = dg.DagsterInstance.ephemeral()
    first = _tick(harness, instance)
    assert len(first.run_requests) == 1
    emulator.set_faults(FaultConfig(rate_5xx_before=1.0))  # Braze refusing: nothing sent
    failed = harness.run("ev")
    assert not failed.result.success
    emulator.set_faults(FaultConfig())

    waiting = _tick(harness, instance, first.cursor)
    assert not waiting.run_requests, "not at once: the retry waits"
    monkeypatch.setattr(automation, "RETRY_AFTER", dt.timedelta(0))
    retry = _tick(harness, instance, first.cursor)
    [request] = retry.run_requests
    assert request.run_key == f"ev:retry:{failed.result.run_id}"
    assert harness.run("ev").outcome.accepted == 3
    settled = _tick(harness, instance, first.cursor)
    assert not settled.run_requests, "nothing left for a next run"
