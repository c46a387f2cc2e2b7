"""The Snowflake, BigQuery and Databricks adapters (`braze_assets/sources/*_source.py`).

- Snowflake runs for real against fakesnow: its server mode behind the real connector (server-side
  bindings, Arrow result chunks) and `dagster_snowflake.SnowflakeResource`, and its in-process patch
  (no Arrow: the fetchmany fallback). The whole delta path (`compute_delta`) must give the same
  objects and rejections as the embedded DuckDB source for the same CDI rows.
- BigQuery has no offline emulator: `FakeBigQuery` stands at the `google.cloud.bigquery.Client`
  boundary and runs the issued GoogleSQL on DuckDB, refusing any value not bound as a parameter.
- Databricks has no stand-in at all: contract tests on the SQL and parameters a recording
  connection receives, and on how its Arrow results are normalized.
Contract references are to docs/braze-contract.md (§A2.1: column types per warehouse).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import duckdb
import fakesnow
import fakesnow.arrow
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import snowflake.connector
from databricks.sql import exc as db_errors
from databricks.sql.parameters import TimestampNTZParameter, TimestampParameter
from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from braze_assets.config import TABLE_NAME
from braze_assets.datatypes import DATA_TYPES
from braze_assets.delta import DeltaManifest, compute_delta
from braze_assets.sources import DuckDBSource, SourceError
from braze_assets.sources.bigquery_source import BigQuerySource
from braze_assets.sources.databricks_source import DatabricksSource
from braze_assets.sources.snowflake_source import SnowflakeSource
from braze_assets.state import EmbeddedStateStore
from braze_assets_tests.conftest import snowflake_resource

# fakesnow reads its DuckDB results through the DB-API Arrow path, which DuckDB warns about
pytestmark = pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning")

UTC = dt.UTC
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW = T0 + dt.timedelta(days=1)
WINDOW_START = T0 - dt.timedelta(days=1)
IDS = ("EXTERNAL_ID", "ALIAS_NAME", "ALIAS_LABEL", "BRAZE_ID", "EMAIL", "PHONE")
UTC_TS = pa.timestamp("us", tz="UTC")


def cdi(updated_at: dt.datetime | None, payload: Any, **ids: str) -> dict[str, Any]:
    row = {"UPDATED_AT": updated_at, **{c: None for c in IDS}, "PAYLOAD": payload}
    row.update({k.upper(): v for k, v in ids.items()})
    return row


# Every case the delta path treats differently, in one attributes table [A2.1, A2.2].
ROWS = [
    cdi(T0 - dt.timedelta(hours=2), {"plan": "gold", "nickname": None}, external_id="u1"),
    cdi(T0 - dt.timedelta(hours=1), {"pets": [{"id": 1, "type": "dog"}]}, email="jane@example.com"),
    cdi(T0, {"visits": 3}, alias_name="a-1", alias_label="crm"),
    cdi(T0 + dt.timedelta(hours=1), {"plan": "x"}, external_id="u2", braze_id="b2"),  # two ids
    cdi(None, {"plan": "null-ts"}, external_id="u3"),  # UPDATED_AT is null
    cdi(NOW + dt.timedelta(hours=2), {"plan": "future"}, external_id="u4"),  # held back
    cdi(T0 - dt.timedelta(days=3), {"plan": "old"}, external_id="u5"),  # before the window
]
BAD_JSON = cdi(T0, "{bad", external_id="u6")  # only a VARCHAR/STRING payload can hold this


def cdi_rows(with_bad_json: bool) -> list[dict]:
    return [*ROWS, BAD_JSON] if with_bad_json else ROWS


def as_text(rows: list[dict]) -> list[dict]:
    """PAYLOAD as the JSON text a VARCHAR column holds."""
    return [
        {**r, "PAYLOAD": r["PAYLOAD"] if isinstance(r["PAYLOAD"], str) else json.dumps(r["PAYLOAD"])}
        for r in rows
    ]


def run_delta(source, out: Path, data_type: str = "attributes") -> dict[str, Any]:
    """The asset's delta path on `source`; what it found, without warehouse-specific hashes."""
    out.mkdir(parents=True)
    manifest = DeltaManifest(
        sync="case",
        data_type=data_type,
        run_id="run-1",
        window_start=WINDOW_START.isoformat(),
        window_end=NOW.isoformat(),
        reaches_now=True,
        valid_path=str(out / "valid.parquet"),
        rejected_path=str(out / "rejected.parquet"),
    )
    compute_delta(
        source=source,
        spec=DATA_TYPES[data_type],
        store=EmbeddedStateStore(out / "state", "c"),
        manifest=manifest,
        window_start=WINDOW_START,
        window_end=NOW,
        now=NOW,
        partitions_start=T0 - dt.timedelta(days=30),
        update_existing_only=False,
    )
    valid = sorted(
        (r["updated_at"], r["identifier"], orjson.loads(r["object"]))
        for r in pq.read_table(manifest.valid_path).to_pylist()
    )
    rejected = sorted(
        (r["updated_at"] or NOW, r["identifier"], r["reasons"])
        for r in pq.read_table(manifest.rejected_path).to_pylist()
    )
    counts = {
        k: getattr(manifest, k)
        for k in (
            "rows_read",
            "valid",
            "rejected",
            "rejected_reasons",
            "future_rows",
            "late_outside_lookback",
            "max_updated_at",
        )
    }
    return {"counts": counts, "valid": valid, "rejected": rejected}


