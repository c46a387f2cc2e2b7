"""`DeltaWriter`: prepared batches appended, in scan order, to a delta's Parquet files, and the
manifest's counts kept as they go.

Between the scan (`delta.py`, which reads the window and drops the rows the ledger settled) and
the preparation (`delta_batch.py`, pure functions of a batch) sits the part that owns the run's
resources: the open Parquet writers, the worker pool (`delta_workers.py`) and the state's lookup
of what Braze already holds of the batch's users. It is its own module because it is that one
job, used by the scan and, on its own, by tests feeding it single rows. Its name stays importable
from `delta.py`, where it was first.

`POOL_AFTER_ROWS` and `LOOKUP_ROWS` are read here, when a writer is made or a batch added: to
change them (tests do), patch this module.
"""

from __future__ import annotations

import collections
import logging
from collections import Counter
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from braze_assets.attribute_diff import AttributeDiff
from braze_assets.datatypes import DataTypeSpec
from braze_assets.delta_batch import BatchJob, Prepared, prepare_batch, row_hashes, set_aside_unchanged
from braze_assets.delta_manifest import EXAMPLES_KEPT, DeltaManifest
from braze_assets.delta_schema import REJECTED_SCHEMA, UNCHANGED_SCHEMA, VALID_SCHEMA
from braze_assets.delta_workers import Hashing, PreparePool, identify_batch, warm_up
from braze_assets.known_users import LOOKUP_ROWS, Identified, KnownUsers, Lookup, SeenUsers
from braze_assets.lookup import lookup_key

_log = logging.getLogger(__name__)

#: A lookup group also closes at this many bytes of scanned rows: two groups wait at once (one
#: looked up while the workers hash the next), so wide PAYLOADs must not hold 400,000 rows.
LOOKUP_BYTES = 128 * 1024 * 1024
#: The rows left of several batches once their unchanged rows are set aside are prepared together
#: up to this many (a scan batch's size): a row that fails unforeseen takes its batch apart row
#: by row, which must stay as short as it was.
REST_ROWS = 20_000

#: Rows a delta prepares in the run's own process before it starts worker processes.
POOL_AFTER_ROWS = 50_000


#: Delta columns whose values repeat (stamps, counts, masked identifiers): dictionary-encoded.
#: The others are hashes, objects and remembered texts, nearly all distinct: trying a dictionary
#: on them first was a third of the run's Parquet writing (measured: 0.34 s against 0.20 s per
#: 200,000 rows of an attributes delta with the diff, files the same size).
_DICTIONARY_COLUMNS = frozenset(
    {"updated_at", "identifier", "data_points", "payload_attributes", "data_points_saved", "reasons"}
)


#: Delta columns of hex digests: stored uncompressed. Random hex gives Snappy almost nothing to
#: find (files 9% smaller) and compressing it was most of the run's Parquet writing (measured on
#: 200,000 rows of an attributes delta with the diff: 280 ms against 133 ms).
_DIGEST_COLUMNS = frozenset({"row_hash", "identifier_hash", "user_key", "payload_hash"})


def _parquet_writer(path: str, schema: pa.Schema) -> pq.ParquetWriter:
    dictionary = [name for name in schema.names if name in _DICTIONARY_COLUMNS]
    compression = {name: "none" if name in _DIGEST_COLUMNS else "snappy" for name in schema.names}
    return pq.ParquetWriter(path, schema, use_dictionary=dictionary, compression=compression)


#: A scanned batch waiting for its lookup: its rows, their row hashes (None: not computed
#: yet) and its users being hashed in a worker (None: hashed when looked up).
_Waiting = tuple[pa.RecordBatch | pa.Table, list[str] | None, Hashing | None]


def _listed(hashes: list[str] | pa.Array) -> list[str]:
    return hashes if isinstance(hashes, list) else hashes.to_pylist()


