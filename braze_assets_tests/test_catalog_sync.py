"""Catalog syncs: CDI's catalog table (UPDATED_AT, ID, PAYLOAD, optional DELETED) upserts and
deletes items through Braze's asynchronous catalog endpoints, 50 items a request; bad rows fail
alone with a reason, items Braze refuses fail alone with Braze's words while the rest of their
request goes again, and a missing catalog stops the sync with what to do."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import duckdb
import pytest

from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig
from braze_assets.config import ConfigError, parse_syncs
from braze_assets_tests.conftest import API_KEY, Harness, sync_config

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)
FIELDS = {"title": "string", "price": "number", "tags": "array", "details": "object"}


@pytest.fixture
def braze() -> Iterator[BrazeEmulator]:
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, catalogs={"products": FIELDS})) as emulator:
        yield emulator


def _table(harness: Harness, rows: list[tuple]) -> None:
    """(UPDATED_AT, ID, PAYLOAD dict or text, DELETED) rows in the harness's warehouse."""
    harness.tmp_path.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(harness.warehouse)) as con:
        con.execute("DROP TABLE IF EXISTS products")
        con.execute(
            "CREATE TABLE products (UPDATED_AT TIMESTAMP, ID VARCHAR, PAYLOAD VARCHAR, DELETED BOOLEAN)"
        )
        con.executemany(
            "INSERT INTO products VALUES (?, ?, ?, ?)",
            [
                (ts.replace(tzinfo=None), item, p if isinstance(p, str) or p is None else json.dumps(p), d)
                for ts, item, p, d in rows
            ],
        )


def _product(i: int, **extra) -> dict:
    return {"title": f"Product {i}", "price": 10 + i, "tags": ["a"], **extra}


def _harness(tmp_path, braze, catalog: str = "products") -> Harness:
    harness = Harness(tmp_path, braze)
    harness.syncs = [sync_config("products", "catalogs", "main.products", catalog=catalog)]
    return harness


def test_items_are_upserted_and_deleted_in_requests_of_fifty(tmp_path, braze):
    harness = _harness(tmp_path, braze)
    t1 = NOW - dt.timedelta(hours=3)
    _table(harness, [(t1, f"sku-{i}", _product(i), None) for i in range(120)])
    first = harness.run("products")
    assert first.result.success and first.outcome.accepted == 120
    assert first.outcome.requests == 3 and first.outcome.estimated_data_points == 0
    items = braze.store.catalog_items("products")
    assert len(items) == 120 and items["sku-7"] == {"id": "sku-7", **_product(7)}

    t2 = NOW - dt.timedelta(hours=1)
    _table(
        harness,
        [(t1, f"sku-{i}", _product(i), None) for i in range(120)]
        + [
            (t2, "sku-1", None, True),  # a deletion needs no PAYLOAD
            (t2, "sku-2", "{}", True),
            (t2, "sku-3", _product(3, title="Renamed"), False),
        ],
    )
    second = harness.run("products")
    assert second.outcome.accepted == 3 and second.outcome.requests == 2  # one PUT, one DELETE
    items = braze.store.catalog_items("products")
    assert "sku-1" not in items and "sku-2" not in items and items["sku-3"]["title"] == "Renamed"
    assert len(items) == 118
    stats = braze.store.stats()
    assert (stats["catalog_items_upserted"], stats["catalog_items_deleted"]) == (121, 2)