@pytest.fixture(scope="module")
def duckdb_outcomes(tmp_path_factory) -> dict[bool, dict[str, Any]]:
    """The embedded default's outcome for ROWS, without and with the malformed-JSON row."""
    base = tmp_path_factory.mktemp("duckdb")
    outcomes = {}
    for with_bad_json in (False, True):
        path = base / f"warehouse_{with_bad_json}.duckdb"
        rows = as_text(cdi_rows(with_bad_json))
        with duckdb.connect(str(path)) as con:
            con.execute(
                f"CREATE TABLE cdi (UPDATED_AT TIMESTAMP, "
                f"{', '.join(f'{c} VARCHAR' for c in IDS)}, PAYLOAD VARCHAR)"
            )
            con.executemany(
                f"INSERT INTO cdi VALUES ({', '.join('?' * 8)})",
                [
                    [
                        r["UPDATED_AT"] and r["UPDATED_AT"].replace(tzinfo=None),
                        *(r[c] for c in IDS),
                        r["PAYLOAD"],
                    ]
                    for r in rows
                ],
            )
        outcomes[with_bad_json] = run_delta(DuckDBSource(path, "cdi"), base / f"out_{with_bad_json}")
    expected = outcomes[False]
    assert expected["counts"]["valid"] == 3 and expected["counts"]["future_rows"] == 1
    assert expected["counts"]["late_outside_lookback"] == 1
    assert set(expected["counts"]["rejected_reasons"]) == {
        "row has several identifier types (CDI rows carry exactly one)",
        "UPDATED_AT is null",
    }
    assert any(obj.get("nickname", "") is None for *_, obj in expected["valid"])
    return outcomes


# ============================================================================ Snowflake (fakesnow)
def load_snowflake(
    con,
    table: str,
    rows: list[dict],
    payload_type: str = "VARCHAR",
    updated_at_type: str = "TIMESTAMP_NTZ(9)",
) -> None:
    """A CDI table with Snowflake's types [A2.1]: VARIANT payloads go in through PARSE_JSON."""
    ddl = ", ".join(
        [f"UPDATED_AT {updated_at_type}", *(f"{c} VARCHAR" for c in IDS), f"PAYLOAD {payload_type}"]
    )
    payload = "PARSE_JSON(?)" if payload_type == "VARIANT" else "?"
    cur = con.cursor()
    cur.execute(f"CREATE OR REPLACE TABLE {table} ({ddl})")
    for r in as_text(rows):
        stamp = r["UPDATED_AT"]
        if stamp is not None:
            stamp = (
                ("TIMESTAMP_TZ", stamp)
                if updated_at_type.startswith("TIMESTAMP_TZ")
                else stamp.replace(tzinfo=None)
            )
        cur.execute(
            f"INSERT INTO {table} SELECT ?, {', '.join('?' * len(IDS))}, {payload}",
            [stamp, *(r[c] for c in IDS), r["PAYLOAD"]],
            _force_qmark_paramstyle=True,
        )


