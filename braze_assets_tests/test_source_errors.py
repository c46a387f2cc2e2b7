"""A warehouse that fails a read stops only its own sync, says why in one line, and never quotes a
row's data: a view that casts each row fails on the first cell it cannot read and names it."""

from __future__ import annotations

import datetime as dt

import duckdb
import pytest

from braze_assets_tests.cli_project import cli_project, summaries
from braze_assets_tests.conftest import earlier_today, events_rows, sync_config

HOUR_AGO = earlier_today(dt.timedelta(hours=1))
SECRET = "victim.person@example.com"


def test_a_failing_view_stops_only_its_sync_and_its_error_is_masked_and_logged(tmp_path, emulator):
    project = cli_project(
        tmp_path,
        emulator,
        [sync_config("casting", "events", "main.v_src"), sync_config("ok", "events", "main.ok")],
    )
    project.harness.table("ok", events_rows(3, HOUR_AGO))
    with duckdb.connect(str(project.harness.warehouse)) as con:
        con.execute("CREATE TABLE raw_src (ts VARCHAR, ext VARCHAR, p VARCHAR)")
        con.execute(
            "INSERT INTO raw_src VALUES "
            "(?, 'view-user-001', '{\"name\": \"x\"}'), (?, 'view-user-002', '{}')",
            [HOUR_AGO.replace(tzinfo=None).isoformat(), SECRET],
        )
        con.execute(
            "CREATE VIEW v_src AS SELECT CAST(ts AS TIMESTAMP) AS UPDATED_AT, ext AS EXTERNAL_ID, "
            "p AS PAYLOAD FROM raw_src"
        )
    run = project.run("run", "--json")
    everything = run.stdout + run.stderr
    assert "Traceback" not in everything, everything[-3000:]
    assert "victim" not in everything and "example.com" not in everything
    by_name = {s["sync"]: s for s in summaries(run)}
    assert by_name["ok"]["status"] == "success" and by_name["ok"]["accepted"] == 3
    casting = by_name["casting"]
    assert casting["status"] == "error", casting
    assert (
        "duckdb table main.v_src" in casting["status_detail"]
        and "the query failed" in casting["status_detail"]
    )
    assert "v***@e***.com" in casting["status_detail"]
    assert run.returncode == 1
    log = project.run("log", "runs", "--sync", "casting")
    assert log.returncode == 0 and "| Error |" in log.stdout, log.stdout + log.stderr
    assert "victim" not in log.stdout


def test_an_updated_at_that_is_not_a_timestamp_is_named_as_the_problem(tmp_path, emulator):
    project = cli_project(tmp_path, emulator, [sync_config("text_stamps", "events", "main.text_stamps")])
    with duckdb.connect(str(project.harness.warehouse)) as con:
        con.execute("CREATE TABLE text_stamps (UPDATED_AT VARCHAR, EXTERNAL_ID VARCHAR, PAYLOAD VARCHAR)")
        con.execute("INSERT INTO text_stamps VALUES ('2026-01-01', 'u1', '{\"name\": \"x\"}')")
    run = project.run("run", "--json")
    [summary] = summaries(run)
    assert summary["status"] == "error"
    assert "UPDATED_AT is VARCHAR; it must be a timestamp column" in summary["status_detail"], summary
    assert "Binder Error" not in summary["status_detail"]
    log = project.run("log", "runs", "--sync", "text_stamps")
    assert "| Error |" in log.stdout, log.stdout + log.stderr


def test_a_redshift_view_that_fails_on_a_row_is_a_masked_source_error(postgres):
    """The same through the Redshift adapter (PostgreSQL stands in): the server's message quotes
    the cell it could not cast."""
    import psycopg2

    from braze_assets.sources.base import SourceError
    from braze_assets.sources.redshift_source import RedshiftSource

    settings = {k: postgres[k] for k in ("host", "port", "user")} | {"dbname": postgres["database"]}
    with psycopg2.connect(**settings) as con, con.cursor() as cur:
        cur.execute(
            "DROP VIEW IF EXISTS v_cast; DROP TABLE IF EXISTS raw_cast; "
            "CREATE TABLE raw_cast (ts varchar, ext varchar, p varchar); "
            "INSERT INTO raw_cast VALUES (%s, 'u1', '{}'); "
            'CREATE VIEW v_cast AS SELECT ts::timestamptz AS "UPDATED_AT", ext AS "EXTERNAL_ID", '
            'p AS "PAYLOAD" FROM raw_cast',
            [SECRET],
        )
    source = RedshiftSource("public.v_cast", lambda: psycopg2.connect(**settings))
    for read in (source.max_updated_at, lambda: list(source.scan(None, None, True, 100))):
        with pytest.raises(SourceError) as raised:
            read()
        message = str(raised.value)
        assert "the query failed" in message and "victim" not in message and "example.com" not in message
        assert "v***@e***.com" in message


@pytest.mark.parametrize(
    "message, quoted, shown",
    [
        ('invalid timestamp: "victim.person@example.com"', True, 'invalid timestamp: "v***@e***.com"'),
        ("cannot cast 'Jane Roe' to DATE", True, "cannot cast 'Jan***' to DATE"),
        ("cannot cast 'Jane Roe' to DATE", False, "cannot cast 'Jane Roe' to DATE"),
        ("value +1 415 555 0199 out of range", False, "value ***99 out of range"),
        (
            "does not exist (002003 (42S02): Catalog Error)",
            False,
            "does not exist (002003 (42S02): Catalog Error)",
        ),
    ],
)
def test_driver_messages_keep_their_codes_and_lose_personal_data(message, quoted, shown):
    from braze_assets.masking import mask_text

    assert mask_text(message, quoted=quoted) == shown
