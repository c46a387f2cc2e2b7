"""Row validation and Braze objects (`braze_assets/datatypes/`), through the real delta path.

Every case writes CDI-shaped rows into its own table of a real DuckDB file and reads them back with
`DuckDBSource`. Single-row cases go through `DeltaWriter` (`validate_batch`: facts + the pandera schema,
`build_objects`, Parquet output); batch, null-UPDATED_AT and object-shape cases run the whole
`compute_delta` (window scan, hashing, ledger). The tests read the valid/rejected Parquet files back.
Contract references are to `docs/braze-contract.md` (A2 = CDI tables, B1 = /users/track,
B2 = /users/delete).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow.parquet as pq
import pytest

from braze_assets.datatypes import DATA_TYPES
from braze_assets.delta import DeltaManifest, DeltaWriter, compute_delta
from braze_assets.row_identity import batch_hashes, row_hash
from braze_assets.sources import DuckDBSource
from braze_assets.state import EmbeddedStateStore

pytestmark = pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning")

UTC = dt.UTC
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
NOW = T0 + dt.timedelta(days=1)
COLUMNS = ("UPDATED_AT", "EXTERNAL_ID", "ALIAS_NAME", "ALIAS_LABEL", "BRAZE_ID", "EMAIL", "PHONE", "PAYLOAD")
ALL_KINDS = "EXTERNAL_ID, ALIAS_NAME+ALIAS_LABEL, BRAZE_ID, EMAIL, PHONE"
MB = 1024 * 1024

# The exact sentences the product gives (the Sync Log "error reason" of A4.4).
NO_ID = f"row has no identifier (set exactly one of {ALL_KINDS})"
SEVERAL = "row has several identifier types (CDI rows carry exactly one): "
NAME_NO_LABEL = "ALIAS_NAME is set but ALIAS_LABEL is empty (a user alias needs both)"
LABEL_NO_NAME = "ALIAS_LABEL is set but ALIAS_NAME is empty (a user alias needs both)"
ID_IN_PAYLOAD = "PAYLOAD contains identifier keys (identifiers belong in their own columns): "
NULL_UPDATED_AT = "UPDATED_AT is null"
NO_EVENT_NAME = "event PAYLOAD has no 'name' (a non-empty string)"
DELETE_BY = (
    "deletions rows cannot use EMAIL or PHONE (Braze deletes by EXTERNAL_ID, alias or BRAZE_ID only): "
)
TOO_LONG = "EXTERNAL_ID is longer than 987 bytes (EXTERNAL_USER_ID_TOO_LARGE): 988 bytes"
QUANTITY = "purchase 'quantity' must be a whole number from 1 to 100: got "

EVENT = {"name": "app_open"}
PURCHASE = {"product_id": "sku-tee", "currency": "USD", "price": 12.5}


# ----------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    """One DuckDB file for the module; each case gets its own table in it."""
    path = tmp_path_factory.mktemp("warehouse") / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    yield path, con
    con.close()


_tables = itertools.count()


@dataclass
class Synced:
    manifest: DeltaManifest
    valid: list[dict[str, Any]]  # Parquet rows, with `object` parsed
    rejected: list[dict[str, Any]]  # Parquet rows; `reasons` is the "; "-joined string

    def only_reasons(self) -> str:
        """The reasons of the single rejected row (and nothing else got through)."""
        assert self.manifest.rows_read == 1
        assert self.valid == [], f"row was accepted as {self.valid}"
        assert len(self.rejected) == 1
        return self.rejected[0]["reasons"]

    def only_object(self) -> Any:
        """The Braze object of the single row, which must have been accepted."""
        assert self.rejected == [], f"row was rejected: {self.rejected}"
        assert len(self.valid) == 1
        return self.valid[0]["object"]


def assert_reasons(joined: str, expected: list[str]) -> None:
    """`joined` holds exactly the `expected` reasons, in any order (some contain "; " themselves)."""
    for reason in expected:
        assert reason in joined, f"{reason!r} missing from {joined!r}"
    assert len(joined) == sum(map(len, expected)) + 2 * (len(expected) - 1), joined


def row(payload: Any = None, updated_at: dt.datetime | None = T0, **ids: str) -> dict[str, Any]:
    """A CDI row; a dict/list payload is stored as its JSON text (Snowflake VARCHAR style)."""
    values = {c: None for c in COLUMNS}
    values.update({k.upper(): v for k, v in ids.items()})
    values["UPDATED_AT"] = updated_at
    values["PAYLOAD"] = payload if payload is None or isinstance(payload, str) else json.dumps(payload)
    return values


def sync(
    warehouse,
    out: Path,
    data_type: str,
    rows: list[dict[str, Any]],
    *,
    full: bool,
    update_existing_only: bool = False,
    updated_at_type: str = "TIMESTAMP",
) -> Synced:
    """Load `rows` into a fresh DuckDB table, read them back with `DuckDBSource` and validate them.

    `full` runs `compute_delta` (ledger, window scan with null UPDATED_AT, future rows); otherwise
    the scanned batch goes straight into a `DeltaWriter`, which is the same validation and object
    building without the ledger (faster, for the many single-row cases)."""
    path, con = warehouse
    spec = DATA_TYPES[data_type]
    table = f"cdi_{next(_tables)}"
    columns = [c for c in COLUMNS if c != "PAYLOAD" or spec.has_payload]
    ddl = ", ".join(f"{c} {updated_at_type if c == 'UPDATED_AT' else 'VARCHAR'}" for c in columns)
    con.execute(f"CREATE TABLE {table} ({ddl})")
    con.executemany(
        f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})",
        [[r[c] for c in columns] for r in rows],
    )
    # As Dagster's DuckDBResource does: the source borrows connections from a factory.
    source = DuckDBSource(path, table, connect=lambda: contextlib.closing(con.cursor()))
    out.mkdir(parents=True)
    manifest = DeltaManifest(
        sync="case",
        data_type=data_type,
        run_id="run-1",
        window_start=None,
        window_end=NOW.isoformat(),
        reaches_now=True,
        valid_path=str(out / "valid.parquet"),
        rejected_path=str(out / "rejected.parquet"),
    )
    if full:
        compute_delta(
            source=source,
            spec=spec,
            store=EmbeddedStateStore(out / "state", "case"),
            manifest=manifest,
            window_start=None,
            window_end=NOW,
            now=NOW,
            partitions_start=T0 - dt.timedelta(days=30),
            update_existing_only=update_existing_only,
        )
    else:
        columns = source.check_shape(spec)
        hashed = [c for c in columns if c != "PAYLOAD" or spec.has_payload]
        writer = DeltaWriter(manifest, spec, update_existing_only)
        try:
            for batch in source.scan(None, NOW, True, 1000, columns=columns):
                manifest.rows_read += batch.num_rows
                hashes = batch_hashes(batch, hashed)
                assert hashes == [row_hash(r, hashed) for r in batch.to_pylist()]
                writer.add(batch, hashes)
        finally:
            writer.close()
    valid = pq.read_table(manifest.valid_path).to_pylist()
    for v in valid:
        v["object"] = orjson.loads(v["object"])
    rejected = pq.read_table(manifest.rejected_path).to_pylist()
    assert manifest.valid == len(valid) and manifest.rejected == len(rejected)
    assert manifest.rows_read == len(rows) == len(valid) + len(rejected)
    return Synced(manifest, valid, rejected)


@pytest.fixture
def run(warehouse):
    """Single rows through DuckDB + DeltaWriter."""

    def _run(data_type: str, *rows: dict[str, Any], **kwargs: Any) -> Synced:
        out = warehouse[0].parent / f"out_{next(_tables)}"
        return sync(warehouse, out, data_type, list(rows), full=False, **kwargs)

    return _run


@pytest.fixture
def run_full(warehouse):
    """Rows through DuckDB + `compute_delta` (the asset's whole delta path)."""

    def _run(data_type: str, *rows: dict[str, Any], **kwargs: Any) -> Synced:
        out = warehouse[0].parent / f"out_{next(_tables)}"
        return sync(warehouse, out, data_type, list(rows), full=True, **kwargs)

    return _run


# ----------------------------------------------------------------------------- PAYLOAD shape [A2.1]
@pytest.mark.parametrize("raw", ["{bad", '{"a": 1', ""])
def test_malformed_payload_json_is_rejected(run, raw):
    reasons = run("attributes", row(raw, external_id="user-1")).only_reasons()
    assert reasons.startswith("PAYLOAD is not valid JSON: ")
    explanation = reasons.removeprefix("PAYLOAD is not valid JSON: ")
    assert explanation and ";" not in explanation  # the parser's reason, and no other reason


@pytest.mark.parametrize(
    "data_type, raw, kind",
    [("attributes", "[1, 2]", "list"), ("events", '"text"', "str"), ("purchases", "42", "int")],
)
def test_payload_that_is_not_an_object_is_rejected(run, data_type, raw, kind):
    reasons = run(data_type, row(raw, external_id="user-1")).only_reasons()
    assert reasons == f"PAYLOAD must be a JSON object: got {kind}"


def test_null_payload_is_rejected(run):
    assert run("attributes", row(None, external_id="user-1")).only_reasons() == "PAYLOAD is null"


def test_payload_over_1mb_is_rejected_and_exactly_1mb_is_accepted(run):
    def payload_of(size: int) -> str:
        text = '{"blob":"' + "x" * (size - 11) + '"}'
        assert len(text.encode()) == size
        return text

    over = run("attributes", row(payload_of(MB + 1), external_id="user-1")).only_reasons()
    assert over == f"Payload was greater than 1MB: {MB + 1} bytes"
    at_limit = run("attributes", row(payload_of(MB), external_id="user-1")).only_object()
    assert len(at_limit["blob"]) == MB - 11


def test_payload_size_counts_bytes_not_characters(run):
    # 349,526 three-byte characters: ~0.33 M characters but over 1 MB on the wire.
    text = '{"bio":"' + "€" * 349_526 + '"}'
    assert len(text) < MB < len(text.encode())
    reasons = run("attributes", row(text, external_id="user-1")).only_reasons()
    assert reasons == f"Payload was greater than 1MB: {len(text.encode())} bytes"


# ----------------------------------------------------------------------------- identifiers [A2.1]
@pytest.mark.parametrize("data_type", ["attributes", "events"])
def test_row_without_identifier_is_rejected(run, data_type):
    payload = {"plan": "gold"} if data_type == "attributes" else EVENT
    assert run(data_type, row(payload)).only_reasons() == NO_ID


def test_blank_identifiers_count_as_missing(run):
    reasons = run("attributes", row({"plan": "gold"}, external_id="   ", email="")).only_reasons()
    assert reasons == NO_ID


def test_deletion_row_without_identifier_lists_only_delete_identifiers(run):
    reasons = run("deletions", row()).only_reasons()
    assert reasons == (
        "row has no identifier (set exactly one of EXTERNAL_ID, ALIAS_NAME+ALIAS_LABEL, BRAZE_ID)"
    )


@pytest.mark.parametrize(
    "ids, listed",
    [
        ({"external_id": "user-1", "email": "jane@example.com"}, "EXTERNAL_ID, EMAIL"),
        ({"external_id": "user-1", "alias_name": "a-1", "alias_label": "crm"}, "EXTERNAL_ID, ALIAS"),
        ({"braze_id": "5f0c1b2a", "phone": "+14155550123"}, "BRAZE_ID, PHONE"),
    ],
)
def test_two_identifier_types_in_one_row_are_rejected(run, ids, listed):
    reasons = run("attributes", row({"plan": "gold"}, **ids)).only_reasons()
    assert reasons == SEVERAL + listed


def test_two_identifier_types_in_a_deletion_row_are_rejected(run):
    reasons = run("deletions", row(external_id="user-1", braze_id="5f0c1b2a")).only_reasons()
    assert reasons == SEVERAL + "EXTERNAL_ID, BRAZE_ID"


@pytest.mark.parametrize("data_type", ["attributes", "deletions"])
def test_alias_name_without_label_and_label_without_name_are_rejected(run, data_type):
    payload = {"plan": "gold"} if data_type == "attributes" else None
    assert run(data_type, row(payload, alias_name="a-1")).only_reasons() == NAME_NO_LABEL
    assert run(data_type, row(payload, alias_label="crm")).only_reasons() == LABEL_NO_NAME


def test_external_id_of_988_bytes_is_rejected_and_987_accepted(run):
    too_long = run("attributes", row({"plan": "gold"}, external_id="x" * 988)).only_reasons()
    assert too_long == TOO_LONG
    obj = run("attributes", row({"plan": "gold"}, external_id="x" * 987)).only_object()
    assert obj["external_id"] == "x" * 987


def test_external_id_limit_is_in_bytes(run):
    # 494 two-byte characters = 988 bytes although only 494 characters.
    reasons = run("events", row(EVENT, external_id="é" * 494)).only_reasons()
    assert reasons == TOO_LONG


def test_external_id_limit_applies_to_deletions(run):
    assert run("deletions", row(external_id="x" * 988)).only_reasons() == TOO_LONG


# ----------------------------------------------------------------------------- attributes [A2.2]
def _attributes(n: int) -> dict[str, int]:
    return {f"attr_{i:03d}": i for i in range(n)}


def test_more_than_250_attributes_are_rejected_and_250_accepted(run):
    reasons = run("attributes", row(_attributes(251), external_id="user-1")).only_reasons()
    assert reasons == "PAYLOAD has more than 250 attributes: 251"
    obj = run("attributes", row(_attributes(250), external_id="user-1")).only_object()
    assert {k for k in obj if k.startswith("attr_")} == set(_attributes(250))


def test_underscore_flags_do_not_count_as_attributes(run):
    payload = {**_attributes(250), "_merge_objects": True}
    obj = run("attributes", row(payload, external_id="user-1")).only_object()
    assert obj["_merge_objects"] is True


def test_an_array_counts_as_one_attribute(run):
    payload = {**_attributes(249), "tags": [f"t{i}" for i in range(30)]}
    obj = run("attributes", row(payload, external_id="user-1")).only_object()
    assert len(obj["tags"]) == 30


# ----------------------------------------------------------------------------- identifiers in PAYLOAD
@pytest.mark.parametrize(
    "data_type, base", [("attributes", {"plan": "gold"}), ("events", EVENT), ("purchases", PURCHASE)]
)
def test_external_id_inside_payload_is_always_rejected(run, data_type, base):
    reasons = run(data_type, row({**base, "external_id": "other"}, external_id="user-1")).only_reasons()
    assert reasons == ID_IN_PAYLOAD + "external_id"


def test_all_primary_identifiers_inside_payload_are_named(run):
    payload = {"plan": "gold", "braze_id": "5f0c", "user_alias": {"alias_name": "a", "alias_label": "l"}}
    reasons = run("attributes", row(payload, alias_name="a-1", alias_label="crm")).only_reasons()
    assert reasons == ID_IN_PAYLOAD + "braze_id, user_alias"


def test_email_in_payload_is_an_attribute_next_to_external_id(run):
    # B1.3: with a primary identifier, email/phone are plain attributes set on the profile.
    payload = {"email": "jane@example.com", "phone": "+14155550123", "plan": "gold"}
    obj = run("attributes", row(payload, external_id="user-1")).only_object()
    assert obj == {
        "external_id": "user-1",
        "email": "jane@example.com",
        "phone": "+14155550123",
        "plan": "gold",
        "_update_existing_only": False,
    }


def test_email_in_payload_of_an_email_identified_row_is_rejected(run):
    reasons = run("attributes", row({"email": "other@example.com"}, email="jane@example.com")).only_reasons()
    assert reasons == ID_IN_PAYLOAD + "email"


@pytest.mark.parametrize(
    "data_type, base, key", [("events", EVENT, "email"), ("purchases", PURCHASE, "phone")]
)
def test_email_or_phone_in_event_or_purchase_payload_is_rejected(run, data_type, base, key):
    reasons = run(data_type, row({**base, key: "jane@example.com"}, external_id="user-1")).only_reasons()
    assert reasons == ID_IN_PAYLOAD + key


# ----------------------------------------------------------------------------- events [A2.2][B1.1]
@pytest.mark.parametrize("payload", [{"properties": {"screen": "home"}}, {"name": "   "}, {"name": 7}])
def test_event_without_a_name_is_rejected(run, payload):
    assert run("events", row(payload, external_id="user-1")).only_reasons() == NO_EVENT_NAME


@pytest.mark.parametrize("time, shown", [("yesterday", "'yes***'"), ("2024-13-45T00:00:00Z", "'202***'")])
def test_event_with_unparseable_time_is_rejected(run, time, shown):
    """The value is quoted masked, like an identifier: a wrong field may hold an email."""
    reasons = run("events", row({**EVENT, "time": time}, external_id="user-1")).only_reasons()
    assert reasons == f"event 'time' is not ISO 8601: {shown}"


def test_event_time_that_is_not_a_string_is_rejected(run):
    reasons = run("events", row({**EVENT, "time": 1714564800}, external_id="user-1")).only_reasons()
    assert reasons == "event 'time' is not ISO 8601: a number (***00)"


@pytest.mark.parametrize(
    "time",
    [
        "2024-05-01T12:00:00:000Z",  # Braze's yyyy-MM-dd'T'HH:mm:ss:SSSZ [EVT]
        "2024-05-01T12:00:00:123+0200",
        "2024-05-01T12:00:00.250+02:00",
    ],
)
def test_event_time_in_braze_or_iso_format_is_accepted_and_kept(run, time):
    obj = run("events", row({**EVENT, "time": time}, external_id="user-1")).only_object()
    assert obj["time"] == time


def test_event_with_unknown_top_level_key_is_rejected(run):
    reasons = run("events", row({**EVENT, "colour": "red"}, external_id="user-1")).only_reasons()
    assert reasons.startswith("event PAYLOAD has keys Braze does not take: colour (allowed: ")


@pytest.mark.parametrize("key", ["time", "event_name"])
def test_event_property_with_reserved_name_is_rejected(run, key):
    payload = {**EVENT, "properties": {key: "x"}}
    reasons = run("events", row(payload, external_id="user-1")).only_reasons()
    assert reasons == f"event property name is reserved by Braze: {key!r}"


# ----------------------------------------------------------------------------- purchases [B1.1]
@pytest.mark.parametrize("missing", ["product_id", "currency", "price"])
def test_purchase_without_a_required_key_is_rejected(run, missing):
    payload = {k: v for k, v in PURCHASE.items() if k != missing}
    reasons = run("purchases", row(payload, external_id="user-1")).only_reasons()
    assert reasons == f"purchase PAYLOAD is missing required keys: {missing}"


def test_purchase_missing_every_required_key_names_them_all(run):
    reasons = run("purchases", row({"quantity": 1}, external_id="user-1")).only_reasons()
    assert reasons == "purchase PAYLOAD is missing required keys: product_id, currency, price"


@pytest.mark.parametrize("currency", ["XYZ", "US$", "usd"])
def test_currency_that_is_not_iso_4217_is_rejected(run, currency):
    reasons = run("purchases", row({**PURCHASE, "currency": currency}, external_id="user-1")).only_reasons()
    assert reasons == "purchase 'currency' is not an ISO 4217 currency code: '***'"


@pytest.mark.parametrize("currency", ["EUR", "JPY"])
def test_iso_4217_currencies_are_accepted(run, currency):
    obj = run("purchases", row({**PURCHASE, "currency": currency}, external_id="user-1")).only_object()
    assert obj["currency"] == currency


@pytest.mark.parametrize("quantity, shown", [(0, "0"), (101, "101"), (2.5, "2.5"), (True, "true")])
def test_purchase_quantity_outside_1_to_100_is_rejected(run, quantity, shown):
    reasons = run("purchases", row({**PURCHASE, "quantity": quantity}, external_id="user-1")).only_reasons()
    assert reasons == QUANTITY + shown


@pytest.mark.parametrize("quantity", [1, 100])
def test_purchase_quantity_1_and_100_are_accepted(run, quantity):
    obj = run("purchases", row({**PURCHASE, "quantity": quantity}, external_id="user-1")).only_object()
    assert obj["quantity"] == quantity


@pytest.mark.parametrize(
    "price, shown", [("12.5", "'***'"), (True, "true"), ({"amount": 12.5}, "a JSON object")]
)
def test_non_numeric_price_is_rejected(run, price, shown):
    reasons = run("purchases", row({**PURCHASE, "price": price}, external_id="user-1")).only_reasons()
    assert reasons == f"purchase 'price' must be a number: got {shown}"


@pytest.mark.parametrize("price", [12.5, 3])
def test_numeric_price_is_accepted(run, price):
    obj = run("purchases", row({**PURCHASE, "price": price}, external_id="user-1")).only_object()
    assert obj["price"] == price


def test_purchase_with_unparseable_time_is_rejected(run):
    reasons = run("purchases", row({**PURCHASE, "time": "soon"}, external_id="user-1")).only_reasons()
    assert reasons == "purchase 'time' is not ISO 8601: '***'"


# ----------------------------------------------------------------------------- UPDATED_AT, deletions
@pytest.mark.parametrize(
    "data_type, payload",
    [("attributes", {"plan": "gold"}), ("events", EVENT), ("purchases", PURCHASE), ("deletions", None)],
)
def test_null_updated_at_is_rejected(run_full, data_type, payload):
    synced = run_full(data_type, row(payload, updated_at=None, external_id="user-1"))
    assert synced.only_reasons() == NULL_UPDATED_AT
    assert synced.rejected[0]["updated_at"] is None


@pytest.mark.parametrize("column, value", [("email", "jane@example.com"), ("phone", "+14155550123")])
def test_email_or_phone_in_a_deletion_row_is_rejected(run, column, value):
    reasons = run("deletions", row(**{column: value})).only_reasons()
    assert reasons == DELETE_BY + column.upper()


# ----------------------------------------------------------------------------- several problems
def test_a_row_with_several_problems_gets_every_reason(run):
    synced = run("attributes", row("[1, 2]", updated_at=None))
    assert_reasons(synced.only_reasons(), [NULL_UPDATED_AT, NO_ID, "PAYLOAD must be a JSON object: got list"])
    assert synced.manifest.rejected_reasons == {
        NULL_UPDATED_AT: 1,
        NO_ID: 1,
        "PAYLOAD must be a JSON object": 1,
    }


def test_identifier_size_alias_and_payload_problems_are_all_reported(run):
    payload = {**_attributes(251), "external_id": "other"}
    synced = run("attributes", row(payload, external_id="x" * 988, alias_name="a-1"))
    assert_reasons(
        synced.only_reasons(),
        [
            SEVERAL + "EXTERNAL_ID, ALIAS",
            NAME_NO_LABEL,
            TOO_LONG,
            ID_IN_PAYLOAD + "external_id",
            "PAYLOAD has more than 250 attributes: 252",  # every top-level key counts
        ],
    )
    counted = synced.manifest.rejected_reasons
    assert counted["PAYLOAD has more than 250 attributes"] == 1
    assert counted["EXTERNAL_ID is longer than 987 bytes (EXTERNAL_USER_ID_TOO_LARGE)"] == 1


def test_a_purchase_with_several_field_problems_gets_every_reason(run):
    payload = {"product_id": "sku-tee", "currency": "XYZ", "price": "12.5", "quantity": 0}
    reasons = run("purchases", row(payload, external_id="user-1")).only_reasons()
    assert "currency" in reasons and "price" in reasons and "quantity" in reasons


# ----------------------------------------------------------------------------- Braze objects
@pytest.mark.parametrize(
    "ids, fields",
    [
        ({"external_id": "user-1"}, {"external_id": "user-1"}),
        (
            {"alias_name": "a-1", "alias_label": "crm"},
            {"user_alias": {"alias_name": "a-1", "alias_label": "crm"}},
        ),
        ({"braze_id": "5f0c1b2a9d"}, {"braze_id": "5f0c1b2a9d"}),
        ({"email": "jane@example.com"}, {"email": "jane@example.com"}),
        ({"phone": "+14155550123"}, {"phone": "+14155550123"}),
    ],
)
def test_attributes_object_carries_the_row_identifier(run, ids, fields):
    payload = {"plan": "gold", "score": {"inc": 2}, "dob": None}
    obj = run("attributes", row(payload, **ids)).only_object()
    # No toggle: explicit false, so an alias-only user is created too [B1.1 ATTR].
    assert obj == {**fields, **payload, "_update_existing_only": False}


def test_attributes_object_follows_the_update_existing_only_toggle(run):
    obj = run(
        "attributes", row({"plan": "gold"}, alias_name="a-1", alias_label="crm"), update_existing_only=True
    ).only_object()
    assert obj == {
        "user_alias": {"alias_name": "a-1", "alias_label": "crm"},
        "plan": "gold",
        "_update_existing_only": True,
    }


def test_event_time_defaults_to_updated_at_in_utc_z_form(run_full):
    updated = dt.datetime(2024, 5, 1, 12, 34, 56, 789_123, tzinfo=UTC)
    obj = run_full(
        "events", row({**EVENT, "properties": {"screen": "home"}}, updated_at=updated, external_id="user-1")
    ).only_object()
    assert obj == {
        "external_id": "user-1",
        "name": "app_open",
        "properties": {"screen": "home"},
        "time": "2024-05-01T12:34:56.789Z",
    }


def test_event_time_from_a_timestamptz_column_is_converted_to_utc(run_full):
    updated = dt.datetime(2024, 5, 1, 14, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    obj = run_full(
        "events", row(EVENT, updated_at=updated, external_id="user-1"), updated_at_type="TIMESTAMPTZ"
    ).only_object()
    assert obj["time"] == "2024-05-01T12:00:00.000Z"


def test_event_object_with_update_existing_only(run):
    obj = run("events", row(EVENT, external_id="user-1"), update_existing_only=True).only_object()
    assert obj == {
        "external_id": "user-1",
        "name": "app_open",
        "time": "2024-05-01T12:00:00.000Z",
        "_update_existing_only": True,
    }


def test_purchase_object(run_full):
    payload = {**PURCHASE, "quantity": 2, "properties": {"size": "M"}}
    obj = run_full("purchases", row(payload, alias_name="a-1", alias_label="crm")).only_object()
    assert obj == {
        "user_alias": {"alias_name": "a-1", "alias_label": "crm"},
        **payload,
        "time": "2024-05-01T12:00:00.000Z",
    }


def test_purchase_object_keeps_its_own_time(run):
    payload = {**PURCHASE, "time": "2024-04-30T08:00:00Z"}
    obj = run("purchases", row(payload, braze_id="5f0c1b2a9d")).only_object()
    assert obj == {"braze_id": "5f0c1b2a9d", **payload}


@pytest.mark.parametrize(
    "ids, expected",
    [
        ({"external_id": "user-1"}, ["external_ids", "user-1"]),
        (
            {"alias_name": "a-1", "alias_label": "crm"},
            ["user_aliases", {"alias_name": "a-1", "alias_label": "crm"}],
        ),
        ({"braze_id": "5f0c1b2a9d"}, ["braze_ids", "5f0c1b2a9d"]),
    ],
)
def test_deletion_object_is_key_and_id(run_full, ids, expected):
    synced = run_full("deletions", row(**ids))
    assert synced.only_object() == expected
    assert synced.valid[0]["data_points"] == 0


def test_attribute_data_points_count_attributes_only(run):
    synced = run("attributes", row({"a": 1, "b": 2, "_merge_objects": True}, external_id="user-1"))
    assert synced.valid[0]["data_points"] == 2
    assert synced.manifest.estimated_data_points == 2


# ----------------------------------------------------------------------------- one bad row, nothing lost
def test_bad_rows_do_not_affect_the_rest_of_the_batch(run_full):
    good = [
        row({"plan": f"p{i}"}, updated_at=T0 + dt.timedelta(minutes=i), external_id=f"user-{i}")
        for i in range(12)
    ]
    bad = {  # minute offset (key) -> (row, expected reasons)
        100: (row("{bad", external_id="bad-json"), None),
        101: (row("[1]", external_id="not-object"), "PAYLOAD must be a JSON object: got list"),
        102: (row({"plan": "x"}), NO_ID),
        103: (
            row({"plan": "x"}, external_id="u", email="jane.doe@example.com"),
            SEVERAL + "EXTERNAL_ID, EMAIL",
        ),
        104: (row({"plan": "x"}, alias_name="only-name"), NAME_NO_LABEL),
        105: (row({"plan": "x"}, external_id="y" * 988), TOO_LONG),
        106: (row(_attributes(251), external_id="too-wide"), "PAYLOAD has more than 250 attributes: 251"),
        107: (row({"external_id": "x"}, external_id="id-in-payload"), ID_IN_PAYLOAD + "external_id"),
    }
    rows = []
    for i, r in enumerate(good):
        rows.append(r)
        if 100 + i in bad:  # interleave the bad rows with the good ones
            bad_row, _ = bad[100 + i]
            bad_row["UPDATED_AT"] = T0 + dt.timedelta(minutes=100 + i)
            rows.append(bad_row)
    rows.append(row({"plan": "x"}, updated_at=None, external_id="null-ts"))

    synced = run_full("attributes", *rows)

    assert synced.manifest.valid == 12 and synced.manifest.rejected == len(bad) + 1
    valid = sorted(synced.valid, key=lambda v: v["updated_at"])  # scan order is not promised
    assert [v["object"] for v in valid] == [
        {"external_id": f"user-{i}", "plan": f"p{i}", "_update_existing_only": False} for i in range(12)
    ]
    by_minute = {
        None if r["updated_at"] is None else int((r["updated_at"] - T0).total_seconds() // 60): r
        for r in synced.rejected
    }
    assert by_minute[None]["reasons"] == NULL_UPDATED_AT
    assert by_minute[100]["reasons"].startswith("PAYLOAD is not valid JSON: ")
    for minute, (_, expected) in bad.items():
        if expected is not None:
            assert by_minute[minute]["reasons"] == expected, minute
    # Identifiers are shown masked in the output, never whole.
    shown = " ".join(r["identifier"] for r in synced.valid + synced.rejected)
    shown += json.dumps(synced.manifest.rejected_examples)  # what the asset shows in Dagster
    for secret in ("jane.doe@example.com", "bad-json", "not-object", "id-in-payload", "y" * 988):
        assert secret not in shown


def test_bad_deletion_rows_do_not_affect_the_rest(run_full):
    rows = [
        row(external_id="user-1", updated_at=T0),
        row(email="jane@example.com", updated_at=T0 + dt.timedelta(seconds=1)),
        row(alias_name="a-1", alias_label="crm", updated_at=T0 + dt.timedelta(seconds=2)),
        row(phone="+14155550123", updated_at=T0 + dt.timedelta(seconds=3)),
        row(braze_id="5f0c1b2a9d", updated_at=T0 + dt.timedelta(seconds=4)),
    ]
    synced = run_full("deletions", *rows)
    valid = sorted(synced.valid, key=lambda v: v["updated_at"])
    assert [v["object"] for v in valid] == [
        ["external_ids", "user-1"],
        ["user_aliases", {"alias_name": "a-1", "alias_label": "crm"}],
        ["braze_ids", "5f0c1b2a9d"],
    ]
    assert sorted(r["reasons"] for r in synced.rejected) == [DELETE_BY + "EMAIL", DELETE_BY + "PHONE"]


def test_email_and_phone_together_identify_by_email(run):
    """[A2.1] a row with both EMAIL and PHONE is identified by email; phone rides along [B1.3]."""
    obj = run(
        "attributes", row({"plan": "gold"}, email="jane@example.com", phone="+14155550123")
    ).only_object()
    assert obj["email"] == "jane@example.com" and obj["phone"] == "+14155550123"
    assert "external_id" not in obj


def test_identifiers_are_sent_exactly_as_stored(run):
    """Braze matches external ids exactly: surrounding spaces are kept, not trimmed away."""
    obj = run("events", row({"name": "app_open"}, external_id=" user-1 ")).only_object()
    assert obj["external_id"] == " user-1 "
    reasons = run("events", row({"name": "app_open"}, external_id="   ")).only_reasons()
    assert reasons.startswith("row has no identifier")


def test_batch_hashes_equal_row_hashes_for_every_column_type():
    """The column-wise hash is the row hash: typed identifiers, typed JSON, nulls, file lines."""
    import pyarrow as pa

    table = pa.table(
        {
            # stamps repeated, as a batch's rows share them, and a null between them
            "UPDATED_AT": pa.array(
                [T0, T0.replace(microsecond=120), None, T0, T0.replace(microsecond=120)],
                pa.timestamp("us", tz="UTC"),
            ),
            "EXTERNAL_ID": pa.array([12345, None, 7, 8, 9], pa.int64()),
            "EMAIL": pa.array(["a@b.co", "", None, "c@d.co", None]),
            "PAYLOAD": pa.array(
                [{"b": 1.5, "a": True}, None, {"b": None, "a": False}, None, {"b": 2.0, "a": True}],
                pa.struct([("b", pa.float64()), ("a", pa.bool_())]),
            ),
            "_FILE": ["f.jsonl"] * 5,
            "_LINE": pa.array([1, 2, 3, 4, 5], pa.int32()),
        }
    )
    columns = table.schema.names
    assert batch_hashes(table, columns) == [row_hash(r, columns) for r in table.to_pylist()]


def test_braze_times_are_utc_milliseconds_truncated():
    import pyarrow as pa

    from braze_assets.datatypes import braze_times

    stamps = [
        T0.replace(microsecond=123999),
        T0,
        dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        None,
    ]
    assert braze_times(pa.array(stamps, pa.timestamp("us", tz="UTC"))) == [
        "2024-05-01T12:00:00.123Z",
        "2024-05-01T12:00:00.000Z",
        "1999-12-31T23:59:59.999Z",
        None,
    ]


def test_objects_kept_per_row_hold_their_own_length_only():
    """orjson's own buffer is at least 4 KB per call: kept per row, a batch held 80 MB."""
    import tracemalloc

    from braze_assets.json_bytes import json_bytes

    value = {"external_id": "u-1", "plan": "gold", "points": 7}
    tracemalloc.start()
    try:
        kept = [json_bytes(value) for _ in range(1_000)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept[0] == orjson.dumps(value)
    assert held < 200_000  # 1,000 objects of ~50 bytes; orjson's buffers would hold ~4 MB


@pytest.mark.parametrize(
    ("reason", "key"),
    [
        ("PAYLOAD contains identifier keys (identifiers belong in their own columns): email", None),
        ("invalid-fields: the catalog has no field 'colour'", "invalid-fields"),
        # Braze names the attribute first, quoted: that is the message, not a row's detail
        ("'visits': 'inc' must be a number", "'visits': 'inc' must be a number"),
    ],
)
def test_reasons_are_counted_without_each_rows_detail(reason, key):
    from braze_assets.delta_schema import reason_key

    expected = key or "PAYLOAD contains identifier keys (identifiers belong in their own columns)"
    assert reason_key(reason) == expected
