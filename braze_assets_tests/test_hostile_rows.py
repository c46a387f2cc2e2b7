"""No row can stop a sync: hostile CDI rows are rejected with their own reason, one at a time.

Every case puts a hostile row *before* a valid one in the same batch: the valid row must still go
out, the hostile one must end rejected with a reason that names the field and the rule (values
masked), and nothing may escape as an exception. A property-based test then generates hostile rows
across all data types and checks the same invariants through delta and delivery to the emulator.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import orjson
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braze_assets.attribute_diff import AttributeDiff
from braze_assets.braze.client import BrazeClient
from braze_assets.datatypes import DATA_TYPES
from braze_assets.delivery import Delivery
from braze_assets.delta import DeltaManifest, compute_delta
from braze_assets.sources import DuckDBSource
from braze_assets.state import EmbeddedStateStore
from braze_assets_tests.conftest import API_KEY, Harness, cdi_row, sync_config

UTC = dt.UTC
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
NOW = T0 + dt.timedelta(days=1)
PAYLOADS = {
    "attributes": {"tier": "gold"},
    "events": {"name": "app_open"},
    "purchases": {"product_id": "sku-tee", "currency": "USD", "price": 12.5},
}
ID_COLUMNS = ("EXTERNAL_ID", "ALIAS_NAME", "ALIAS_LABEL", "BRAZE_ID", "EMAIL", "PHONE")
_tables = itertools.count()
_EXPLORE = os.environ.get("HYPOTHESIS_EXPLORE") == "1"


def _table(
    path: Path, data_type: str, rows: list[dict[str, Any]], types: dict[str, str] | None = None
) -> str:
    """A DuckDB table of CDI rows; `types` overrides column types (BLOB, DOUBLE, ...)."""
    spec = DATA_TYPES[data_type]
    columns = ["UPDATED_AT", *ID_COLUMNS, *(["PAYLOAD"] if spec.has_payload else [])]
    types = {"UPDATED_AT": "TIMESTAMP", **(types or {})}
    name = f"t{next(_tables)}"
    with duckdb.connect(str(path)) as con:
        con.execute(
            f"CREATE TABLE {name} (" + ", ".join(f"{c} {types.get(c, 'VARCHAR')}" for c in columns) + ")"
        )
        con.executemany(
            f"INSERT INTO {name} VALUES ({', '.join('?' * len(columns))})",
            [[r.get(c) for c in columns] for r in rows],
        )
    return name


def _delta(
    tmp_path: Path,
    data_type: str,
    rows: list[dict[str, Any]],
    types: dict[str, str] | None = None,
    partitions_start: dt.datetime = T0 - dt.timedelta(days=30),
    diff: AttributeDiff | None = None,
) -> DeltaManifest:
    """`compute_delta` over the rows, as the `<sync>_delta` asset runs it (with the attribute
    `diff` of an attributes sync sending only what changed, when given)."""
    warehouse = tmp_path / "warehouse.duckdb"
    table = _table(warehouse, data_type, rows, types)
    out = tmp_path / f"out_{table}"
    manifest = DeltaManifest(
        sync="case",
        data_type=data_type,
        run_id=f"run-{table}",
        window_start=None,
        window_end=NOW.isoformat(),
        reaches_now=True,
        valid_path=str(out / "valid.parquet"),
        rejected_path=str(out / "rejected.parquet"),
        unchanged_path=str(out / "unchanged.parquet") if diff is not None else None,
    )
    source = DuckDBSource(warehouse, table)
    return compute_delta(
        source=source,
        spec=DATA_TYPES[data_type],
        store=EmbeddedStateStore(tmp_path / "state", table),
        manifest=manifest,
        window_start=None,
        window_end=NOW,
        now=NOW,
        partitions_start=partitions_start,
        update_existing_only=False,
        diff=diff,
    )


def _row(payload: Any = None, updated_at: dt.datetime | None = T0, **ids: Any) -> dict[str, Any]:
    values: dict[str, Any] = {k.upper(): v for k, v in ids.items()}
    values["UPDATED_AT"] = updated_at.replace(tzinfo=None) if updated_at else None
    values["PAYLOAD"] = (
        payload if payload is None or isinstance(payload, (str, bytes)) else json.dumps(payload)
    )
    return values


def _table_row(payload: Any, updated_at: dt.datetime, **ids: Any) -> dict[str, Any]:
    """A row for `Harness.table` (every CDI column present)."""
    return cdi_row(updated_at.replace(tzinfo=None), json.dumps(payload), **ids)


def _valid(manifest: DeltaManifest) -> list[dict[str, Any]]:
    return [orjson.loads(r["object"]) for r in pq.read_table(manifest.valid_path).to_pylist()]


def _rejected(manifest: DeltaManifest) -> list[dict[str, Any]]:
    return pq.read_table(manifest.rejected_path).to_pylist()


# ----------------------------------------------------------------------------- item 2: crashes
@pytest.mark.parametrize("blank", ["", "  ", "\t\n", "\u00a0", "\u2003", None])
@pytest.mark.parametrize("data_type", ["attributes", "events", "purchases", "deletions"])
def test_a_row_without_identifier_does_not_stop_the_valid_row_after_it(tmp_path, data_type, blank):
    payload = PAYLOADS.get(data_type)
    manifest = _delta(
        tmp_path,
        data_type,
        [
            _row(payload, external_id=blank, email=blank),
            _row(payload, external_id="user-1"),
        ],
    )
    valid = _valid(manifest)
    assert len(valid) == 1
    if data_type == "deletions":
        assert valid[0] == ["external_ids", "user-1"]
    else:
        assert valid[0]["external_id"] == "user-1"
    [rejected] = _rejected(manifest)
    assert rejected["reasons"].startswith("row has no identifier")
    assert pq.read_table(manifest.valid_path)["identifier"].to_pylist() == ["EXTERNAL_ID=***"]


@pytest.mark.parametrize("depth", [300, 600, 1_000, 3_000])
@pytest.mark.parametrize("data_type", ["attributes", "events"])
def test_a_payload_nested_too_deep_is_rejected_alone(tmp_path, data_type, depth):
    nested = '{"a":' * depth + "1" + "}" * depth
    deep = (
        f'{{"deep": {nested}}}'
        if data_type == "attributes"
        else f'{{"name": "x", "properties": {{"deep": {nested}}}}}'
    )
    manifest = _delta(
        tmp_path,
        data_type,
        [_row(deep, external_id="user-deep"), _row(PAYLOADS[data_type], external_id="user-1")],
    )
    assert [v["external_id"] for v in _valid(manifest)] == ["user-1"]
    [rejected] = _rejected(manifest)
    assert rejected["reasons"] == "PAYLOAD nests deeper than 254 levels (too deep to send)"


def test_a_blob_payload_row_failing_validation_is_rejected_alone(tmp_path):
    manifest = _delta(
        tmp_path,
        "events",
        [
            _row(b'{"name": "x", "time": "never"}', external_id="user-bad"),
            _row(b"\xff\xfe not utf-8", external_id="user-garbled"),
            _row(b'{"name": "app_open"}', external_id="user-1"),
        ],
        types={"PAYLOAD": "BLOB"},
    )
    assert [v["external_id"] for v in _valid(manifest)] == ["user-1"]
    reasons = sorted(r["reasons"] for r in _rejected(manifest))
    assert reasons[0].startswith("PAYLOAD is not valid JSON")
    assert reasons[1] == "event 'time' is not ISO 8601: '***'"


# ----------------------------------------------------------------------------- item 3: silent changes
def test_a_blob_identifier_is_sent_as_its_text(tmp_path):
    manifest = _delta(
        tmp_path,
        "events",
        [
            _row(PAYLOADS["events"], external_id=b"user-42"),
            _row(PAYLOADS["events"], external_id="user-\u00e9".encode()),
        ],
        types={"EXTERNAL_ID": "BLOB"},
    )
    assert sorted(v["external_id"] for v in _valid(manifest)) == ["user-42", "user-\u00e9"]


@pytest.mark.parametrize(
    "column_type, value, problem",
    [
        ("BLOB", b"\xff\xfeuser", "EXTERNAL_ID is binary data that is not UTF-8 text"),
        ("DOUBLE", 42.5, "EXTERNAL_ID must be text or a whole number, not float"),
        ("BOOLEAN", True, "EXTERNAL_ID must be text or a whole number, not bool"),
    ],
)
def test_an_identifier_without_exact_text_is_rejected_with_a_reason(tmp_path, column_type, value, problem):
    manifest = _delta(
        tmp_path,
        "attributes",
        [
            _row(PAYLOADS["attributes"], external_id=value),
        ],
        types={"EXTERNAL_ID": column_type},
    )
    assert _valid(manifest) == []
    [rejected] = _rejected(manifest)
    assert problem in rejected["reasons"]
    assert "row has no identifier" not in rejected["reasons"]


def test_a_whole_number_identifier_is_sent_as_its_digits(tmp_path):
    manifest = _delta(
        tmp_path,
        "attributes",
        [_row(PAYLOADS["attributes"], external_id=42)],
        types={"EXTERNAL_ID": "BIGINT"},
    )
    assert [v["external_id"] for v in _valid(manifest)] == ["42"]


@pytest.mark.parametrize(
    "number, sent",
    [
        ("9223372036854775807", 9223372036854775807),
        ("18446744073709551615", 18446744073709551615),
        ("-9223372036854775808", -9223372036854775808),
        ("123456789012345678901234567890", None),
        ("-9223372036854775809", None),
        ("1" * 5000, None),
    ],
)
def test_whole_numbers_go_out_exactly_or_the_row_is_rejected(tmp_path, number, sent):
    manifest = _delta(tmp_path, "attributes", [_row(f'{{"big": {number}}}', external_id="u1")])
    if sent is None:
        assert _valid(manifest) == []
        [rejected] = _rejected(manifest)
        assert "whole number beyond 64 bits" in rejected["reasons"]
        assert number[:12] not in rejected["reasons"]
    else:
        [obj] = _valid(manifest)
        assert obj["big"] == sent and isinstance(obj["big"], int)


@pytest.mark.parametrize(
    "raw, duplicated",
    [
        ('{"tier": "gold", "tier": "silver"}', "'tier'"),
        ('{"pet": {"name": "a", "name": "b"}}', "'name'"),
    ],
)
def test_duplicate_json_keys_are_rejected_with_a_reason(tmp_path, raw, duplicated):
    manifest = _delta(tmp_path, "attributes", [_row(raw, external_id="u1")])
    [rejected] = _rejected(manifest)
    assert rejected["reasons"] == (
        f"PAYLOAD has duplicate keys (JSON keeps only the last; send each key once): {duplicated}"
    )


def test_the_same_key_in_different_objects_is_fine(tmp_path):
    raw = '{"a": {"id": 1, "x": "1\\": y"}, "b": {"id": 2}, "c": [{"id": 3}]}'
    manifest = _delta(tmp_path, "attributes", [_row(raw, external_id="u1")])
    assert _valid(manifest)[0]["c"] == [{"id": 3}]


def test_rows_before_partitions_start_are_counted_and_reported(tmp_path, emulator):
    harness = Harness(tmp_path, emulator)
    recent = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    old = recent - dt.timedelta(days=60)
    start = (recent - dt.timedelta(days=3)).date().isoformat()
    harness.table(
        "events",
        [_table_row(PAYLOADS["events"], updated_at=old, external_id=f"old-{i}") for i in range(3)]
        + [_table_row(PAYLOADS["events"], updated_at=recent, external_id="new-1")],
    )
    harness.syncs = [sync_config("events", "events", "main.events", partitions_start=start)]
    today = dt.datetime.now(UTC).strftime("%Y-%m-%d")
    run = harness.run("events", keys=dg.PartitionKeyRange(today, today))  # "sync now": one partition
    assert run.result.success
    assert run.delta.before_partitions_start == 3
    materialization = next(
        e.event_specific_data.materialization
        for e in run.result.all_events
        if e.is_step_materialization and e.step_key == "events_delta"
    )
    assert materialization.metadata["rows_before_partitions_start"].value == 3
    assert run.outcome.accepted == 1


# ----------------------------------------------------------------------------- item 7: PII
def test_reasons_and_excerpts_mask_the_values_they_quote(tmp_path, emulator):
    harness = Harness(tmp_path, emulator)
    recent = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    harness.table(
        "purchases",
        [
            _table_row(
                {"product_id": "sku", "currency": "+14155550123", "price": 1},
                updated_at=recent,
                external_id="u-1",
            ),
            _table_row(
                {
                    "product_id": "sku",
                    "currency": "USD",
                    "price": "jane.doe@example.com",
                    "time": "john.roe@example.com",
                },
                updated_at=recent,
                external_id="u-2",
            ),
            _table_row(
                {"product_id": "sku", "currency": "USD", "price": 1}, updated_at=recent, external_id="u-3"
            ),
        ],
    )
    harness.syncs = [sync_config("purchases", "purchases", "main.purchases", max_row_error_rate=1.0)]
    run = harness.run("purchases")
    assert run.outcome.accepted == 1
    secrets = ("14155550123", "jane.doe", "john.roe", "example.com")
    rejected = _rejected(run.delta)
    texts = [json.dumps(rejected, default=str), json.dumps([str(e) for e in run.result.all_events])]
    with duckdb.connect(str(harness.state_dir / "purchases.duckdb"), read_only=True) as con:
        texts.append(json.dumps(con.execute("SELECT message FROM ledger").fetchall()))
    for text in texts:
        for secret in secrets:
            assert secret not in text
    reasons = " | ".join(r["reasons"] for r in rejected)
    assert "purchase 'currency' is not an ISO 4217 currency code: '***23'" in reasons
    assert "purchase 'price' must be a number: got 'j***@e***.com'" in reasons
    assert "purchase 'time' is not ISO 8601: 'j***@e***.com'" in reasons
    assert any('"currency":"***23"' in r["payload_excerpt"] for r in rejected)


# ----------------------------------------------------------------------------- item 8: table names
def test_a_quoted_table_name_with_a_space_loads_and_syncs(tmp_path, emulator):
    harness = Harness(tmp_path, emulator)
    recent = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    harness.table('"My Events"', [_table_row(PAYLOADS["events"], updated_at=recent, external_id="u1")])
    harness.syncs = [
        sync_config("my_events", "events", 'main."My Events"'),
        sync_config("other", "events", "main.other"),
    ]
    defs = harness.definitions()
    assert defs.resolve_asset_graph().get_all_asset_keys()  # every sync loads
    run = harness.run("my_events")
    assert run.result.success and run.outcome.accepted == 1


def test_table_names_that_share_an_asset_key_are_refused_at_load():
    from braze_assets.config import parse_syncs

    with pytest.raises(ValueError, match="same asset key 'duckdb/main/my_events'"):
        parse_syncs(
            {
                "syncs": [
                    sync_config("a", "events", 'main."My Events"'),
                    sync_config("b", "events", "main.my_events"),
                ]
            }
        )


# ----------------------------------------------------------------------------- property-based
_blank = st.sampled_from(["", " ", "\t\n", "\u00a0", None])
_identifier = st.one_of(
    _blank,
    st.text(min_size=1, max_size=12),
    st.just("x" * 988),
    st.sampled_from(["user-1", "user-2", "a@b.co", "+14155550123"]),
)
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _payload_text(draw: st.DrawFn, data_type: str) -> str | None:
    kind = draw(st.sampled_from(["good", "random", "garbage", "deep", "dup", "bigint", "null"]))
    good = dict(PAYLOADS.get(data_type, {}))
    if kind == "good":
        return json.dumps(good)
    if kind == "random":
        value = draw(_json)
        if isinstance(value, dict) and draw(st.booleans()):
            value = {**good, **value}
        return json.dumps(value)
    if kind == "garbage":
        return draw(st.sampled_from(["{", "", "[1,", '{"a":}', "nul", '"str"']))
    if kind == "deep":
        depth = draw(st.integers(200, 1_500))
        return '{"name": "e", "d": ' + "[" * depth + "]" * depth + "}"
    if kind == "dup":
        return '{"name": "e", "name": "f", "tier": 1}'
    if kind == "bigint":
        return '{"name": "e", "n": ' + "9" * draw(st.integers(19, 40)) + "}"
    return None


@st.composite
def _cdi_rows(draw: st.DrawFn, data_type: str) -> list[dict[str, Any]]:
    rows = []
    for n in range(draw(st.integers(1, 12))):
        ids = {c: draw(_identifier) if draw(st.integers(0, 4)) == 0 else None for c in ID_COLUMNS}
        if draw(st.booleans()):
            ids["EXTERNAL_ID"] = f"user-{n}"
        stamp = draw(st.sampled_from([T0, T0 - dt.timedelta(days=1), None, NOW + dt.timedelta(days=1)]))
        payload = _payload_text(draw, data_type) if DATA_TYPES[data_type].has_payload else None
        rows.append(_row(payload, updated_at=stamp, **ids))
    return rows


@pytest.fixture(scope="module")
def shared_emulator():
    from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig

    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emu:
        yield emu


@pytest.mark.parametrize("data_type", ["attributes", "events", "purchases", "deletions"])
# derandomize: CI explores the same examples every run (a random failure would block a landing
# without saying what changed); explore more with HYPOTHESIS_EXPLORE=1 (random, 200 examples).
@settings(
    max_examples=200 if _EXPLORE else 25,
    derandomize=not _EXPLORE,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_hostile_rows_never_escape_and_every_row_is_accounted_for(
    tmp_path_factory, shared_emulator, data_type, data
):
    rows = data.draw(_cdi_rows(data_type))
    tmp_path = tmp_path_factory.mktemp("prop")
    manifest = _delta(tmp_path, data_type, rows)
    future = sum(1 for r in rows if r["UPDATED_AT"] and r["UPDATED_AT"] >= NOW.replace(tzinfo=None))
    # every row read ends valid, rejected with a reason, or dropped as an exact copy of another;
    # future rows are held back, counted
    assert manifest.rows_read == len(rows) - future
    assert manifest.rows_read == manifest.valid + manifest.rejected + manifest.duplicate_rows
    assert manifest.future_rows == future
    assert all(r["reasons"] for r in _rejected(manifest))
    store = EmbeddedStateStore(tmp_path / "state", "delivered")
    client = BrazeClient(
        shared_emulator.base_url, API_KEY, max_connections=4, backoff_initial_s=0.01, backoff_max_s=0.05
    )
    outcome = Delivery(
        spec=DATA_TYPES[data_type],
        store=store,
        manifest=manifest,
        client=client,
        policy="hold",
        max_in_flight=4,
        run_id="prop-run",
        log=lambda _: None,
    ).run()
    # every valid row was answered by Braze: accepted, or failed with Braze's own message
    assert outcome.accepted + outcome.failed == manifest.valid
    assert outcome.not_sent == outcome.held == 0
    counts = store.log.status_counts()
    assert counts.get("invalid", 0) == manifest.rejected
    assert counts.get("accepted", 0) + counts.get("failed", 0) == manifest.valid
    assert outcome.status in ("success", "partial_success")


def test_exact_duplicate_rows_do_not_block_the_sync(tmp_path, emulator):
    """Two identical rows are one row (same identity): sent once, counted, never a blocked run."""
    harness = Harness(tmp_path, emulator)
    recent = dt.datetime.now(UTC) - dt.timedelta(hours=1)
    same = _table_row({"name": "app_open", "properties": {"n": 1}}, updated_at=recent, external_id="u1")
    harness.table(
        "events",
        [same, dict(same), dict(same), _table_row(PAYLOADS["events"], updated_at=recent, external_id="u2")],
    )
    harness.syncs = [sync_config("events", "events", "main.events")]
    run = harness.run("events")
    assert run.result.success
    assert run.delta.duplicate_rows == 2 and run.delta.valid == 2
    assert run.delta.estimated_data_points == 2  # one per event sent, copies not billed
    assert run.outcome.accepted == 2 and run.outcome.status == "success"
    assert sorted(e["external_id"] for e in emulator.store.events()) == ["u1", "u2"]
    assert harness.run("events").delta.valid == 0  # and settled for good