def test_bad_rows_are_rejected_alone_with_a_reason(tmp_path, braze):
    harness = _harness(tmp_path, braze)
    t = NOW - dt.timedelta(hours=1)
    deep: dict = {}
    node = deep
    for _ in range(60):
        node["x"] = {}
        node = node["x"]
    _table(
        harness,
        [(t, f"sku-{i}", _product(i), None) for i in range(60)]  # 9 bad rows of 69: under 20%
        + [
            (t, "bad id!", _product(1), None),
            (t, "x" * 251, _product(2), None),
            (t, None, _product(3), None),
            (t, "sku-dot", {"details": {"a.b": 1}}, None),
            (t, "sku-deep", {"details": deep}, None),
            (t, "sku-long", {"title": "y" * 5001}, None),
            (t, "sku-idkey", {"id": "other", "title": "x"}, None),
            (t, "sku-notjson", "{nope", None),
            (t, "sku-array", "[1, 2]", None),
        ],
    )
    run = harness.run("products")
    assert run.outcome.accepted == 60 and run.delta.rejected == 9
    reasons = run.delta.rejected_reasons
    for expected in (
        "ID may hold only letters, digits, '-' and '_' (invalid-ids)",
        "ID is longer than 250 characters (ids-too-large)",
        "ID is empty (every catalog row needs the item's id)",
        "PAYLOAD nests deeper than 50 levels (too-deep-nesting-in-value-object)",
        "a text value is longer than 5,000 characters (items-too-large)",
        "PAYLOAD has an 'id' field",
        "PAYLOAD is not valid JSON",
        "PAYLOAD must be a JSON object",
    ):
        assert any(key.startswith(expected.split(":")[0]) for key in reasons), (expected, reasons)
    assert any(key.startswith("field name") for key in reasons), reasons
    assert len(braze.store.catalog_items("products")) == 60
    assert harness.ledger("products") == {"accepted": 60, "invalid": 9}


def test_items_braze_refuses_fail_alone_and_the_rest_of_their_request_goes_again(tmp_path, braze):
    harness = _harness(tmp_path, braze)
    t = NOW - dt.timedelta(hours=1)
    _table(
        harness,
        [(t, f"sku-{i}", _product(i), None) for i in range(40)]
        + [
            (t, "sku-color", {"title": "x", "color": "red"}, None),  # no such field in the catalog
            (t, "sku-cheap", {"title": "x", "price": "cheap"}, None),  # not a number
        ],
    )
    run = harness.run("products")
    assert run.outcome.accepted == 40 and run.outcome.failed == 2
    assert run.outcome.status == "partial_success"
    items = braze.store.catalog_items("products")
    assert len(items) == 40 and "sku-color" not in items and "sku-cheap" not in items
    failed = {
        r["row_hash"]: r["message"]
        for r in harness.delivery_state().store("products").log.rows(status="failed").to_pylist()
    }
    messages = sorted(failed.values())
    assert messages[0].startswith("invalid-fields") and messages[1].startswith("unable-to-coerce-value")
    # a rerun sends nothing again: every row is settled
    again = harness.run("products")
    assert again.outcome.requests == 0


@pytest.mark.parametrize("status", [404, 400])
def test_a_missing_catalog_stops_the_sync_with_what_to_do(tmp_path, status):
    """Braze documents `catalog-not-found` under both 404 and 400: either stops the sync, and no
    row is settled as failed (they go once the catalog exists)."""
    config = EmulatorConfig(api_key=API_KEY, catalogs={"products": FIELDS}, catalog_not_found_status=status)
    with BrazeEmulator(config) as braze:
        _a_missing_catalog_stops_the_sync(tmp_path, braze)


def _a_missing_catalog_stops_the_sync(tmp_path, braze):
    harness = _harness(tmp_path, braze, catalog="no_such_catalog")
    _table(harness, [(NOW - dt.timedelta(hours=1), f"sku-{i}", _product(i), None) for i in range(120)])
    run = harness.run("products")
    assert not run.result.success
    failure = next(e for e in run.result.all_events if e.is_step_failure)
    text = failure.step_failure_data.error.to_string()
    assert "Braze has no catalog 'no_such_catalog' (catalog-not-found)" in text
    assert "create it, with its fields" in text
    assert "CatalogNotFoundError" in text and "BrazeAuthError" not in text, "not a key problem"
    assert "Delivery stopped" in text and ". Delivery stopped" in text
    assert harness.ledger("products") == {} and harness.watermark("products") is None
    # the sync log has the run, as an error with the same words
    [logged] = harness.delivery_state().store("products").log.runs()
    assert logged["status"] == "error" and logged["run_id"] == run.result.run_id
    assert "Braze has no catalog 'no_such_catalog'" in logged["status_detail"]
    assert braze.store.stats()["catalog_requests"] <= 3  # it stopped at the first refusals


