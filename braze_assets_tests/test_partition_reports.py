"""A run over several days says what happened on each day: per-day counts, never the run's totals
copied into every partition, and every check recorded for every day it covered (none "skipped")."""

from __future__ import annotations

import datetime as dt

import dagster as dg
from dagster._core.storage.asset_check_execution_record import (  # no public name for it in 1.13
    AssetCheckExecutionRecordStatus,
)

from braze_assets.asset_metadata import RUN_LEVEL_METADATA, results_metadata
from braze_assets.delta import DeltaManifest
from braze_assets_tests.conftest import Harness, earlier_today, events_rows, sync_config

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)
TWO_DAYS_AGO = NOW - dt.timedelta(days=2)
DAYS = [(NOW - dt.timedelta(days=n)).strftime("%Y-%m-%d") for n in (3, 2, 1, 0)]
LATEST = earlier_today(dt.timedelta(minutes=30), NOW)  # on DAYS[-1] at any time of day


def _ranged_run(harness: Harness, instance: dg.DagsterInstance):
    harness.table(
        "ev",
        [*events_rows(30, TWO_DAYS_AGO), *events_rows(20, LATEST, start=30)],
    )
    harness.syncs = [sync_config("ev", "events", "main.ev")]
    return harness.run("ev", keys=dg.PartitionKeyRange(DAYS[0], DAYS[-1]), instance=instance)


def _by_partition(events, asset: str) -> dict[str, dict]:
    return {
        e.partition: e.event_specific_data.materialization.metadata  # type: ignore[union-attr]
        for e in events
        if e.asset_key == dg.AssetKey(asset)
    }


def test_a_ranged_run_reports_each_days_own_counts(harness):
    instance = dg.DagsterInstance.ephemeral()
    run = _ranged_run(harness, instance)
    assert run.result.success

    for asset in ("ev_delta", "ev_sync_results"):
        materialized = _by_partition(run.result.get_asset_materialization_events(), asset)
        assert sorted(materialized) == DAYS
        for metadata in materialized.values():  # no counts copied into every day
            assert set(metadata) <= RUN_LEVEL_METADATA | {"counts"}, set(metadata) - RUN_LEVEL_METADATA
            assert "dagster/row_count" not in metadata

    observed: dict[tuple[str, str | None], dict] = {}
    for event in run.result.all_events:
        if event.is_asset_observation:
            observation = event.event_specific_data.asset_observation  # type: ignore[union-attr]
            observed[(observation.asset_key.to_user_string(), observation.partition)] = {
                k: v.value for k, v in observation.metadata.items()
            }
    expected = {DAYS[0]: 0, DAYS[1]: 30, DAYS[2]: 0, DAYS[3]: 20}
    for day, rows in expected.items():
        assert observed[("ev_delta", day)]["dagster/row_count"] == rows
        assert observed[("ev_delta", day)]["rows_valid"] == rows
        assert observed[("ev_sync_results", day)]["dagster/row_count"] == rows
        assert observed[("ev_sync_results", day)]["rows_accepted"] == rows


def test_a_ranged_runs_checks_are_recorded_for_every_day_it_covered(harness):
    instance = dg.DagsterInstance.ephemeral()
    run = _ranged_run(harness, instance)
    assert run.result.success
    for asset, check in (
        ("ev_delta", "pandera_schema"),
        ("ev_delta", "row_error_rate"),
        ("ev_sync_results", "delivery_complete"),
    ):
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(asset), check), limit=50
        )
        by_partition = {r.partition: r.status for r in records if r.run_id == run.result.run_id}
        assert AssetCheckExecutionRecordStatus.PLANNED not in by_partition.values(), (check, by_partition)
        for day in DAYS:
            assert by_partition[day] == AssetCheckExecutionRecordStatus.SUCCEEDED, (check, day)


def test_a_ranged_runs_delivery_complete_check_has_every_run_count(harness):
    """A run over several days carries no counts on its results (Dagster would copy them into every
    day), so its run-level `delivery_complete` result must hold all of them: the rows settled
    from a crashed run's journal or by another run too, not only the headline counts."""
    run = _ranged_run(harness, dg.DagsterInstance.ephemeral())
    assert run.result.success
    [check] = [
        e
        for e in run.result.get_asset_check_evaluations()
        if e.check_name == "delivery_complete" and e.partition is None
    ]
    one_day = results_metadata(
        run.outcome, DeltaManifest("ev", "events", "r", None, NOW.isoformat(), True, "v", "r")
    )
    counts = {k for k in one_day if k.startswith(("rows_", "recovered_", "data_points_"))}
    assert counts - set(check.metadata) == set()
    # how the delivery went, and Braze's messages: the run's too, shown nowhere else for a range
    delivery = {
        "failed_reasons",
        "failed_examples",
        "requests",
        "rate_limited_429",
        "seconds",
        "objects_per_second",
    }
    assert delivery - set(check.metadata) == set()
    assert "sync_log" in check.metadata
    assert check.metadata["rows_accepted"].value == 50
    assert check.metadata["recovered_from_crash_ambiguous"].value == 0


def test_a_run_with_nothing_to_send_has_no_row_count_headline(harness):
    harness.table("ev", events_rows(10, NOW - dt.timedelta(hours=1)))
    harness.syncs = [sync_config("ev", "events", "main.ev")]
    assert harness.run("ev").result.success
    again = harness.run("ev", keys=dg.PartitionKeyRange(DAYS[-1], DAYS[-1]))  # "sync now"
    [results] = [
        e.event_specific_data.materialization.metadata  # type: ignore[union-attr]
        for e in again.result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("ev_sync_results") and e.partition == DAYS[-1]
    ]
    assert "dagster/row_count" not in results
    assert results["status"].value == "success"
    assert "nothing new" in results["status_detail"].value
