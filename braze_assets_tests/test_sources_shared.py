"""One suite for every source: the same CDI table contents, synced through each warehouse adapter,
must leave the same state in the Braze emulator as the embedded DuckDB default."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig
from braze_assets.seed import sample_rows
from braze_assets_tests.conftest import API_KEY, Harness, sync_config

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
KINDS = {"attributes": 120, "events": 200, "purchases": 90, "deletions": 20}
COLUMNS = ("UPDATED_AT", "EXTERNAL_ID", "ALIAS_NAME", "ALIAS_LABEL", "BRAZE_ID", "EMAIL", "PHONE", "PAYLOAD")


def _rows(kind: str) -> list[dict]:
    return sample_rows(kind, NOW, KINDS[kind])


def _load_duckdb(harness: Harness, kind: str, rows: list[dict]) -> dict:
    harness.table(f"cdi_{kind}", rows, payload=kind != "deletions")
    return {"type": "duckdb", "table": f"main.cdi_{kind}"}


def _load_redshift(harness: Harness, kind: str, rows: list[dict], pg: dict) -> dict:
    """CDI's Redshift DDL [A2.1]: timestamptz UPDATED_AT, varchar(max) PAYLOAD."""
    import psycopg2
    from dagster_aws.redshift import RedshiftClientResource

    columns = [c for c in COLUMNS if c != "PAYLOAD" or kind != "deletions"]
    ddl = ", ".join("UPDATED_AT timestamptz" if c == "UPDATED_AT" else f"{c} varchar" for c in columns)
    with (
        psycopg2.connect(host=pg["host"], port=pg["port"], user=pg["user"], dbname=pg["database"]) as con,
        con.cursor() as cur,
    ):
        cur.execute(f"DROP TABLE IF EXISTS cdi_{kind}; CREATE TABLE cdi_{kind} ({ddl})")
        values = [
            [(r[c].replace(tzinfo=dt.UTC) if c == "UPDATED_AT" and r[c] else r[c]) for c in columns]
            for r in rows
        ]
        cur.executemany(f"INSERT INTO cdi_{kind} VALUES ({', '.join(['%s'] * len(columns))})", values)
    harness.extra_resources["redshift"] = RedshiftClientResource(
        host=pg["host"], port=pg["port"], user=pg["user"], database=pg["database"], sslmode="disable"
    )
    return {"type": "redshift", "table": f"public.cdi_{kind}"}


def _load_snowflake(harness: Harness, kind: str, rows: list[dict], server: dict) -> dict:
    """CDI's Snowflake DDL [A2.1]: TIMESTAMP_NTZ(9) UPDATED_AT (UTC), VARCHAR PAYLOAD."""
    import snowflake.connector

    from braze_assets_tests.conftest import snowflake_resource

    columns = [c for c in COLUMNS if c != "PAYLOAD" or kind != "deletions"]
    ddl = ", ".join("UPDATED_AT TIMESTAMP_NTZ(9)" if c == "UPDATED_AT" else f"{c} VARCHAR" for c in columns)
    with snowflake.connector.connect(**server, database="CDI_DB", schema="PUBLIC") as con:
        cur = con.cursor()
        cur.execute(f"CREATE OR REPLACE TABLE cdi_{kind} ({ddl})")
        cur.executemany(
            f"INSERT INTO cdi_{kind} VALUES ({', '.join(['%s'] * len(columns))})",
            [[r[c] for c in columns] for r in rows],
        )
    harness.extra_resources["snowflake"] = snowflake_resource(server)
    return {"type": "snowflake", "table": f"cdi_db.public.cdi_{kind}"}


def _load_bigquery(harness: Harness, kind: str, rows: list[dict]) -> dict:
    """BigQuery's TIMESTAMP UPDATED_AT behind the fake `bigquery.Client` (no BigQuery runs offline)
    that executes the issued SQL on DuckDB. PAYLOAD is a STRING here: typed JSON (tested in
    test_sources_warehouses) cannot even hold the malformed payloads these contents include."""
    import duckdb

    from braze_assets_tests.test_sources_warehouses import FakeBigQuery

    fake = harness.extra_resources.get("bigquery")
    if fake is None:
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'; ATTACH ':memory:' AS proj; CREATE SCHEMA proj.cdi")
        fake = harness.extra_resources["bigquery"] = FakeBigQuery(con)
    columns = [c for c in COLUMNS if c != "PAYLOAD" or kind != "deletions"]
    ddl = ", ".join({"UPDATED_AT": "UPDATED_AT TIMESTAMPTZ"}.get(c, f"{c} VARCHAR") for c in columns)
    fake.con.execute(f"CREATE TABLE proj.cdi.cdi_{kind} ({ddl})")
    fake.con.executemany(
        f"INSERT INTO proj.cdi.cdi_{kind} VALUES ({', '.join('?' * len(columns))})",
        [
            [(r[c].replace(tzinfo=dt.UTC) if c == "UPDATED_AT" and r[c] else r[c]) for c in columns]
            for r in rows
        ],
    )
    return {"type": "bigquery", "table": f"proj.cdi.cdi_{kind}"}


def _final_state(emulator: BrazeEmulator) -> dict:
    def strip(items):
        return sorted(
            json.dumps({k: v for k, v in i.items() if k != "braze_id"}, sort_keys=True) for i in items
        )

    store = emulator.store
    return {
        "profiles": strip(store.profiles()),
        "events": strip(store.events()),
        "purchases": strip(store.purchases()),
        "deletions": strip(store.deletions()),
    }


def _sync_everything(tmp_path, loader) -> tuple[dict, list]:
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emulator:
        harness = Harness(tmp_path, emulator)
        harness.syncs = [sync_config(f"sync_{kind}", kind, "x", max_row_error_rate=0.5) for kind in KINDS]
        for entry, kind in zip(harness.syncs, KINDS, strict=True):
            entry["source"] = loader(harness, kind, _rows(kind))
        runs = [harness.run(f"sync_{kind}") for kind in KINDS]
        return _final_state(emulator), runs


@pytest.fixture(scope="module")
def duckdb_baseline(tmp_path_factory):
    state, runs = _sync_everything(tmp_path_factory.mktemp("duckdb"), _load_duckdb)
    assert all(r.result.success for r in runs)
    assert len(state["events"]) == KINDS["events"] and len(state["deletions"]) == KINDS["deletions"]
    return state, runs


@pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning")  # fakesnow
@pytest.mark.parametrize("source", ["redshift", "snowflake", "bigquery"])
def test_every_source_leaves_the_same_braze_state_as_duckdb(source, duckdb_baseline, tmp_path, request):
    expected, baseline_runs = duckdb_baseline
    if source == "redshift":
        pg = request.getfixturevalue("postgres")
        loader = lambda h, k, rows: _load_redshift(h, k, rows, pg)  # noqa: E731
    elif source == "bigquery":
        loader = _load_bigquery
    else:
        server = request.getfixturevalue("snowflake_server")
        loader = lambda h, k, rows: _load_snowflake(h, k, rows, server)  # noqa: E731
    state, runs = _sync_everything(tmp_path, loader)
    assert all(r.result.success for r in runs)
    for run, base in zip(runs, baseline_runs, strict=True):
        assert run.delta.rejected_reasons == base.delta.rejected_reasons
        assert (run.outcome.accepted, run.outcome.failed) == (base.outcome.accepted, base.outcome.failed)
    assert state == expected
