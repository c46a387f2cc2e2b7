"""Compute a sync's delta: the rows in a time window not yet settled, validated and split.

Streams the window out of the warehouse in Arrow batches; per batch it hashes each row, drops the rows
the ledger already settled, validates the rest with the data type's pandera schema and writes valid
rows (as ready-to-send Braze objects) and rejected rows (with their reasons) to Parquet. Memory stays
bounded by the batch size whatever the size of the delta.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from braze_assets.datatypes import (
    IDENTIFIER_COLUMNS, DataTypeSpec, build_object, row_identifiers, validate_rows,
)
from braze_assets.masking import mask_identifiers
from braze_assets.sources.base import CdiSource
from braze_assets.state import StateStore

VALID_SCHEMA = pa.schema(
    [
        ("row_hash", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("identifier", pa.string()),  # masked, for display
        ("object", pa.binary()),  # the Braze object (or [key, id] for deletions), JSON
        ("data_points", pa.int32()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("row_hash", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("identifier", pa.string()),
        ("reasons", pa.string()),
        ("location", pa.string()),  # file:line for file sources
        ("payload_excerpt", pa.string()),
    ]
)
#: Columns file sources add to every row: where it came from (part of the row's identity).
LOCATION_COLUMNS = ("_FILE", "_LINE")
EXAMPLES_KEPT = 5


@dataclass
class DeltaManifest:
    """What `<sync>_delta` materialized: where the rows are and what was found on the way."""

    sync: str
    data_type: str
    run_id: str
    window_start: str | None
    window_end: str
    reaches_now: bool
    valid_path: str
    rejected_path: str
    rows_read: int = 0
    already_settled: int = 0
    valid: int = 0
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    rejected_examples: list[dict[str, str]] = field(default_factory=list)
    future_rows: int = 0
    future_examples: list[dict[str, str]] = field(default_factory=list)
    late_outside_lookback: int = 0
    #: parts of the source that could not be read at all (files over 512 MB, unknown formats)
    unreadable: list[str] = field(default_factory=list)
    #: parts (files) read in full by this delta, with their version, and those skipped as settled
    parts: dict[str, str] = field(default_factory=dict)
    parts_skipped: int = 0
    max_updated_at: str | None = None
    estimated_data_points: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_hash(row: dict[str, Any], columns: list[str]) -> str:
    """Stable identity of a CDI row: identifier columns, UPDATED_AT and PAYLOAD (DESIGN §3)."""
    parts = []
    for column in columns:
        value = row.get(column)
        if column == "UPDATED_AT" and value is not None:
            value = value.astimezone(dt.timezone.utc).isoformat()
        elif isinstance(value, (dict, list)):
            value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        parts.append(f"{column}={'' if value is None else value}")
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


def reason_key(reason: str) -> str:
    """Group reasons for counting: row-specific detail always follows the first ': '."""
    return reason.split(": ")[0]


class DeltaWriter:
    """Validates batches and appends them to the valid/rejected Parquet files."""

    def __init__(self, manifest: DeltaManifest, spec: DataTypeSpec, update_existing_only: bool):
        self.manifest, self.spec = manifest, spec
        self.update_existing_only = update_existing_only
        self._valid = pq.ParquetWriter(manifest.valid_path, VALID_SCHEMA)
        self._rejected = pq.ParquetWriter(manifest.rejected_path, REJECTED_SCHEMA)
        self._reasons: Counter[str] = Counter()

    def add(self, rows: list[dict[str, Any]], hashes: list[str]) -> None:
        checked = validate_rows(rows, self.spec)
        failures, payloads, identifiers = checked.failures, checked.payloads, checked.identifiers
        valid: dict[str, list] = {name: [] for name in VALID_SCHEMA.names}
        rejected: dict[str, list] = {name: [] for name in REJECTED_SCHEMA.names}
        for i, row in enumerate(rows):
            shown = mask_identifiers(identifiers[i])
            if i in failures:
                reasons = "; ".join(dict.fromkeys(failures[i]))
                location = f"{row['_FILE']}:{row['_LINE']}" if row.get("_FILE") else ""
                raw = row.get("PAYLOAD")
                excerpt = raw if isinstance(raw, str) else orjson.dumps(raw).decode() if raw else ""
                if location and not identifiers[i]:
                    excerpt = ""  # an unparseable line may hold identifiers we cannot mask
                for values, value in zip(rejected.values(), (
                    hashes[i], row.get("UPDATED_AT"), shown, reasons, location, excerpt[:200],
                )):
                    values.append(value)
                self._reasons.update(reason_key(r) for r in dict.fromkeys(failures[i]))
                if len(self.manifest.rejected_examples) < EXAMPLES_KEPT:
                    example = {"row_hash": hashes[i], "identifier": shown, "reasons": reasons}
                    if location:
                        example["location"] = location
                    self.manifest.rejected_examples.append(example)
                continue
            obj = build_object(self.spec, identifiers[i], payloads[i], row["UPDATED_AT"],
                               self.update_existing_only)
            for values, value in zip(valid.values(), (
                hashes[i], row["UPDATED_AT"], shown, orjson.dumps(obj),
                checked.data_points[i],
            )):
                values.append(value)
        self._valid.write_table(pa.table(valid, schema=VALID_SCHEMA))
        self._rejected.write_table(pa.table(rejected, schema=REJECTED_SCHEMA))
        self.manifest.valid += len(valid["row_hash"])
        self.manifest.rejected += len(rejected["row_hash"])
        self.manifest.estimated_data_points += sum(valid["data_points"])

    def close(self) -> None:
        self._valid.close()
        self._rejected.close()
        self.manifest.rejected_reasons = dict(self._reasons.most_common())


def compute_delta(
    *,
    source: CdiSource,
    spec: DataTypeSpec,
    store: StateStore,
    manifest: DeltaManifest,
    window_start: dt.datetime | None,
    window_end: dt.datetime,
    now: dt.datetime,
    partitions_start: dt.datetime,
    update_existing_only: bool,
    batch_rows: int = 20_000,
    progress: Callable[[str], None] = lambda _: None,
) -> DeltaManifest:
    """Fill `manifest` (and its Parquet files) with the delta of [window_start, min(end, now))."""
    columns = source.check_shape(spec)
    hash_columns = [c for c in columns if c in IDENTIFIER_COLUMNS or c in ("UPDATED_AT", "PAYLOAD")]
    Path(manifest.valid_path).parent.mkdir(parents=True, exist_ok=True)
    scan_end = min(window_end, now)
    manifest.parts_skipped = source.skip_parts(store.settled_parts())
    manifest.parts = source.parts(window_start, scan_end)
    writer = DeltaWriter(manifest, spec, update_existing_only)
    newest: dt.datetime | None = None
    try:
        with store.connect() as ledger:
            for batch in source.scan(window_start, scan_end, manifest.reaches_now, batch_rows,
                                     columns=columns):
                rows = batch.to_pylist()
                located = [c for c in LOCATION_COLUMNS if c in batch.schema.names]
                hashes = [row_hash(row, hash_columns + located) for row in rows]
                known = store.known_hashes(ledger, hashes)
                manifest.rows_read += len(rows)
                manifest.already_settled += len(known)
                fresh = [(r, h) for r, h in zip(rows, hashes) if h not in known]
                if fresh:
                    writer.add([r for r, _ in fresh], [h for _, h in fresh])
                stamps = [r["UPDATED_AT"] for r in rows if r["UPDATED_AT"] is not None]
                if stamps:
                    newest = max([newest, *stamps] if newest else stamps)
                progress(f"read {manifest.rows_read:,} rows; {manifest.valid:,} to send, "
                         f"{manifest.rejected:,} rejected, {manifest.already_settled:,} already settled")
    finally:
        writer.close()
    manifest.max_updated_at = newest.isoformat() if newest else None
    manifest.unreadable = source.unreadable(window_start, scan_end)
    if manifest.reaches_now:
        _report_future_rows(source, manifest, now)
        if window_start is not None and window_start > partitions_start and source.cheap_counts:
            # Rows below the window that the ledger never settled arrived too late to be seen.
            unsettled = source.count(partitions_start, window_start) - store.settled_count(
                partitions_start, window_start)
            manifest.late_outside_lookback = max(0, unsettled)
    return manifest


def _report_future_rows(source: CdiSource, manifest: DeltaManifest, now: dt.datetime) -> None:
    """Rows stamped after `now` are held back (CDI would jump its watermark past them)."""
    manifest.future_rows = source.count(now, None)
    if not manifest.future_rows:
        return
    for batch in source.scan(now, None, False, EXAMPLES_KEPT):
        for row in batch.to_pylist()[:EXAMPLES_KEPT]:
            manifest.future_examples.append({
                "identifier": mask_identifiers(row_identifiers(row)),
                "updated_at": row["UPDATED_AT"].isoformat(),
                "reason": "UPDATED_AT is in the future; held until then so the watermark never "
                          "passes now",
            })
        break
