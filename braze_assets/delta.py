"""Compute a sync's delta: the rows in a time window not yet settled, validated and split.

Streams the window out of the warehouse in Arrow batches; per batch it hashes each row, drops the rows
the ledger already settled, validates the rest with the data type's pandera schema and writes valid
rows (as ready-to-send Braze objects) and rejected rows (with their reasons) to Parquet. Memory stays
bounded by the batch size whatever the size of the delta.

This module is the scan and what follows it (exact copies dropped, future and late rows counted).
The batches go to a `DeltaWriter` (`delta_writer.py`), which prepares them and appends them to
the files; what the run found goes into a `DeltaManifest` (`delta_manifest.py`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from braze_assets.attribute_diff import AttributeDiff
from braze_assets.datatypes import IDENTIFIER_COLUMNS, DataTypeSpec, row_identifiers
from braze_assets.delta_files import staged
from braze_assets.delta_manifest import EXAMPLES_KEPT, DeltaManifest
from braze_assets.delta_workers import configured_workers
from braze_assets.delta_writer import DeltaWriter
from braze_assets.known_users import excluding
from braze_assets.masking import mask_identifiers
from braze_assets.row_identity import located_batch_hashes
from braze_assets.sources.base import CdiSource
from braze_assets.state import LedgerSession, StateStore

#: The manifest (`delta_manifest.py`) and the writer (`delta_writer.py`) are importable from
#: here too, where they were first; the files' schemas are in `delta_schema.py`.
__all__ = ["DeltaManifest", "DeltaWriter", "compute_delta"]


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
    workers: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> DeltaManifest:
    """Fill `manifest` (and its Parquet files) with the delta of [window_start, min(end, now)).
    With `diff` (attributes syncs sending only what changed) rows with nothing new for Braze go to
    `manifest.unchanged_path`, which must be set. `workers`: processes preparing batches
    (`delta_workers.py`; None: `BRAZE_ASSETS_DELTA_WORKERS` or one per core).

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
            workers=configured_workers() if workers is None else workers,
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
    workers: int,
    progress: Callable[[str], None],
) -> dt.datetime | None:
    """Scan the window into the local files `paths` (valid, rejected[, unchanged]); the newest
    UPDATED_AT read."""
    hash_columns = tuple(
        c for c in columns if c in IDENTIFIER_COLUMNS or c in ("ID", "DELETED", "UPDATED_AT", "PAYLOAD")
    )
    manifest.parts_skipped = source.skip_parts(store.settled_parts())
    manifest.parts = source.parts(window_start, scan_end)
    manifest.computed_at = dt.datetime.now(dt.UTC).isoformat()
    newest: dt.datetime | None = None
    with store.session() as ledger:
        writer = DeltaWriter(
            manifest,
            spec,
            update_existing_only,
            paths,
            diff,
            excluding(ledger.planned_user_keys(), ledger.remembered_table)
            if diff is not None and ledger.remembers_anyone()
            else None,
            workers=workers,
            hash_columns=hash_columns,
        )
        try:
            for batch in source.scan(
                window_start, scan_end, manifest.reaches_now, batch_rows, columns=columns
            ):
                stamps = batch.column("UPDATED_AT")
                span = pc.min_max(stamps)
                oldest, stamp = span["min"].as_py(), span["max"].as_py()
                manifest.rows_read += batch.num_rows
                if stamp is not None and (newest is None or stamp > newest):
                    newest = stamp
                # With no NULL UPDATED_AT in the batch, only ledger rows in its span can match;
                # with none there (new rows, a restamped table) there is nothing to probe, and
                # the rows are hashed where they are prepared, beside this process's work.
                between = (oldest, stamp) if stamps.null_count == 0 and oldest else None
                if between is not None and not ledger.settled_between(*between):
                    writer.add(batch, None)
                else:
                    _add_unsettled(writer, ledger, batch, hash_columns, between, manifest)
                progress(
                    f"read {manifest.rows_read:,} rows; {manifest.valid:,} to send, "
                    f"{manifest.rejected:,} rejected, {manifest.already_settled:,} already settled"
                )
            writer.finish()
        finally:
            writer.close()
    valid_path, rejected_path = paths[:2]
    unchanged_copies = _drop_duplicates(paths[2]) if len(paths) > 2 else 0  # settled once too
    manifest.unchanged -= unchanged_copies
    valid_copies = _drop_duplicates(valid_path)
    rejected_copies = _drop_duplicates(rejected_path)
    manifest.duplicate_rows = valid_copies + rejected_copies
    manifest.valid -= valid_copies
    if valid_copies:  # the copies are not sent, so not billed either
        manifest.estimated_data_points = _column_sum(valid_path, "data_points")
    if (valid_copies or unchanged_copies) and len(paths) > 2:  # nor saved
        manifest.data_points_saved = sum(
            _column_sum(path, "data_points_saved") for path in (valid_path, paths[2])
        )
    manifest.rejected -= rejected_copies
    return newest


def _column_sum(path: str, column: str) -> int:
    return int(pc.sum(pq.read_table(path, columns=[column])[column]).as_py() or 0)


def _add_unsettled(
    writer: DeltaWriter,
    ledger: LedgerSession,
    batch: pa.RecordBatch,
    hash_columns: tuple[str, ...],
    between: tuple[dt.datetime, dt.datetime] | None,
    manifest: DeltaManifest,
) -> None:
    """Hash a scanned batch, drop the rows the ledger already settled, add the rest."""
    hashes = located_batch_hashes(batch, hash_columns)
    known = ledger.known_hashes(hashes, between=between)
    manifest.already_settled += len(known)
    if known:
        keep = [h not in known for h in hashes]
        batch = batch.filter(pa.array(keep))
        hashes = [h for h, k in zip(hashes, keep, strict=True) if k]
    if batch.num_rows:
        writer.add(batch, hashes)


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
