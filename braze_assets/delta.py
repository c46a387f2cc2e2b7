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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from braze_assets.attribute_diff import AttributeDiff, Remembered, Trimmed, column_user_keys, payload_hash
from braze_assets.catalog_items import check_catalog_rows
from braze_assets.datatypes import (
    IDENTIFIER_COLUMNS,
    CheckedRows,
    DataTypeSpec,
    RowBatch,
    build_objects,
    row_identifiers,
    validate_batch,
)
from braze_assets.delta_files import staged
from braze_assets.lookup import column_lookup_hashes, row_lookup_hashes
from braze_assets.masking import mask_identifier_columns, mask_identifiers, mask_payload
from braze_assets.sources.base import CdiSource
from braze_assets.state import StateStore

VALID_SCHEMA = pa.schema(
    [
        ("row_hash", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("identifier", pa.string()),  # masked, for display
        ("identifier_hash", pa.string()),  # lookup hashes, to find a user's rows (lookup.py)
        ("object", pa.binary()),  # the Braze object (or [key, id] for deletions), JSON
        ("data_points", pa.int32()),  # attributes (events, purchases: 1) sent
        # attributes syncs sending only what changed (attribute_diff.py); null otherwise:
        ("user_key", pa.string()),
        ("payload_hash", pa.string()),
        ("remember", pa.string()),  # what Braze holds of the user once it accepts this row
        ("payload_attributes", pa.int32()),
        ("data_points_saved", pa.int32()),  # attributes left out: unchanged since last accepted
    ]
)
#: The valid file's columns of the attribute diff (attribute_diff.py), null for other rows.
DIFF_COLUMNS = ("user_key", "payload_hash", "remember", "payload_attributes", "data_points_saved")


def no_diff_columns(rows: int) -> dict[str, pa.Array]:
    """The attribute-diff columns of rows sent whole: nulls."""
    return {name: pa.nulls(rows, VALID_SCHEMA.field(name).type) for name in DIFF_COLUMNS}


#: Rows whose attributes all match what Braze last accepted: settled as `unchanged`, never sent.
UNCHANGED_SCHEMA = pa.schema(
    [
        ("row_hash", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("identifier", pa.string()),
        ("identifier_hash", pa.string()),
        ("data_points_saved", pa.int32()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("row_hash", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("identifier", pa.string()),
        ("identifier_hash", pa.string()),
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
    #: rows with UPDATED_AT before the sync's partitions_start: never read, so counted here
    before_partitions_start: int = 0
    #: rows that failed in a way validation did not foresee (rejected, never sent)
    rows_unprocessable: int = 0
    #: rows that were exact copies of another row of the delta (sent, or rejected, once)
    duplicate_rows: int = 0
    #: parts of the source that could not be read at all (files over 512 MB, unknown formats)
    unreadable: list[str] = field(default_factory=list)
    #: parts (files) read in full by this delta, with their version, and those skipped as settled
    parts: dict[str, str] = field(default_factory=dict)
    parts_skipped: int = 0
    max_updated_at: str | None = None
    #: data points the valid rows cost (attributes syncs: only the attributes that changed)
    estimated_data_points: int = 0
    #: attributes syncs sending only what changed: where the unchanged rows are, how many, and
    #: the data points they and the trimmed rows save
    unchanged_path: str | None = None
    unchanged: int = 0
    data_points_saved: int = 0
    #: when the scan began: rows settled from then on by another run are checked again at delivery
    computed_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        # "YYYY-MM-DD HH:MM:SS.ffffff" (UTC) -> isoformat(): "T", no zero micros, "+00:00"
        text = values.cast(pa.timestamp("us", tz="UTC")).cast(pa.timestamp("us")).cast(pa.string())
        text = pc.replace_substring(text, " ", "T", max_replacements=1)
        text = pc.replace_substring_regex(text, r"\.000000$", "")
        text = pc.binary_join_element_wise(text, "+00:00", "")
    elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        text = values
    elif pa.types.is_integer(values.type):
        text = values.cast(pa.string())
    else:
        text = pa.array([_python_text(v) for v in values.to_pylist()], pa.string())
    return pc.binary_join_element_wise(f"{column}=", pc.fill_null(text, ""), "")


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
    blake2b = hashlib.blake2b
    return [blake2b(text, digest_size=16).hexdigest() for text in joined]


def reason_key(reason: str) -> str:
    """Group reasons for counting: row-specific detail always follows the first ': '."""
    return reason.split(": ")[0]


@dataclass
class _Prepared:
    """One batch's contribution, computed in full before anything is written: a failure while
    preparing leaves no trace, so the batch can be taken apart row by row."""

    valid: pa.Table | None = None
    rejected: pa.Table | None = None
    unchanged: pa.Table | None = None
    data_points: int = 0
    data_points_saved: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)


class DeltaWriter:
    """Validates batches and appends them to the valid/rejected Parquet files.

    No row can stop the others: a batch that fails to process for a reason validation did not
    foresee is processed again row by row, and a row that still fails is rejected with a reason
    naming the failure (counted in `rows_unprocessable`), so every row read ends valid or rejected.
    """

    def __init__(
        self,
        manifest: DeltaManifest,
        spec: DataTypeSpec,
        update_existing_only: bool,
        paths: tuple[str, ...] | None = None,
        diff: AttributeDiff | None = None,
        remembered: Callable[[list[str]], dict[str, Remembered]] | None = None,
    ):
        """`paths`: the local (valid, rejected[, unchanged]) files to write, when not the
        manifest's own. `diff` (with `remembered`, the state's lookup): send only what changed."""
        self.manifest, self.spec = manifest, spec
        self.update_existing_only = update_existing_only
        own = (manifest.valid_path, manifest.rejected_path, manifest.unchanged_path)
        valid_path, rejected_path, *unchanged_path = paths or tuple(p for p in own if p)
        self._valid = pq.ParquetWriter(valid_path, VALID_SCHEMA)
        self._rejected = pq.ParquetWriter(rejected_path, REJECTED_SCHEMA)
        self.diff = diff
        self._remembered = remembered or (lambda keys: {})
        self._unchanged = pq.ParquetWriter(unchanged_path[0], UNCHANGED_SCHEMA) if diff else None
        self._reasons: Counter[str] = Counter()

    def add(self, rows: pa.RecordBatch | pa.Table, hashes: list[str]) -> None:
        """Validate scanned rows not yet settled (`hashes`: their `row_hash`) and append them."""
        try:
            prepared = self._prepare(rows, hashes)
        except Exception as exc:  # noqa: BLE001 - any failure is one row's: find it, set it aside
            if rows.num_rows > 1:
                for i in range(rows.num_rows):
                    self.add(rows.slice(i, 1), hashes[i : i + 1])
                return
            prepared = self._unprocessable(rows, hashes, exc)
        self._commit(prepared)

    def _prepare(self, rows: pa.RecordBatch | pa.Table, hashes: list[str]) -> _Prepared:
        if self.spec.name == "catalogs":
            return self._prepare_items(rows, hashes)
        batch = RowBatch.from_arrow(rows)
        prepared = _Prepared()
        keys: list[str] = []
        payload_hashes: list[str | None] = []
        before: dict[str, Remembered] = {}
        if self.diff is not None:
            keys = column_user_keys(batch.columns, batch.num_rows)
            payload_hashes = [payload_hash(raw) for raw in batch.payload or [None] * batch.num_rows]
            before = self._remembered(sorted(set(keys)))
            # The fast path: a PAYLOAD exactly as Braze last accepted it is not even validated.
            same = [
                i
                for i, (key, digest) in enumerate(zip(keys, payload_hashes, strict=True))
                if digest is not None and key in before and before[key].payload_hash == digest
            ]
            if same:
                saved = [before[keys[i]].payload_attributes for i in same]
                self._set_aside_unchanged(batch, hashes, same, saved, prepared)
                set_aside = set(same)
                others = [i for i in range(batch.num_rows) if i not in set_aside]
                batch, rows = batch.take(others), rows.take(pa.array(others, pa.int64()))
                hashes = [hashes[i] for i in others]
                keys = [keys[i] for i in others]
                payload_hashes = [payload_hashes[i] for i in others]
        checked = validate_batch(batch, self.spec)
        valid = [i for i in range(batch.num_rows) if i not in checked.failures]
        diffed: dict[int, Trimmed] = {}
        if valid and self.diff is not None:
            for i in valid:
                payload = checked.payloads[i]
                if payload is not None:
                    diffed[i] = trimmed = self.diff.trim(payload, before.get(keys[i]))
                    checked.payloads[i] = trimmed.payload
            unchanged = [i for i in valid if i in diffed and diffed[i].unchanged]
            if unchanged:
                saved = [diffed[i].saved for i in unchanged]
                self._set_aside_unchanged(batch, hashes, unchanged, saved, prepared)
                set_aside = set(unchanged)
                valid = [i for i in valid if i not in set_aside]
        if valid:
            objects = build_objects(checked, self.spec, valid, self.update_existing_only)
            if any(o is None for o in objects):  # rows too deep to serialize: now in failures
                objects = [o for o in objects if o is not None]
                valid = [i for i in valid if i not in checked.failures]
            shown = mask_identifier_columns(batch.columns, batch.num_rows)
            hashed = column_lookup_hashes(batch.columns, batch.num_rows)
            if diffed:
                points = np.array([diffed[i].sent for i in valid], dtype=np.int64)
                kept = np.array([diffed[i].saved for i in valid], dtype=np.int64)
                whole = [diffed[i].sent + diffed[i].saved for i in valid]
                diff_columns = {
                    "user_key": pa.array([keys[i] for i in valid], pa.string()),
                    "payload_hash": pa.array([payload_hashes[i] for i in valid], pa.string()),
                    "remember": pa.array([diffed[i].remember for i in valid], pa.string()),
                    "payload_attributes": pa.array(whole, pa.int32()),
                    "data_points_saved": pa.array(kept, pa.int32()),
                }
                prepared.data_points_saved += int(kept.sum())
            else:
                points = checked.data_points[valid]
                diff_columns = no_diff_columns(len(valid))
            prepared.valid = pa.table(
                {
                    "row_hash": pa.array([hashes[i] for i in valid], pa.string()),
                    "updated_at": batch.updated_at.take(pa.array(valid, pa.int64())),
                    "identifier": pa.array([shown[i] for i in valid], pa.string()),
                    "identifier_hash": pa.array([hashed[i] for i in valid], pa.string()),
                    "object": pa.array(objects, pa.binary()),
                    "data_points": pa.array(points, pa.int32()),
                    **diff_columns,
                },
                schema=VALID_SCHEMA,
            )
            prepared.data_points = int(points.sum())
        if checked.failures:
            self._prepare_rejected(rows, checked, hashes, prepared)
        return prepared

    def _prepare_items(self, rows: pa.RecordBatch | pa.Table, hashes: list[str]) -> _Prepared:
        """Catalog rows (`catalog_items.py`): items by id, never user identifiers."""
        checked = check_catalog_rows(rows)
        prepared = _Prepared()
        stamps = rows.column("UPDATED_AT").cast(pa.timestamp("us", tz="UTC"))
        shown = [f"ID={item_id}" if item_id else "(no id)" for item_id in checked.ids]
        valid = sorted(checked.objects)
        if valid:
            take = pa.array(valid, pa.int64())
            prepared.valid = pa.table(
                {
                    "row_hash": pa.array([hashes[i] for i in valid], pa.string()),
                    "updated_at": stamps.take(take),
                    "identifier": pa.array([shown[i] for i in valid], pa.string()),
                    "identifier_hash": pa.nulls(len(valid), pa.string()),
                    "object": pa.array([checked.objects[i] for i in valid], pa.binary()),
                    "data_points": pa.array([0] * len(valid), pa.int32()),  # catalogs bill none
                    **no_diff_columns(len(valid)),
                },
                schema=VALID_SCHEMA,
            )
        if checked.failures:
            names = rows.schema.names
            payloads = rows.column("PAYLOAD").to_pylist() if "PAYLOAD" in names else [None] * rows.num_rows
            located = "_FILE" in names
            files = rows.column("_FILE").to_pylist() if located else []
            lines = rows.column("_LINE").to_pylist() if located else []
            failed = sorted(checked.failures)
            reasons = ["; ".join(dict.fromkeys(checked.failures[i])) for i in failed]
            prepared.rejected = pa.table(
                {
                    "row_hash": pa.array([hashes[i] for i in failed], pa.string()),
                    "updated_at": stamps.take(pa.array(failed, pa.int64())),
                    "identifier": pa.array([shown[i] for i in failed], pa.string()),
                    "identifier_hash": pa.nulls(len(failed), pa.string()),
                    "reasons": pa.array(reasons, pa.string()),
                    "location": pa.array(
                        [f"{files[i]}:{lines[i]}" if located else "" for i in failed], pa.string()
                    ),
                    "payload_excerpt": pa.array([mask_payload(payloads[i]) for i in failed], pa.string()),
                },
                schema=REJECTED_SCHEMA,
            )
            for i, reason in zip(failed, reasons, strict=True):
                prepared.reasons.update(reason_key(r) for r in dict.fromkeys(checked.failures[i]))
                prepared.examples.append({"row_hash": hashes[i], "identifier": shown[i], "reasons": reason})
        return prepared

    def _set_aside_unchanged(
        self, batch: RowBatch, hashes: list[str], positions: list[int], saved: list[int], prepared: _Prepared
    ) -> None:
        """Rows with nothing Braze does not already hold: settled as `unchanged`, never sent."""
        shown = mask_identifier_columns(batch.columns, batch.num_rows)
        hashed = column_lookup_hashes(batch.columns, batch.num_rows)
        table = pa.table(
            {
                "row_hash": pa.array([hashes[i] for i in positions], pa.string()),
                "updated_at": batch.updated_at.take(pa.array(positions, pa.int64())),
                "identifier": pa.array([shown[i] for i in positions], pa.string()),
                "identifier_hash": pa.array([hashed[i] for i in positions], pa.string()),
                "data_points_saved": pa.array(saved, pa.int32()),
            },
            schema=UNCHANGED_SCHEMA,
        )
        prepared.unchanged = (
            table if prepared.unchanged is None else pa.concat_tables([prepared.unchanged, table])
        )
        prepared.data_points_saved += sum(saved)

    def _prepare_rejected(
        self, rows: pa.RecordBatch | pa.Table, checked: CheckedRows, hashes: list[str], prepared: _Prepared
    ) -> None:
        failures = checked.failures
        names = rows.schema.names
        picked = pa.array(sorted(failures), pa.int64())
        column = {
            name: rows.column(name).take(picked).to_pylist() if name in names else [None] * len(picked)
            for name in ("UPDATED_AT", "PAYLOAD", "_FILE", "_LINE")
        }
        rejected: dict[str, list[Any]] = {name: [] for name in REJECTED_SCHEMA.names}
        for n, i in enumerate(sorted(failures)):
            identifiers = checked.identifiers(i)
            shown = mask_identifiers(identifiers)
            reasons = "; ".join(dict.fromkeys(failures[i]))
            location = f"{column['_FILE'][n]}:{column['_LINE'][n]}" if column["_FILE"][n] else ""
            excerpt = mask_payload(column["PAYLOAD"][n])
            for values, value in zip(
                rejected.values(),
                (
                    hashes[i],
                    column["UPDATED_AT"][n],
                    shown,
                    row_lookup_hashes(identifiers),
                    reasons,
                    location,
                    excerpt,
                ),
                strict=True,
            ):
                values.append(value)
            prepared.reasons.update(reason_key(r) for r in dict.fromkeys(failures[i]))
            example = {"row_hash": hashes[i], "identifier": shown, "reasons": reasons}
            if location:
                example["location"] = location
            prepared.examples.append(example)
        prepared.rejected = pa.table(rejected, schema=REJECTED_SCHEMA)

    def _unprocessable(self, rows: pa.RecordBatch | pa.Table, hashes: list[str], exc: Exception) -> _Prepared:
        """One row that could not be processed at all: rejected with the failure's kind (never
        its text, which may quote the row's values)."""
        reason = f"row could not be processed ({type(exc).__name__}); set aside so the other rows go on"
        stamps = rows.column("UPDATED_AT")
        try:
            stamp = stamps.cast(pa.timestamp("us", tz="UTC"))[0].as_py()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, IndexError):
            stamp = None
        names = rows.schema.names
        location = (
            f"{rows.column('_FILE')[0].as_py()}:{rows.column('_LINE')[0].as_py()}" if "_FILE" in names else ""
        )
        self.manifest.rows_unprocessable += 1
        return _Prepared(
            rejected=pa.table(
                {
                    "row_hash": [hashes[0]],
                    "updated_at": [stamp],
                    "identifier": ["(not shown)"],
                    "identifier_hash": [None],
                    "reasons": [reason],
                    "location": [location],
                    "payload_excerpt": [""],
                },
                schema=REJECTED_SCHEMA,
            ),
            reasons=Counter({reason_key(reason): 1}),
            examples=[{"row_hash": hashes[0], "identifier": "(not shown)", "reasons": reason}],
        )

    def _commit(self, prepared: _Prepared) -> None:
        manifest = self.manifest
        if prepared.unchanged is not None and prepared.unchanged.num_rows and self._unchanged is not None:
            self._unchanged.write_table(prepared.unchanged)
            manifest.unchanged += prepared.unchanged.num_rows
        manifest.data_points_saved += prepared.data_points_saved
        if prepared.valid is not None and prepared.valid.num_rows:
            self._valid.write_table(prepared.valid)
            manifest.valid += prepared.valid.num_rows
            manifest.estimated_data_points += prepared.data_points
        if prepared.rejected is not None and prepared.rejected.num_rows:
            self._rejected.write_table(prepared.rejected)
            manifest.rejected += prepared.rejected.num_rows
            self._reasons.update(prepared.reasons)
            room = EXAMPLES_KEPT - len(manifest.rejected_examples)
            manifest.rejected_examples += prepared.examples[: max(room, 0)]

    def close(self) -> None:
        self._valid.close()
        self._rejected.close()
        if self._unchanged is not None:
            self._unchanged.close()
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
    diff: AttributeDiff | None = None,
    batch_rows: int = 20_000,
    progress: Callable[[str], None] = lambda _: None,
) -> DeltaManifest:
    """Fill `manifest` (and its Parquet files) with the delta of [window_start, min(end, now)).
    With `diff` (attributes syncs sending only what changed) rows with nothing new for Braze go to
    `manifest.unchanged_path`, which must be set.

    The files are written on local disk, and copied whole to an object store when the manifest's
    paths are URIs there (`delta_files.staged`)."""
    columns = source.check_shape(spec)
    scan_end = min(window_end, now)
    if diff is not None and not manifest.unchanged_path:
        raise ValueError("an attributes diff needs the manifest's unchanged_path")
    uris = [manifest.valid_path, manifest.rejected_path] + ([manifest.unchanged_path or ""] if diff else [])
    with staged(*uris) as paths:
        newest = _write_delta(
            source=source,
            spec=spec,
            store=store,
            manifest=manifest,
            paths=paths,
            columns=columns,
            window_start=window_start,
            scan_end=scan_end,
            update_existing_only=update_existing_only,
            diff=diff,
            batch_rows=batch_rows,
            progress=progress,
        )
    manifest.max_updated_at = newest.isoformat() if newest else None
    manifest.unreadable = source.unreadable(window_start, scan_end)
    if manifest.reaches_now:
        _report_future_rows(source, manifest, now)
        if window_start is not None and window_start > partitions_start and source.cheap_counts:
            # Rows below the window that the ledger never settled arrived too late to be seen.
            unsettled = source.count(partitions_start, window_start) - store.settled_count(
                partitions_start, window_start
            )
            manifest.late_outside_lookback = max(0, unsettled)
        if source.cheap_counts and (window_start is None or window_start >= partitions_start):
            # Older than any partition: no run or backfill reads them, so say how many there are.
            manifest.before_partitions_start = max(
                0, source.count(None, partitions_start) - store.settled_count(None, partitions_start)
            )
    return manifest


def _write_delta(
    *,
    source: CdiSource,
    spec: DataTypeSpec,
    store: StateStore,
    manifest: DeltaManifest,
    paths: tuple[str, ...],
    columns: list[str],
    window_start: dt.datetime | None,
    scan_end: dt.datetime,
    update_existing_only: bool,
    diff: AttributeDiff | None,
    batch_rows: int,
    progress: Callable[[str], None],
) -> dt.datetime | None:
    """Scan the window into the local files `paths` (valid, rejected[, unchanged]); the newest
    UPDATED_AT read."""
    hash_columns = [
        c for c in columns if c in IDENTIFIER_COLUMNS or c in ("ID", "DELETED", "UPDATED_AT", "PAYLOAD")
    ]
    manifest.parts_skipped = source.skip_parts(store.settled_parts())
    manifest.parts = source.parts(window_start, scan_end)
    manifest.computed_at = dt.datetime.now(dt.UTC).isoformat()
    newest: dt.datetime | None = None
    with store.session() as ledger:
        writer = DeltaWriter(manifest, spec, update_existing_only, paths, diff, ledger.remembered)
        try:
            for batch in source.scan(
                window_start, scan_end, manifest.reaches_now, batch_rows, columns=columns
            ):
                located = [c for c in LOCATION_COLUMNS if c in batch.schema.names]
                hashes = batch_hashes(batch, hash_columns + located)
                stamps = batch.column("UPDATED_AT")
                span = pc.min_max(stamps)
                oldest, stamp = span["min"].as_py(), span["max"].as_py()
                # With no NULL UPDATED_AT in the batch, only ledger rows in its span can match.
                between = (oldest, stamp) if stamps.null_count == 0 and oldest else None
                known = ledger.known_hashes(hashes, between=between)
                manifest.rows_read += batch.num_rows
                if stamp is not None and (newest is None or stamp > newest):
                    newest = stamp
                manifest.already_settled += len(known)
                if known:
                    keep = [h not in known for h in hashes]
                    batch = batch.filter(pa.array(keep))
                    hashes = [h for h, k in zip(hashes, keep, strict=True) if k]
                if batch.num_rows:
                    writer.add(batch, hashes)
                progress(
                    f"read {manifest.rows_read:,} rows; {manifest.valid:,} to send, "
                    f"{manifest.rejected:,} rejected, {manifest.already_settled:,} already settled"
                )
        finally:
            writer.close()
    valid_path, rejected_path = paths[:2]
    if len(paths) > 2:  # exact copies among the unchanged rows: settled once too
        unchanged_copies = _drop_duplicates(paths[2])
        manifest.unchanged -= unchanged_copies
        if unchanged_copies:
            manifest.data_points_saved = sum(
                int(
                    pc.sum(pq.read_table(path, columns=["data_points_saved"])["data_points_saved"]).as_py()
                    or 0
                )
                for path in (paths[0], paths[2])
            )
    valid_copies = _drop_duplicates(valid_path)
    rejected_copies = _drop_duplicates(rejected_path)
    manifest.duplicate_rows = valid_copies + rejected_copies
    manifest.valid -= valid_copies
    if valid_copies:  # the copies are not sent, so not billed either
        points = pq.read_table(valid_path, columns=["data_points"])["data_points"]
        manifest.estimated_data_points = int(pc.sum(points).as_py() or 0)
    manifest.rejected -= rejected_copies
    return newest


def _drop_duplicates(path: str) -> int:
    """Rows that are exact copies of an earlier row of the delta (same identifiers, UPDATED_AT and
    PAYLOAD, so the same identity) are one row: keep the first, return how many copies were
    dropped. The file is rewritten only when it has copies (a scan of one column otherwise)."""
    with duckdb.connect(config={"memory_limit": "256MB"}) as con:
        copies = con.sql(
            "SELECT count(*) - count(DISTINCT row_hash) FROM read_parquet(?)", params=[path]
        ).fetchall()[0][0]
        if copies:
            kept = con.sql(
                "SELECT * EXCLUDE (file_row_number) FROM read_parquet(?, file_row_number = true) "
                "QUALIFY row_number() OVER (PARTITION BY row_hash ORDER BY file_row_number) = 1 "
                "ORDER BY file_row_number",
                params=[path],
            ).to_arrow_table()
            pq.write_table(kept.cast(pq.read_schema(path)), path)
    return int(copies)


def _report_future_rows(source: CdiSource, manifest: DeltaManifest, now: dt.datetime) -> None:
    """Rows stamped after `now` are held back (CDI would jump its watermark past them)."""
    manifest.future_rows = source.count(now, None)
    if not manifest.future_rows:
        return
    for batch in source.scan(now, None, False, EXAMPLES_KEPT):
        for row in batch.to_pylist()[:EXAMPLES_KEPT]:
            manifest.future_examples.append(
                {
                    "identifier": mask_identifiers(row_identifiers(row)),
                    "updated_at": row["UPDATED_AT"].isoformat(),
                    "reason": "UPDATED_AT is in the future; held until then so the watermark never "
                    "passes now",
                }
            )
        break