@pytest.fixture(scope="module")
def snowflake_con(snowflake_server):
    with snowflake.connector.connect(**snowflake_server, database="CDI_DB", schema="PUBLIC") as con:
        yield con


@pytest.mark.parametrize("payload_type", ["VARCHAR", "VARIANT"])
def test_snowflake_delta_matches_duckdb(
    snowflake_server, snowflake_con, duckdb_outcomes, tmp_path, payload_type
):
    """TIMESTAMP_NTZ UPDATED_AT (UTC) and a VARCHAR or VARIANT PAYLOAD [A2.1], through
    `SnowflakeResource` and the real connector: the same objects, reasons and counts."""
    table = f"cdi_{payload_type.lower()}"
    text = payload_type == "VARCHAR"
    load_snowflake(snowflake_con, table, cdi_rows(text), payload_type)
    source = SnowflakeSource.from_resource(snowflake_resource(snowflake_server), table)
    assert source.columns()["UPDATED_AT"] == "TIMESTAMP_NTZ(9)"
    assert source.columns()["PAYLOAD"].startswith(payload_type)
    assert run_delta(source, tmp_path / "out") == duckdb_outcomes[text]


def test_snowflake_variant_payload_is_read_as_its_json_text(snowflake_server, snowflake_con):
    load_snowflake(snowflake_con, "cdi_json", ROWS[:1], "VARIANT")
    source = SnowflakeSource.from_resource(snowflake_resource(snowflake_server), "cdi_json")
    sql, _ = source.scan_sql(None, None, False)
    assert 'TO_JSON("PAYLOAD") AS "PAYLOAD"' in sql
    [batch] = list(source.scan(None, None, False, 10))
    assert batch.schema.field("PAYLOAD").type == pa.string()
    # compact JSON text with the explicit null kept (it removes the attribute, A2.2)
    assert json.loads(batch.column("PAYLOAD")[0].as_py()) == {"plan": "gold", "nickname": None}


def test_snowflake_streams_arrow_batches_bounded_by_batch_rows(snowflake_server, snowflake_con, monkeypatch):
    load_snowflake(snowflake_con, "cdi_scan", ROWS)
    source = SnowflakeSource.from_resource(snowflake_resource(snowflake_server), "cdi_scan")
    assert source.check_shape(DATA_TYPES["attributes"]) == ["UPDATED_AT", *IDS, "PAYLOAD"]

    def no_row_fetching(*_):
        raise AssertionError("the scan must use the Arrow result, not fetchmany")

    with monkeypatch.context() as patched:
        patched.setattr(snowflake.connector.cursor.SnowflakeCursor, "fetchmany", no_row_fetching)
        batches = list(source.scan(WINDOW_START, NOW, True, 2, columns=["UPDATED_AT", "EXTERNAL_ID"]))
    assert [b.num_rows for b in batches] == [2, 2, 1]  # one Arrow chunk, re-cut to batch_rows
    assert all(b.schema.names == ["UPDATED_AT", "EXTERNAL_ID"] for b in batches)
    assert all(b.schema.field("UPDATED_AT").type == UTC_TS for b in batches)
    rows = pa.Table.from_batches(batches).to_pylist()
    assert sorted(r["EXTERNAL_ID"] or "" for r in rows) == ["", "", "u1", "u2", "u3"]
    assert {r["UPDATED_AT"] for r in rows} >= {T0, T0 - dt.timedelta(hours=2)}

    assert source.count() == 7
    assert source.count(WINDOW_START, NOW) == 4
    assert source.count(NOW, None) == 1
    assert source.max_updated_at() == NOW + dt.timedelta(hours=2)
    assert source.min_updated_at() == T0 - dt.timedelta(days=3)
    preview = source.preview(3)
    assert preview.num_rows == 3 and "PAYLOAD" in preview.column_names


