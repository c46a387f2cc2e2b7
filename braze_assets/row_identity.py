"""A CDI row's identity: a hash of its identifier columns, UPDATED_AT and PAYLOAD.

The ledger settles each row by this hash, so the same row read again (a lookback, a retried run,
a backfill) is recognised and never sent twice, and a row whose PAYLOAD or stamp changed is a new
row. The text hashed is fixed: every ledger already holds hashes in this form. `batch_hashes`
builds the text column-wise for a whole batch and must stay equal to `row_hash` row by row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from braze_assets.digests import hex_digests

#: Columns file sources add to every row: where it came from (part of the row's identity).
LOCATION_COLUMNS = ("_FILE", "_LINE")


def row_hash(row: dict[str, Any], columns: list[str]) -> str:
    """Stable identity of a CDI row: identifier columns, UPDATED_AT and PAYLOAD
    (docs/architecture.md, Delivery guarantees)."""
    parts = []
    for column in columns:
        value = row.get(column)
        if column == "UPDATED_AT" and value is not None:
            value = value.astimezone(dt.UTC).isoformat()
        elif isinstance(value, (dict, list)):
            value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        parts.append(f"{column}={'' if value is None else value}")
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


def _hash_text(column: str, values: pa.Array) -> pa.Array:
    """`row_hash`'s `COLUMN=value` text for a whole column (string, integer and timestamp columns
    column-wise; anything else through Python, exactly as `row_hash` formats it)."""
    if column == "UPDATED_AT":
        # A batch's rows share few stamps (a restamped snapshot's, one): each is written once.
        stamps = pc.dictionary_encode(values)
        text = _stamp_text(stamps.dictionary).take(stamps.indices)
    elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        text = values
    elif pa.types.is_integer(values.type):
        text = values.cast(pa.string())
    else:
        text = pa.array([_python_text(v) for v in values.to_pylist()], pa.string())
    return pc.binary_join_element_wise(f"{column}=", pc.fill_null(text, ""), "")


def _stamp_text(stamps: pa.Array) -> pa.Array:
    """`row_hash`'s text of timestamps: "YYYY-MM-DD HH:MM:SS.ffffff" (UTC) -> isoformat(): "T",
    no zero micros, "+00:00"."""
    text = stamps.cast(pa.timestamp("us", tz="UTC")).cast(pa.timestamp("us")).cast(pa.string())
    text = pc.replace_substring(text, " ", "T", max_replacements=1)
    text = pc.replace_substring_regex(text, r"\.000000$", "")
    return pc.binary_join_element_wise(text, "+00:00", "")


def _python_text(value: Any) -> str | None:
    if isinstance(value, (dict, list)):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return None if value is None else str(value)


def batch_hashes(batch: pa.RecordBatch | pa.Table, columns: list[str]) -> list[str]:
    """`row_hash` of every row of a batch, the row text built column-wise."""
    parts = []
    for column in columns:
        values = batch.column(column)
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        parts.append(_hash_text(column, values))
    joined = pc.binary_join_element_wise(*parts, "\x1f").cast(pa.binary()).to_pylist()
    return hex_digests(hashlib.blake2b(digest_size=16), joined)


def located_batch_hashes(batch: pa.RecordBatch | pa.Table, columns: Sequence[str]) -> list[str]:
    """`batch_hashes` over a delta's identity `columns` and, for file sources, where each row
    was read (`LOCATION_COLUMNS`, present only in their batches)."""
    located = [c for c in LOCATION_COLUMNS if c in batch.schema.names]
    return batch_hashes(batch, [*columns, *located])