def test_rows_of_one_item_in_a_run_never_share_a_request(tmp_path, braze):
    """Braze refuses a request naming one id twice (`ids-not-unique`): a change-log table with
    two rows of an item in one run sends them in separate requests, and neither fails."""
    harness = _harness(tmp_path, braze)
    t = NOW - dt.timedelta(hours=2)
    _table(
        harness,
        [(t, f"sku-{i}", _product(i), None) for i in range(10)]
        + [(t + dt.timedelta(minutes=1), "sku-3", _product(3, title="Renamed"), None)],
    )
    run = harness.run("products")
    assert run.outcome.failed == 0 and run.outcome.accepted == 11, run.outcome
    assert braze.store.stats()["catalog_requests_invalid"] == 0
    assert len(braze.store.catalog_items("products")) == 10


@pytest.mark.parametrize(
    ("item", "payload", "reason"),
    [
        ("sku-1\n", _product(1), "invalid-ids"),  # a line end is not an id character
        ("sku-2", "null", "PAYLOAD must be a JSON object"),  # would replace the item with nothing
    ],
)
def test_rows_braze_would_refuse_are_rejected_before_sending(tmp_path, braze, item, payload, reason):
    harness = _harness(tmp_path, braze)
    t = NOW - dt.timedelta(hours=1)
    _table(harness, [(t, f"sku-{i}", _product(i), None) for i in range(10, 20)] + [(t, item, payload, None)])
    run = harness.run("products")
    assert run.delta.rejected == 1 and run.outcome.accepted == 10
    assert any(reason in key for key in run.delta.rejected_reasons), run.delta.rejected_reasons


def _nested(levels: int) -> dict:
    """An object `levels` objects deep (`{"x": {"x": ... {}}}` counts `levels`)."""
    value: dict = {}
    for _ in range(levels - 1):
        value = {"x": value}
    return value