def test_snowflake_timestamp_tz_updated_at_is_compared_as_an_instant(snowflake_server, snowflake_con):
    rows = [
        cdi(T0.astimezone(dt.timezone(dt.timedelta(hours=h))), {"n": h}, external_id=f"u{h}")
        for h in (-7, 0, 9)
    ]
    rows.append(cdi(T0 + dt.timedelta(minutes=1), {"n": 99}, external_id="later"))
    load_snowflake(snowflake_con, "cdi_tz", rows, updated_at_type="TIMESTAMP_TZ(9)")
    source = SnowflakeSource.from_resource(snowflake_resource(snowflake_server), "cdi_tz")
    _, params = source.scan_sql(T0, T0 + dt.timedelta(minutes=1), False)
    assert params == [("TIMESTAMP_TZ", T0), ("TIMESTAMP_TZ", T0 + dt.timedelta(minutes=1))]
    assert source.count(T0, T0 + dt.timedelta(minutes=1)) == 3  # three offsets, one instant
    [batch] = list(source.scan(T0, T0 + dt.timedelta(minutes=1), False, 10))
    assert batch.column("UPDATED_AT").to_pylist() == [T0] * 3
    assert source.max_updated_at() == T0 + dt.timedelta(minutes=1)


def test_snowflake_without_arrow_falls_back_to_fetchmany(duckdb_outcomes, tmp_path):
    """fakesnow's in-process fake has no fetch_arrow_batches: rows come by fetchmany(batch_rows)."""
    with fakesnow.patch():

        def connect():
            return snowflake.connector.connect(database="CDI_DB", schema="PUBLIC", paramstyle="qmark")

        with connect() as con:
            load_snowflake(con, "cdi", cdi_rows(True))
            source = SnowflakeSource("cdi_db.public.cdi", connect)
            batches = list(source.scan(None, None, True, 3))
            assert [b.num_rows for b in batches] == [3, 3, 2]
            assert all(b.schema.field("UPDATED_AT").type == UTC_TS for b in batches)
            assert run_delta(source, tmp_path / "out") == duckdb_outcomes[True]


def test_snowflake_unquoted_names_resolve_upper_case_and_every_part_is_quoted():
    def named(table: str) -> str:
        return SnowflakeSource(table, contextlib.nullcontext).qualified_table

    assert named("cdi_db.public.events") == '"CDI_DB"."PUBLIC"."EVENTS"'
    assert named('"Mixed Case".events') == '"Mixed Case"."EVENTS"'
    assert named("x; drop table y") == '"X; DROP TABLE Y"'


def test_snowflake_errors_name_the_table_and_never_the_password(snowflake_server, snowflake_con):
    missing = SnowflakeSource.from_resource(snowflake_resource(snowflake_server), "no_such_table")
    with pytest.raises(
        SourceError,
        match=r"^snowflake table no_such_table in account fakesnow "
        r"does not exist, or the role may not read it \(002003",
    ):
        missing.columns()

    # a hostile name is one quoted identifier: nothing is dropped
    load_snowflake(snowflake_con, "y", ROWS[:1])
    hostile = SnowflakeSource.from_resource(snowflake_resource(snowflake_server), "x; drop table y")
    with pytest.raises(SourceError, match="does not exist"):
        hostile.columns()
    assert SnowflakeSource.from_resource(snowflake_resource(snowflake_server), "y").count() == 1

    closed = dict(snowflake_server, port=9)  # nothing listens on the discard port
    unreachable = SnowflakeSource.from_resource(snowflake_resource(closed, "s3cr3t-pw"), "cdi")
    with pytest.raises(SourceError) as caught:
        unreachable.count()
    message = str(caught.value)
    assert message.startswith(
        "snowflake table cdi in account fakesnow: cannot connect to or authenticate with Snowflake (250001"
    )
    assert "s3cr3t-pw" not in message and caught.value.__cause__ is None


# ============================================================================ BigQuery (fake client)
class FakeJob:
    def __init__(self, relation: duckdb.DuckDBPyRelation):
        self._relation = relation

    def result(self, page_size: int | None = None) -> FakeRows:
        return FakeRows(self._relation, page_size)


class FakeRows:
    """RowIterator's two ways to read: rows, and Arrow record batches of at most page_size."""

    def __init__(self, relation: duckdb.DuckDBPyRelation, page_size: int | None):
        self._relation, self.page_size = relation, page_size

    def __iter__(self):
        return iter(self._relation.fetchall())

    def to_arrow_iterable(self):
        yield from self._relation.to_arrow_reader(self.page_size or 10_000)


