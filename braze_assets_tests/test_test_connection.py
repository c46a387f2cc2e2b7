"""Test connection (job and command): table check and a validated preview, nothing sent to Braze;
global source errors named clearly, never showing credentials, changing no state."""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
from dagster_aws.redshift import RedshiftClientResource

from braze_assets.config import parse_syncs
from braze_assets.connection import check_connection
from braze_assets_tests.conftest import cdi_row, events_rows, sync_config

NOW = dt.datetime.now(dt.UTC)


def test_job_previews_rows_with_their_validation_and_sends_nothing(harness, emulator):
    rows = events_rows(3, NOW - dt.timedelta(hours=1))
    rows.append(
        cdi_row(
            (NOW - dt.timedelta(hours=1)).replace(tzinfo=None),
            json.dumps({"properties": {}}),
            email="jane.doe@example.com",
        )
    )
    harness.table("ev", rows)
    harness.syncs = [sync_config("ev", "events", "main.ev")]
    job = harness.definitions().resolve_job_def("ev_test_connection")
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    observation = next(e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION")
    metadata = observation.event_specific_data.asset_observation.metadata
    preview = metadata["preview"].value
    assert "event PAYLOAD has no 'name'" in preview and "| yes |" in preview
    assert "jane.doe@example.com" not in preview and "EMAIL=j***@e***.com" in preview
    assert metadata["dagster/row_count"].value == 4
    assert emulator.store.stats()["requests"] == 0
    assert not harness.state_dir.exists(), "no delivery state is created"


def test_missing_table_and_columns_fail_the_job_with_the_reason(harness):
    import duckdb

    harness.table("other", events_rows(1, NOW))
    with duckdb.connect(str(harness.warehouse)) as con:
        con.execute(
            "CREATE TABLE deletes_with_payload (UPDATED_AT TIMESTAMP, EXTERNAL_ID VARCHAR, PAYLOAD VARCHAR)"
        )
    harness.syncs = [
        sync_config("gone", "events", "main.gone"),
        sync_config("dels", "deletions", "main.deletes_with_payload"),
    ]
    defs = harness.definitions()
    for name, expected in (
        ("gone", "sync gone: duckdb table main.gone in warehouse.duckdb does not exist"),
        ("dels", "has a PAYLOAD column"),
    ):
        result = defs.resolve_job_def(f"{name}_test_connection").execute_in_process(
            instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
        )
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert expected in failure.step_failure_data.user_failure_data.description


def test_redshift_bad_credentials_and_refused_connection_never_show_the_password(postgres):
    [sync] = parse_syncs(
        {"syncs": [sync_config("rs", "events", "x", source={"type": "redshift", "table": "public.events"})]}
    )
    refused = RedshiftClientResource(
        host="127.0.0.1",
        port=9,
        user="braze",
        password="hunter2-secret",
        database="postgres",
        sslmode="disable",
        connect_timeout=2,
    )
    report = check_connection(sync, refused)
    assert not report.ok and "cannot connect" in report.message
    assert "hunter2-secret" not in report.message
    missing = RedshiftClientResource(
        host=postgres["host"],
        port=postgres["port"],
        user=postgres["user"],
        database=postgres["database"],
        sslmode="disable",
    )
    report = check_connection(sync, missing)
    assert not report.ok and "public.events" in report.message and "does not exist" in report.message