class _Rest:
    """The rows of a lookup group's batches left once their unchanged rows were set aside, and
    those set aside (`ready`), gathered to be prepared as one batch."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.ready = Prepared()
        self.num_rows = 0
        self._parts: list[tuple[pa.RecordBatch | pa.Table, list[str], KnownUsers]] = []

    def absorb(self, part: Prepared) -> None:
        """Rows set aside as unchanged, after those set aside before."""
        if part.unchanged is not None:
            ready = self.ready
            ready.unchanged = (
                part.unchanged
                if ready.unchanged is None
                else pa.concat_tables([ready.unchanged, part.unchanged])
            )
        self.ready.data_points_saved += part.data_points_saved

    def fits(self, rows: pa.RecordBatch | pa.Table) -> bool:
        """Whether rows can join those gathered (one batch needs one schema: a file source's
        files may differ)."""
        return not self._parts or self._parts[0][0].schema.equals(rows.schema)

    def add(self, rows: pa.RecordBatch | pa.Table, hashes: list[str], known: KnownUsers) -> None:
        if rows.num_rows:
            self._parts.append((rows, hashes, known))
            self.num_rows += rows.num_rows

    def take(self) -> tuple[pa.Table, list[str], KnownUsers | None]:
        """The gathered rows as one batch, their row hashes, and what is known of their users."""
        if not self._parts:
            return pa.table({}), [], None
        tables = [
            rows if isinstance(rows, pa.Table) else pa.Table.from_batches([rows])
            for rows, _, _ in self._parts
        ]
        return (
            pa.concat_tables(tables).combine_chunks(),
            [h for _, hashes, _ in self._parts for h in hashes],
            KnownUsers.concat([known for _, _, known in self._parts]),
        )


class DeltaWriter:
    """Prepares scanned batches (`delta_batch.py`) and appends them, in scan order, to the valid,
    rejected and unchanged Parquet files.

    Batches are prepared in worker processes (`delta_workers.py`) once the delta has passed
    `pool_after_rows` rows and `workers` is not 0; a small delta never starts one. What the state
    knows of the batch's users (the attribute diff's `remembered`) is looked up here, in the
    run's own process, which holds the state connection.
    """

    def __init__(
        self,
        manifest: DeltaManifest,
        spec: DataTypeSpec,
        update_existing_only: bool,
        paths: tuple[str, ...] | None = None,
        diff: AttributeDiff | None = None,
        remembered: Lookup | None = None,
        workers: int = 0,
        pool_after_rows: int | None = None,
        hash_columns: tuple[str, ...] = (),
    ):
        """`paths`: the local (valid, rejected[, unchanged]) files to write, when not the
        manifest's own. `diff`: send only what changed, against what the state's lookup
        `remembered` finds (None: nothing is remembered, so no row is looked up).
        `hash_columns`: the rows' identity columns, for batches added without their hashes."""
        self.manifest, self.spec = manifest, spec
        own = (manifest.valid_path, manifest.rejected_path, manifest.unchanged_path)
        valid_path, rejected_path, *unchanged_path = paths or tuple(p for p in own if p)
        self._valid = _parquet_writer(valid_path, VALID_SCHEMA)
        self._rejected = _parquet_writer(rejected_path, REJECTED_SCHEMA)
        self.diff = diff
        self._remembered = remembered
        self._unchanged = _parquet_writer(unchanged_path[0], UNCHANGED_SCHEMA) if diff else None
        self._seen = SeenUsers() if diff is not None and remembered is not None else None
        self._reasons: Counter[str] = Counter()
        self.job = BatchJob(spec, update_existing_only, diff, lookup_key(), hash_columns)
        self._workers = workers
        self._pool_after_rows = POOL_AFTER_ROWS if pool_after_rows is None else pool_after_rows
        self._pool: PreparePool | None = None
        # the fork server starts loading once a delta has filled a scan batch: a delta that big
        # likely goes on to need the pool, and the server is then ready when the pool starts
        self._warm_after_rows = self._pool_after_rows * 2 // 5
        self._warmed = False
        self._rows_added = 0
        self._waiting: list[_Waiting] = []
        self._waiting_rows = self._waiting_bytes = 0
        #: groups of waiting batches filled to `LOOKUP_ROWS`, looked up one group behind the
        #: scan, so the workers hash the next group while this process looks this one up
        self._filled: collections.deque[list[_Waiting]] = collections.deque()

    def add(self, rows: pa.RecordBatch | pa.Table, hashes: list[str] | None) -> None:
        """Prepare scanned rows not yet settled (`hashes`: their `row_hash`, None: hashed where
        they are prepared, from `hash_columns`); append what is due.
        With the attribute diff, batches wait until `LOOKUP_ROWS` rows can be looked up at once;
        meanwhile a worker hashes their users and PAYLOADs for that lookup (`identify`)."""
        self._rows_added += rows.num_rows
        self._start_workers_if_due()
        if self.diff is None or self.spec.name == "catalogs" or self._remembered is None:
            self._prepare(rows, hashes, None)
            return
        hashing = self._pool.identify(rows, hashes is None) if self._pool is not None else None
        self._waiting.append((rows, hashes, hashing))
        self._waiting_rows += rows.num_rows
        self._waiting_bytes += rows.nbytes
        if self._waiting_rows >= LOOKUP_ROWS or self._waiting_bytes >= LOOKUP_BYTES:
            self._filled.append(self._waiting)
            self._waiting, self._waiting_rows, self._waiting_bytes = [], 0, 0
            if len(self._filled) > 1 or self._pool is None:
                self._look_up(self._filled.popleft())

    def _look_up(self, waiting: list[_Waiting]) -> None:
        """Look a group of waiting batches' users up, then prepare the batches in scan order."""
        if waiting and self._remembered is not None:
            job = self.job
            hashed = [self._identified(rows, hashes, hashing) for rows, hashes, hashing in waiting]
            batches = [rows for (rows, _, _), ident in zip(waiting, hashed, strict=True) if ident is not None]
            found = iter(
                KnownUsers.find(
                    batches,
                    self._remembered,
                    [i for i in hashed if i is not None],
                    self._seen,
                    self.diff.listed if self.diff is not None else frozenset(),
                )
            )
            rest = _Rest()
            for (rows, hashes, _), ident in zip(waiting, hashed, strict=True):
                if ident is None:  # prepared as if nothing were remembered (whole), in scan order
                    self._flush(rest)
                    self._prepare(rows, hashes, None)
                    continue
                known = next(found)
                # the row hashes: given by the scan, else computed with the lookup's hashes (kept
                # as Arrow: most of a restamped batch's are only written as unchanged)
                given: list[str] | pa.Array
                if hashes is not None:
                    given = hashes
                else:
                    given = ident.row_hashes if ident.row_hashes is not None else row_hashes(job, rows)
                if not known.unchanged:
                    self._flush(rest)
                    self._prepare(rows, _listed(given), known)
                    continue
                # settled here, and the few rows left of several batches prepared together: a
                # restamped snapshot's rows then go to no worker again, and its changed rows do
                # not each pay a batch's fixed cost of validation
                part = Prepared()
                try:
                    left, given_left, known_left = set_aside_unchanged(job, rows, given, known, part)
                except Exception:  # noqa: BLE001 - a row that cannot be settled (a text stamp)
                    # prepared as a worker does: the batch taken apart, that row rejected
                    self._flush(rest)
                    self._prepare(rows, _listed(given), known)
                    continue
                if not rest.fits(left) or rest.num_rows + left.num_rows > REST_ROWS:
                    self._flush(rest)
                rest.absorb(part)
                rest.add(left, given_left, known_left)
                if rest.num_rows >= REST_ROWS:
                    self._flush(rest)
            self._flush(rest)

    def _identified(
        self, rows: pa.RecordBatch | pa.Table, hashes: list[str] | None, hashing: Hashing | None
    ) -> Identified | None:
        """What `identify` gives of a batch; None when it failed on a row no check foresaw: the
        batch is then prepared on its own (row by row if need be), so that row stops no other."""
        try:
            if self._pool is not None:
                return self._pool.identified(rows, hashing, hashes is None)
            return identify_batch(self.job, rows, hashes is None)
        except Exception as exc:  # noqa: BLE001 - one row's failure, found when preparing
            _log.warning(
                "a batch's rows could not be hashed for the diff's lookup (%s); they are sent "
                "whole, and any row that cannot be prepared is rejected alone",
                type(exc).__name__,
            )
            return None

    def _flush(self, rest: _Rest) -> None:
        """Prepare what `rest` gathered, after the unchanged rows it set aside."""
        if rest.ready.unchanged is None and not rest.num_rows:
            return
        ready, (rows, hashes, known) = rest.ready, rest.take()
        rest.clear()
        self._prepare(rows, hashes, known, ready)

    def _start_workers_if_due(self) -> None:
        """Start the fork server once the delta has passed a share of `pool_after_rows`, and the
        pool once it has passed them all: a small delta never starts either."""
        if self._pool is not None or not self._workers:
            return
        if not self._warmed and self._rows_added >= self._warm_after_rows:
            warm_up()
            self._warmed = True
        if self._rows_added > self._pool_after_rows:
            self._pool = PreparePool(self.job, self._workers)

    def _prepare(
        self,
        rows: pa.RecordBatch | pa.Table,
        hashes: list[str] | None,
        known: KnownUsers | None,
        ready: Prepared | None = None,
    ) -> None:
        """Prepare a batch, after `ready` (what of it was prepared here already)."""
        if self._pool is not None:
            results: Iterable[Prepared] = self._pool.submit(rows, hashes, known, ready)
        else:
            results = [
                *([ready] if ready is not None else []),
                *(prepare_batch(self.job, rows, hashes, known) if rows.num_rows else []),
            ]
        for prepared in results:
            self._commit(prepared)

    def finish(self) -> None:
        """Prepare the batches still waiting and append every batch still being prepared."""
        while self._filled:
            self._look_up(self._filled.popleft())
        waiting, self._waiting, self._waiting_rows, self._waiting_bytes = self._waiting, [], 0, 0
        self._look_up(waiting)
        if self._pool is not None:
            for prepared in self._pool.drain():
                self._commit(prepared)

    def _commit(self, prepared: Prepared) -> None:
        manifest = self.manifest
        if prepared.unchanged is not None and prepared.unchanged.num_rows and self._unchanged is not None:
            self._unchanged.write_table(prepared.unchanged)
            manifest.unchanged += prepared.unchanged.num_rows
        manifest.data_points_saved += prepared.data_points_saved
        manifest.rows_unprocessable += prepared.unprocessable
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
        """Stop the workers and close the files (after `finish`, with everything appended)."""
        try:
            if self._pool is not None:
                self._pool.close()
            self._valid.close()
            self._rejected.close()
            if self._unchanged is not None:
                self._unchanged.close()
        finally:
            if self._seen is not None:
                self._seen.close()
        self.manifest.rejected_reasons = dict(self._reasons.most_common())