class FakeBigQuery:
    """A `bigquery.Client` whose tables live in DuckDB (`project` an attached catalog, `dataset` a
    schema). `query` runs the GoogleSQL it is given after translating only the quoting, the
    `@name` markers and TO_JSON_STRING; it refuses SQL with a literal value in it, a marker without
    a parameter, or a parameter without a marker."""

    TYPES: ClassVar[dict[str, str]] = {
        "TIMESTAMP WITH TIME ZONE": "TIMESTAMP",
        "TIMESTAMP": "DATETIME",
        "JSON": "JSON",
        "VARCHAR": "STRING",
    }

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con, self.queries = con, []

    def get_table(self, ref: str) -> bigquery.Table:
        quoted = ".".join(f'"{part}"' for part in ref.split("."))
        try:
            described = self.con.cursor().execute(f"DESCRIBE {quoted}").fetchall()
        except duckdb.CatalogException:
            raise api_exceptions.NotFound(f"Not found: Table {ref} was not found in location US") from None
        return bigquery.Table(
            ref, schema=[bigquery.SchemaField(name, self.TYPES[kind]) for name, kind, *_ in described]
        )

    def query(self, sql: str, job_config: bigquery.QueryJobConfig | None = None) -> FakeJob:
        params = {p.name: p for p in (job_config.query_parameters if job_config else [])}
        assert set(re.findall(r"@(\w+)", sql)) == set(params), (sql, params)
        assert not re.search(r"'|\d{4}-\d{2}-\d{2}|\bTIMESTAMP\b", sql), f"a value in {sql}"
        for p in params.values():  # an instant as TIMESTAMP, civil time as DATETIME
            assert isinstance(p, bigquery.ScalarQueryParameter)
            assert p.type_ == ("TIMESTAMP" if p.value.tzinfo else "DATETIME"), p
            p.to_api_repr()  # what the client would send must serialize
        self.queries.append((sql, {name: p.value for name, p in params.items()}))
        duck = re.sub(r"TO_JSON_STRING\(([^)]*)\)", r"CAST(\1 AS VARCHAR)", sql.replace("`", '"'))
        duck = re.sub(r"@(\w+)", r"$\1", duck)
        return FakeJob(self.con.cursor().sql(duck, params={n: p.value for n, p in params.items()}))


