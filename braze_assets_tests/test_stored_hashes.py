"""The hashes the state keeps never change: a row's identity (the ledger), a user's key and a
PAYLOAD's hash (the remembered attributes) and an identifier's lookup hash (the sync log).

Each is written by one run and compared by every later one, so a change of format, however
small, would make every settled row new again (sent twice) and every remembered user unknown
(billed again), silently. The values below were computed once and are compared byte for byte;
the column-wise functions the delta uses must also agree with the per-row definitions."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from braze_assets.attribute_diff import (
    column_payload_hashes,
    column_user_keys,
    payload_hash,
    payload_hashes,
    user_key,
)
from braze_assets.lookup import column_lookup_hashes, row_lookup_hashes
from braze_assets.row_identity import batch_hashes

KEY = b"0123456789abcdef"
STAMPS = [
    dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
    dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
    None,
]
BATCH = pa.table(
    {
        "UPDATED_AT": pa.array(STAMPS, pa.timestamp("us", tz="UTC")),
        "EXTERNAL_ID": pa.array(["user-1", None, "Zoë"], pa.string()),
        "EMAIL": pa.array([None, "a@b.example", "z@b.example"], pa.string()),
        "PAYLOAD": pa.array(['{"plan":"pro","points":3}', '{"city":"Lyon"}', None], pa.string()),
    }
)
IDS = {"EXTERNAL_ID": BATCH["EXTERNAL_ID"].combine_chunks(), "EMAIL": BATCH["EMAIL"].combine_chunks()}


def test_row_identity_is_stable():
    assert batch_hashes(BATCH, ["UPDATED_AT", "EXTERNAL_ID", "EMAIL", "PAYLOAD"]) == [
        "55c3e6ef1b6ec78035ca322bde37a6a4",
        "087ebef4c932436330fad310848b65a9",
        "c09c89d42786a36288fa319400038e05",
    ]


def test_user_keys_are_stable_and_match_the_per_row_definition():
    keys = column_user_keys(IDS, 3)
    assert keys == [
        "62d1d71b74f07aa5cbd73a9189496201",
        "4e7ec7dd2e47ed3d5b970a886da14466",
        "1d0aaa317c46634440ab7306e1235314",
    ]
    rows = BATCH.select(["EXTERNAL_ID", "EMAIL"]).to_pylist()
    assert keys == [user_key({k: v for k, v in row.items() if v is not None}) for row in rows]


def test_user_keys_are_the_same_with_identifier_columns_that_hold_nothing():
    """A table's other identifier columns, all null (most tables use one kind), are no part of
    any row's key: the keys are those of the columns that hold values."""
    empty = pa.nulls(3, pa.string())
    with_empty = {**IDS, "BRAZE_ID": empty, "PHONE": empty, "ALIAS_NAME": empty, "ALIAS_LABEL": empty}
    assert column_user_keys(with_empty, 3) == column_user_keys(IDS, 3)
    assert column_user_keys({"EXTERNAL_ID": empty, "EMAIL": [None, None, None]}, 3) == column_user_keys({}, 3)


def test_payload_hashes_are_stable_in_every_form():
    expected = ["5206b1d92f1945fd6c78b7e488394715", "4bde225db944294a932d1ccc6a281f10", None]
    texts = BATCH["PAYLOAD"].to_pylist()
    assert column_payload_hashes(BATCH["PAYLOAD"]) == expected
    assert payload_hashes(texts) == expected
    assert [payload_hash(t) for t in texts] == expected
    assert payload_hashes([t.encode() if t else None for t in texts]) == expected  # bytes as stored


def test_lookup_hashes_are_stable_from_lists_and_arrow():
    expected = [
        "696c2f319260cc51d3555b92150131c6",
        "54a853237fff9763607b562d41b4fda3",
        "945ef380907867af613496110ba476b4 aca9dedd0bbf249f989fec7d4c99d370",
    ]
    assert column_lookup_hashes(IDS, 3, KEY) == expected
    assert column_lookup_hashes({k: v.to_pylist() for k, v in IDS.items()}, 3, KEY) == expected
    rows = BATCH.select(["EXTERNAL_ID", "EMAIL"]).to_pylist()
    assert [row_lookup_hashes(row, KEY) for row in rows] == expected