def test_nesting_is_counted_as_braze_counts_it(tmp_path, braze):
    """A field value nested 50 objects deep is accepted (Braze refuses more than 50 levels); 51
    is rejected locally, with the same rule's name."""
    from braze_assets.catalog_items import check_catalog_rows

    rows = [
        (NOW - dt.timedelta(hours=1), "sku-50", {"details": _nested(50)}, None),
        (NOW - dt.timedelta(hours=1), "sku-51", {"details": _nested(51)}, None),
    ]
    harness = _harness(tmp_path, braze)
    _table(harness, rows)
    run = harness.run("products")
    assert run.outcome.accepted == 1 and run.delta.rejected == 1, run.outcome
    assert "sku-50" in braze.store.catalog_items("products")
    assert any("too-deep-nesting-in-value-object" in key for key in run.delta.rejected_reasons)
    import pyarrow as pa

    checked = check_catalog_rows(
        pa.table(
            {
                "UPDATED_AT": pa.array([NOW, NOW], pa.timestamp("us", tz="UTC")),
                "ID": ["a", "b"],
                "PAYLOAD": [json.dumps({"details": _nested(50)}), json.dumps({"details": _nested(51)})],
            }
        )
    )
    assert list(checked.failures) == [1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "a catalogs sync needs catalog"),
        ({"catalog": "bad name"}, "catalog"),
    ],
)
def test_catalog_settings_are_checked_at_load(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_syncs({"syncs": [sync_config("products", "catalogs", "main.products", **extra)]})


def test_catalog_is_refused_on_user_syncs():
    with pytest.raises(ConfigError, match="catalog applies to catalogs syncs only"):
        parse_syncs({"syncs": [sync_config("ev", "events", "main.ev", catalog="products")]})


def test_a_catalog_sync_from_s3_files(s3_endpoint, monkeypatch, tmp_path, braze):
    """Any source can feed a catalog sync: here JSON-lines files on S3 (moto), DELETED as text."""
    from dagster_aws.s3 import S3Resource

    from braze_assets_tests.test_sources_s3 import HOUR, Bucket

    bucket = Bucket(s3_endpoint, monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    lines = [json.dumps({"id": f"sku-{i}", "payload": json.dumps(_product(i))}) for i in range(5)]
    lines.append(json.dumps({"id": "sku-old", "payload": "{}", "deleted": "true"}))
    bucket.put("catalog/products-1.jsonl", "\n".join(lines) + "\n", at=NOW - HOUR)
    harness = Harness(tmp_path, braze)
    harness.syncs = [sync_config("products", "catalogs", "x", catalog="products")]
    harness.syncs[0]["source"] = {"type": "s3", "bucket": bucket.name, "prefix": "catalog"}
    harness.extra_resources["s3"] = S3Resource(endpoint_url=s3_endpoint, region_name="us-east-1")
    run = harness.run("products")
    assert run.result.success and run.outcome.accepted == 6
    assert sorted(braze.store.catalog_items("products")) == [f"sku-{i}" for i in range(5)]
    assert braze.store.stats()["catalog_items_deleted"] == 1


def test_test_connection_previews_catalog_items(tmp_path, braze):
    from braze_assets.connection import check_connection

    harness = _harness(tmp_path, braze)
    t = NOW - dt.timedelta(hours=1)
    _table(harness, [(t, "sku-1", _product(1), None), (t, "bad id!", _product(2), None)])
    report = check_connection(harness.config("products"), harness.resources()["duckdb"])
    assert report.ok and "1 of 2 preview rows valid" in report.message
    shown = {row["identifier"]: row for row in report.preview}
    assert shown["ID=sku-1"]["payload_keys"] == ["price", "tags", "title"]
    assert shown["ID='bad id!'"]["reasons"] == ["ID may hold only letters, digits, '-' and '_' (invalid-ids)"]


def test_a_dry_run_of_a_catalog_sync_bills_no_data_points(tmp_path, braze):
    from braze_assets.assets import partitions_start
    from braze_assets.dry_run import dry_run
    from braze_assets.sources.factory import make_source

    harness = _harness(tmp_path, braze)
    _table(harness, [(NOW - dt.timedelta(hours=1), f"sku-{i}", _product(i), None) for i in range(120)])
    sync = harness.config("products")
    bill = dry_run(
        sync,
        make_source(sync, harness.resources()["duckdb"]),
        harness.delivery_state().store("products"),
        window_start=NOW - dt.timedelta(days=1),
        now=dt.datetime.now(UTC),
        partitions_start=partitions_start(sync),
        rate_share=0.8,
    )
    assert (bill.rows_to_send, bill.requests, bill.data_points) == (120, 3, 0)
    assert bill.rate_per_s == pytest.approx(16_000 / 60 * 0.8)
    assert "catalog syncs bill no data points" in bill.text()
    assert braze.store.stats()["catalog_requests"] == 0


@pytest.mark.parametrize(
    ("value", "deleted"),
    [(True, True), (0, False), ("Yes", True), ("f", False), (None, False), (1.0, True), ("2", None)],
)
def test_deleted_is_read_from_booleans_numbers_and_text(value, deleted):
    """Warehouses without booleans hand DELETED over as numbers (NUMERIC as Decimal, doubles) or
    text; anything but a clear true or false is refused."""
    from decimal import Decimal

    from braze_assets.catalog_items import _deleted

    assert _deleted(value) is deleted
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert _deleted(Decimal(value)) is deleted


def test_numeric_ids_from_a_number_column_are_their_whole_number(tmp_path, braze):
    """A warehouse's NUMBER id column (Snowflake's NUMBER(38,0) arrives as a Decimal) names items
    by its whole number; a fraction is refused alone, with a reason."""
    harness = _harness(tmp_path, braze)
    harness.tmp_path.mkdir(parents=True, exist_ok=True)
    stamp = (NOW - dt.timedelta(hours=1)).replace(tzinfo=None)
    ids = [str(i) for i in range(17, 25)] + ["1700.00", "-3", "2.5"]
    with duckdb.connect(str(harness.warehouse)) as con:
        con.execute(
            "CREATE TABLE products (UPDATED_AT TIMESTAMP, ID DECIMAL(38, 2), PAYLOAD VARCHAR, "
            "DELETED BOOLEAN)"
        )
        con.executemany(
            "INSERT INTO products VALUES (?, ?, ?, NULL)", [(stamp, i, json.dumps(_product(1))) for i in ids]
        )
    run = harness.run("products")
    assert run.outcome.accepted == 10 and run.delta.rejected == 1
    assert sorted(braze.store.catalog_items("products")) == sorted([*map(str, range(17, 25)), "1700", "-3"])
    assert any(key.startswith("ID must be text or a whole number") for key in run.delta.rejected_reasons)


def test_whole_numbers_in_a_floating_point_id_column_are_ids(tmp_path, braze):
    """BigQuery's FLOAT64, a Parquet column with nulls: a whole number there names its item as an
    integer column's would; a fraction, or a number too large to be exact as a double, is refused
    alone, with its reason, and every rejected row shows the id it had."""
    harness = _harness(tmp_path, braze)
    harness.tmp_path.mkdir(parents=True, exist_ok=True)
    stamp = (NOW - dt.timedelta(hours=1)).replace(tzinfo=None)
    with duckdb.connect(str(harness.warehouse)) as con:
        con.execute(
            "CREATE TABLE products (UPDATED_AT TIMESTAMP, ID DOUBLE, PAYLOAD VARCHAR, DELETED BOOLEAN)"
        )
        con.executemany(
            "INSERT INTO products VALUES (?, ?, ?, NULL)",
            [(stamp, i, json.dumps(_product(1))) for i in (17.0, -3.0, 2.5, 2.0**60)],
        )
    run = harness.run("products")
    assert run.outcome.accepted == 2 and run.delta.rejected == 2
    assert sorted(braze.store.catalog_items("products")) == ["-3", "17"]
    reasons = run.delta.rejected_reasons
    assert "ID must be text or a whole number, not a number with a fraction" in reasons
    assert any("too large to be exact" in key for key in reasons), reasons
    shown = sorted(example["identifier"] for example in run.delta.rejected_examples)
    assert shown == ["ID=1.152921504606847e+18", "ID=2.5"], shown


def test_a_rejected_row_shows_the_id_it_had(tmp_path, braze):
    """Item ids are not personal data: a row refused for its id is found by that id in the log."""
    harness = _harness(tmp_path, braze)
    long_id = "x" * 300
    _table(
        harness, [(NOW - dt.timedelta(hours=1), i, _product(1), None) for i in ("bad sku!", long_id, "ok")]
    )
    run = harness.run("products")
    assert run.outcome.accepted == 1
    shown = sorted(example["identifier"] for example in run.delta.rejected_examples)
    assert shown == ["ID='bad sku!'", f"ID='{'x' * 60}...' (300 characters)"], shown


def test_a_refused_id_from_a_binary_column_is_cut_too():
    from braze_assets.catalog_items import SHOWN_ID_CHARS, shown_id

    shown = shown_id(None, b"x" * 300)
    assert shown.endswith("(303 characters)") and len(shown) < SHOWN_ID_CHARS + 40, shown