@pytest.fixture
def bigquery_fake():
    """CDI's BigQuery DDL [A2.1]: TIMESTAMP UPDATED_AT, typed JSON PAYLOAD, STRING identifiers."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'; ATTACH ':memory:' AS proj; CREATE SCHEMA proj.cdi")
    con.execute(
        f"CREATE TABLE proj.cdi.events (UPDATED_AT TIMESTAMPTZ, "
        f"{', '.join(f'{c} VARCHAR' for c in IDS)}, PAYLOAD JSON)"
    )
    con.executemany(
        f"INSERT INTO proj.cdi.events VALUES ({', '.join('?' * 8)})",
        [[r["UPDATED_AT"], *(r[c] for c in IDS), r["PAYLOAD"]] for r in as_text(ROWS)],
    )
    yield FakeBigQuery(con)
    con.close()


def bigquery_source(fake: FakeBigQuery, table: str = "proj.cdi.events") -> BigQuerySource:
    # as dagster_gcp.BigQueryResource.get_client does: a context manager yielding the client
    return BigQuerySource.from_resource(
        SimpleNamespace(get_client=lambda: contextlib.nullcontext(fake)), table
    )


def test_bigquery_delta_matches_duckdb(bigquery_fake, duckdb_outcomes, tmp_path):
    source = bigquery_source(bigquery_fake)
    assert source.columns()["PAYLOAD"] == "JSON" and source.columns()["UPDATED_AT"] == "TIMESTAMP"
    assert run_delta(source, tmp_path / "out") == duckdb_outcomes[False]
    assert bigquery_fake.queries and not any("SELECT *" in sql for sql, _ in bigquery_fake.queries)


def test_bigquery_pushes_the_window_down_with_bound_timestamp_parameters(bigquery_fake):
    source = bigquery_source(bigquery_fake)
    batches = list(source.scan(WINDOW_START, NOW, True, 2, columns=["UPDATED_AT", "EXTERNAL_ID", "PAYLOAD"]))
    sql, params = bigquery_fake.queries[-1]
    assert sql == (
        "SELECT `UPDATED_AT` AS `UPDATED_AT`, `EXTERNAL_ID` AS `EXTERNAL_ID`, "
        "TO_JSON_STRING(`PAYLOAD`) AS `PAYLOAD` FROM `proj`.`cdi`.`events` "
        "WHERE (`UPDATED_AT` >= @p0 AND `UPDATED_AT` < @p1) OR `UPDATED_AT` IS NULL"
    )
    assert params == {"p0": WINDOW_START, "p1": NOW}
    assert [b.num_rows for b in batches] == [2, 2, 1]  # pages of batch_rows
    assert all(b.schema.field("UPDATED_AT").type == UTC_TS for b in batches)
    assert json.loads(batches[0].column("PAYLOAD")[0].as_py()) == {"plan": "gold", "nickname": None}
    assert source.count(NOW, None) == 1
    assert bigquery_fake.queries[-1] == (
        "SELECT count(*) FROM `proj`.`cdi`.`events` WHERE `UPDATED_AT` >= @p0",
        {"p0": NOW},
    )
    assert source.max_updated_at() == NOW + dt.timedelta(hours=2)
    assert bigquery_fake.queries[-1][0] == "SELECT max(`UPDATED_AT`) FROM `proj`.`cdi`.`events`"


def test_bigquery_datetime_updated_at_binds_utc_civil_time(bigquery_fake):
    """A DATETIME UPDATED_AT (no zone; UTC by contract) is compared with a DATETIME parameter."""
    bigquery_fake.con.execute(
        "CREATE TABLE proj.cdi.civil AS SELECT UPDATED_AT::TIMESTAMP AS "
        "UPDATED_AT, EXTERNAL_ID, PAYLOAD FROM proj.cdi.events"
    )
    source = bigquery_source(bigquery_fake, "proj.cdi.civil")
    assert source.columns()["UPDATED_AT"] == "DATETIME"
    assert source.count(T0, NOW) == 2
    assert bigquery_fake.queries[-1][1] == {"p0": T0.replace(tzinfo=None), "p1": NOW.replace(tzinfo=None)}
    assert source.max_updated_at() == NOW + dt.timedelta(hours=2)


def test_bigquery_fake_refuses_values_formatted_into_the_sql(bigquery_fake):
    with pytest.raises(AssertionError, match="a value in"):
        bigquery_fake.query(
            "SELECT count(*) FROM `proj`.`cdi`.`events` WHERE `UPDATED_AT` >= '2024-05-01 12:00:00+00'"
        )
    with pytest.raises(AssertionError):
        bigquery_fake.query("SELECT count(*) FROM `proj`.`cdi`.`events` WHERE `UPDATED_AT` >= @p0")


def test_bigquery_quotes_each_part_with_backticks():
    def named(table: str) -> str:
        return BigQuerySource(table, contextlib.nullcontext).qualified_table

    assert named('"my-project".cdi.events') == "`my-project`.`cdi`.`events`"
    assert named("x; drop table y") == "`x; drop table y`"
    assert named('"a`b"') == "`a\\`b`"


def test_bigquery_errors_name_the_table(bigquery_fake):
    with pytest.raises(SourceError, match=r"^bigquery table proj.cdi.nope does not exist \(Not "):
        bigquery_source(bigquery_fake, "proj.cdi.nope").columns()

    class Denied:
        def get_table(self, ref):
            raise api_exceptions.Forbidden(
                "Access Denied: Table proj:cdi.events: User does not "
                "have permission to query table proj:cdi.events."
            )

    source = BigQuerySource("proj.cdi.events", lambda: contextlib.nullcontext(Denied()))
    with pytest.raises(
        SourceError,
        match=r"^bigquery table proj.cdi.events: access denied; the "
        r"service account needs .*\(Access Denied: ",
    ):
        source.check_shape(DATA_TYPES["events"])


# ============================================================================ Databricks (contract)
class RecordingDatabricks:
    """A `databricks.sql` connection stand-in: records every (SQL, parameters) it is given,
    answers DESCRIBE TABLE with `described` (followed by a partitioning section, as Databricks
    does) and any other query with `result`, fetched through fetchmany_arrow."""

    def __init__(
        self,
        described: list[tuple[str, str]],
        result: pa.Table | None = None,
        refuse: Exception | None = None,
        fail: Exception | None = None,
    ):
        """`refuse` is raised on connecting, `fail` by every query."""
        self.described, self.result, self.refuse, self.fail = described, result, refuse, fail
        self.executed: list[tuple[str, list]] = []
        self.fetch_sizes: list[int] = []

    def __enter__(self):
        if self.refuse:
            raise self.refuse
        return self

    def __exit__(self, *exc):
        return None

    def cursor(self):
        return self

    def close(self):
        pass

    def execute(self, operation: str, parameters: list | None = None):
        self.executed.append((operation, parameters))
        if self.fail:
            raise self.fail
        self._offset = 0
        if operation.startswith("DESCRIBE TABLE"):
            self._rows = [
                *self.described,
                ("", "", ""),
                ("# Partition Information", "", ""),
                ("# col_name", "data_type", "comment"),
                ("updated_at", "timestamp", ""),
            ]
        else:
            self._rows = self.result.to_pylist() if self.result is not None else []

    def fetchall(self):
        return self._rows

    def fetchone(self):
        return list(self._rows[0].values())

    def fetchmany_arrow(self, size: int) -> pa.Table:
        self.fetch_sizes.append(size)
        page = self.result.slice(self._offset, size)
        self._offset += page.num_rows
        return page


DESCRIBED = [("updated_at", "timestamp"), ("external_id", "string"), ("payload", "string")]


def databricks_source(con: RecordingDatabricks, table: str = "main.cdi.events") -> DatabricksSource:
    resource = SimpleNamespace(server_hostname="dbc-1234.cloud.databricks.com", connect=lambda: con)
    return DatabricksSource.from_resource(resource, table)


def test_databricks_scan_issues_named_timestamp_parameters():
    con = RecordingDatabricks(DESCRIBED, pa.table({"UPDATED_AT": pa.array([], UTC_TS)}))
    source = databricks_source(con)
    list(source.scan(WINDOW_START, NOW, False, 100))
    assert con.executed[0] == ("DESCRIBE TABLE `main`.`cdi`.`events`", None)
    sql, params = con.executed[-1]
    assert sql == (
        "SELECT `updated_at` AS `UPDATED_AT`, `external_id` AS `EXTERNAL_ID`, "
        "`payload` AS `PAYLOAD` FROM `main`.`cdi`.`events` "
        "WHERE `updated_at` >= :p0 AND `updated_at` < :p1"
    )
    assert [type(p) for p in params] == [TimestampParameter, TimestampParameter]
    # what the connector sends: named, typed TIMESTAMP, the instant with its UTC offset
    sent = [p.as_tspark_param(named=True) for p in params]
    assert [(s.name, s.type, s.value.stringValue) for s in sent] == [
        ("p0", "TIMESTAMP", "2024-04-30 12:00:00+00:00"),
        ("p1", "TIMESTAMP", "2024-05-02 12:00:00+00:00"),
    ]


@pytest.mark.parametrize(
    "payload_type", ["struct<plan:string,visits:int>", "map<string,string>", "STRUCT<plan: STRING>"]
)
def test_databricks_struct_and_map_payloads_are_read_as_json_text(payload_type):
    con = RecordingDatabricks(
        [*DESCRIBED[:2], ("PAYLOAD", payload_type)], pa.table({"UPDATED_AT": pa.array([], UTC_TS)})
    )
    list(databricks_source(con).scan(None, None, True, 10, columns=["EXTERNAL_ID", "PAYLOAD"]))
    assert con.executed[-1] == (
        (
            "SELECT `external_id` AS `EXTERNAL_ID`, to_json(`PAYLOAD`) AS `PAYLOAD` FROM "
            "`main`.`cdi`.`events` WHERE (1 = 1) OR `updated_at` IS NULL"
        ),
        [],
    )


def test_databricks_timestamp_ntz_binds_naive_utc():
    con = RecordingDatabricks(
        [("UPDATED_AT", "timestamp_ntz"), ("EXTERNAL_ID", "string")], pa.table({"c": [0]})
    )
    databricks_source(con).count(T0.astimezone(dt.timezone(dt.timedelta(hours=2))), None)
    sql, [param] = con.executed[-1]
    assert sql == "SELECT count(*) FROM `main`.`cdi`.`events` WHERE `UPDATED_AT` >= :p0"
    assert isinstance(param, TimestampNTZParameter)
    assert (param.name, param.value) == ("p0", T0.replace(tzinfo=None))


def test_databricks_arrow_results_are_normalized_and_fetched_batch_rows_at_a_time():
    stamps = [T0.replace(tzinfo=None) + dt.timedelta(minutes=i) for i in range(5)]
    result = pa.table(
        {
            "updated_at": pa.array(stamps, pa.timestamp("ns")),
            "external_id": [f"u{i}" for i in range(5)],
            "payload": [json.dumps({"n": i}) for i in range(5)],
        }
    )
    con = RecordingDatabricks(DESCRIBED, result)
    batches = list(databricks_source(con).scan(None, NOW, False, 2))
    assert [b.num_rows for b in batches] == [2, 2, 1]
    assert con.fetch_sizes == [2, 2, 2, 2]  # until an empty page
    assert all(b.schema.names == ["UPDATED_AT", "EXTERNAL_ID", "PAYLOAD"] for b in batches)
    assert all(b.schema.field("UPDATED_AT").type == UTC_TS for b in batches)
    assert pa.Table.from_batches(batches).column("UPDATED_AT").to_pylist() == [
        s.replace(tzinfo=UTC) for s in stamps
    ]

    con.result = pa.table({"max(updated_at)": pa.array([stamps[-1]], pa.timestamp("us"))})
    assert databricks_source(con).max_updated_at() == stamps[-1].replace(tzinfo=UTC)
    assert con.executed[-1] == ("SELECT max(`updated_at`) FROM `main`.`cdi`.`events`", [])


def test_databricks_from_the_dagster_resource_connects_with_its_settings(monkeypatch):
    from databricks import sql

    from braze_assets.resources import DatabricksResource

    con, opened = RecordingDatabricks(DESCRIBED, pa.table({"c": [7]})), []
    monkeypatch.setattr(sql, "connect", lambda **kwargs: opened.append(kwargs) or con)
    resource = DatabricksResource(
        server_hostname="dbc-1234.cloud.databricks.com",
        http_path="/sql/1.0/warehouses/abc",
        access_token="dapi-s3cr3t",
    )
    source = DatabricksSource.from_resource(resource, "main.cdi.events")
    assert source.count() == 7
    assert opened[0] == {
        "server_hostname": "dbc-1234.cloud.databricks.com",
        "http_path": "/sql/1.0/warehouses/abc",
        "access_token": "dapi-s3cr3t",
    }
    assert source.description == "databricks table main.cdi.events on dbc-1234.cloud.databricks.com"


def test_databricks_quotes_each_part_with_backticks():
    assert (
        databricks_source(RecordingDatabricks([]), "x; drop table y").qualified_table == "`x; drop table y`"
    )
    assert databricks_source(RecordingDatabricks([]), '"a`b".c').qualified_table == "`a``b`.`c`"


def test_databricks_errors_name_the_table_and_never_the_token():
    missing = RecordingDatabricks(
        DESCRIBED,
        fail=db_errors.ServerOperationError(
            "[TABLE_OR_VIEW_NOT_FOUND] The table or view `main`.`cdi`.`nope` cannot be found."
        ),
    )
    with pytest.raises(
        SourceError,
        match=r"^databricks table main.cdi.nope on dbc-1234.cloud."
        r"databricks.com does not exist \(\[TABLE_OR_VIEW",
    ):
        databricks_source(missing, "main.cdi.nope").columns()

    refused = RecordingDatabricks(
        DESCRIBED,
        refuse=db_errors.RequestError("Error during request to server: 403 Forbidden: invalid access token"),
    )
    with pytest.raises(
        SourceError,
        match=r"cannot connect to or authenticate with Databricks "
        r"\(Error during request to server",
    ):
        databricks_source(refused).count()


# ============================================================================ names from config
def test_config_refuses_table_names_that_are_not_plain_identifiers():
    """The first line of defence; the adapters above still quote every part of what gets through."""
    assert TABLE_NAME.fullmatch("x; drop table y") is None
    assert TABLE_NAME.fullmatch('db."My Schema".events')
