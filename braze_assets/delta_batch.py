"""One batch of scanned rows, prepared: the rows to send, the rows set aside as unchanged, and the
rows rejected with their reasons, as Arrow tables ready to append to the delta's files.

Preparing is the CPU-heavy part of a delta (PAYLOAD parsing, the pandera schema, the attribute
diff, building the Braze objects, hashing identifiers), and it needs nothing but the batch and
what the state already told about it (`before`). So it is a pure function of picklable inputs:
`delta_workers.py` runs it in worker processes, on every core, while the scan, the ledger probe
and the writing stay in the run's own process. Nothing here writes anything.

No row can stop the others: a batch that fails to prepare for a reason validation did not
foresee is prepared again row by row, and a row that still fails is rejected with a reason naming
the kind of failure (counted as unprocessable), so every row read ends valid, unchanged or
rejected.

What the files hold is defined in `delta_schema.py`; catalog batches are prepared by `catalog_batch.py`.
"""

from __future__ import annotations

import contextlib
import gc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from braze_assets.attribute_diff import AttributeDiff, Remembered, column_payload_hashes, payload_hash
from braze_assets.catalog_batch import prepare_items
from braze_assets.datatypes import (
    CheckedRows,
    DataTypeSpec,
    RowBatch,
    build_objects,
    identifier_arrays,
    validate_batch,
)
from braze_assets.delta_schema import (
    REJECTED_SCHEMA,
    UNCHANGED_SCHEMA,
    VALID_SCHEMA,
    no_diff_columns,
    reason_key,
)
from braze_assets.known_users import KnownUsers
from braze_assets.lookup import column_lookup_hashes, row_lookup_hashes
from braze_assets.masking import mask_identifier_columns, mask_identifiers, mask_payload
from braze_assets.row_identity import located_batch_hashes


@dataclass(frozen=True)
class BatchJob:
    """What every batch of one delta is prepared with."""

    spec: DataTypeSpec
    update_existing_only: bool
    #: attributes syncs sending only what changed; None sends whole payloads
    diff: AttributeDiff | None = None
    #: the key of the rows' lookup hashes (`lookup.py`), read once by the run's own process
    lookup_key: bytes = b""
    #: the columns of a row's identity (`row_identity.py`), for batches whose hashes the run's
    #: process did not need (nothing in the ledger could match them) and left to the worker
    hash_columns: tuple[str, ...] = ()


@dataclass
class Prepared:
    """One batch's contribution, computed in full before anything is written: a failure while
    preparing leaves no trace, so the batch can be taken apart row by row."""

    valid: pa.Table | None = None
    rejected: pa.Table | None = None
    unchanged: pa.Table | None = None
    data_points: int = 0
    data_points_saved: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    #: rows that failed in a way validation did not foresee (rejected, never sent)
    unprocessable: int = 0


def row_hashes(job: BatchJob, rows: pa.RecordBatch | pa.Table) -> list[str]:
    """The rows' `row_hash`, from the delta's identity columns and, for file sources, where
    each row was read (`_FILE`, `_LINE`: part of its identity)."""
    if not job.hash_columns:
        raise ValueError("a batch without row hashes needs the delta's hash_columns")
    return located_batch_hashes(rows, job.hash_columns)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Preparing a batch allocates a container per row and field (parsed payloads, objects):
    Python's cycle collector would walk them over and over while they are all alive, a quarter
    of the time measured. They form no cycles, so it waits until the batch is done."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def prepare_batch(
    job: BatchJob,
    rows: pa.RecordBatch | pa.Table,
    hashes: list[str] | None,
    known: KnownUsers | None = None,
) -> list[Prepared]:
    """Prepare scanned rows not yet settled (`hashes`: their `row_hash`; None: computed here,
    from `job.hash_columns`). With a diff, `known` is what the state told of the batch's users
    (None: nothing). One `Prepared`, or one per row when the batch had to be taken apart."""
    if hashes is None:
        hashes = row_hashes(job, rows)
    try:
        with _collector_paused():
            return [_prepare(job, rows, hashes, known)]
    except Exception as exc:  # noqa: BLE001 - any failure is one row's: find it, set it aside
        if rows.num_rows > 1:
            return [
                part
                for i in range(rows.num_rows)
                for part in prepare_batch(
                    job, rows.slice(i, 1), hashes[i : i + 1], known.take([i]) if known else None
                )
            ]
        return [_unprocessable(rows, hashes, exc)]


def _prepare(
    job: BatchJob, rows: pa.RecordBatch | pa.Table, hashes: list[str], known: KnownUsers | None
) -> Prepared:
    prepared = Prepared()
    if job.spec.name == "catalogs":
        prepare_items(rows, hashes, prepared)
        return prepared
    payload_hashes: list[str | None] = []
    user_keys: list[str] = []
    before: dict[str, Remembered] = {}
    repeated: frozenset[int] = frozenset()
    if job.diff is not None:
        known = known or KnownUsers.nothing(rows)
        if known.unchanged:  # the fast path: a PAYLOAD exactly as Braze last accepted it
            rows, hashes, known = set_aside_unchanged(job, rows, hashes, known, prepared)
            if not rows.num_rows:
                return prepared
        user_keys, before, repeated = known.keys.to_pylist(), known.before, known.repeated
    batch = RowBatch.from_arrow(rows)
    if job.diff is not None and known is not None:
        payloads = batch.payload or [None] * batch.num_rows
        given = known.payload_hashes
        if given.null_count == len(given):  # none hashed yet (a first sync's rows): the column's
            payload_hashes = column_payload_hashes(rows.column("PAYLOAD")) if batch.payload else payloads
        else:
            payload_hashes = [
                digest if digest is not None else payload_hash(raw)
                for digest, raw in zip(given.to_pylist(), payloads, strict=True)
            ]
    checked = validate_batch(batch, job.spec)
    valid = [i for i in range(batch.num_rows) if i not in checked.failures]
    diffed: _Diffed | None = None
    if valid and job.diff is not None:
        diffed = _diff_rows(job.diff, checked, valid, user_keys, before, repeated)
        if diffed.unchanged:
            saved = [diffed.saved.get(i, 0) for i in diffed.unchanged]
            at = pa.array(diffed.unchanged, pa.int64())
            shown = known.shown.take(at) if known is not None and known.shown is not None else None
            lookups = known.lookups.take(at) if known is not None and known.lookups is not None else None
            _set_aside_unchanged(job, rows, hashes, diffed.unchanged, saved, prepared, shown, lookups)
            set_aside = set(diffed.unchanged)
            valid = [i for i in valid if i not in set_aside]
    if valid:
        objects = build_objects(checked, job.spec, valid, job.update_existing_only)
        if any(o is None for o in objects):  # rows too deep to serialize: now in failures
            objects = [o for o in objects if o is not None]
            valid = [i for i in valid if i not in checked.failures]
        if known is not None and known.shown is not None and known.lookups is not None:
            shown, hashed = known.shown.to_pylist(), known.lookups.to_pylist()
        else:
            shown = mask_identifier_columns(batch.columns, batch.num_rows)
            hashed = column_lookup_hashes(batch.columns, batch.num_rows, job.lookup_key)
        if diffed is not None:
            sent_of, saved_of = diffed.sent, diffed.saved
            points = np.array([sent_of[i] for i in valid], dtype=np.int64)
            kept = np.array([saved_of.get(i, 0) for i in valid], dtype=np.int64)
            diff_columns = {
                "user_key": pa.array([user_keys[i] for i in valid], pa.string()),
                "payload_hash": pa.array(
                    [None if i in diffed.volatile else payload_hashes[i] for i in valid], pa.string()
                ),
                "remember": pa.array([diffed.remember[i] for i in valid], pa.string()),
                "payload_attributes": pa.array(points + kept, pa.int32()),
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
        _prepare_rejected(job, rows, checked, hashes, prepared)
    return prepared


@dataclass
class _Diffed:
    """The diff of a batch's valid rows, by position: what to remember of each, its attributes
    sent and saved (0 when absent), and the rows left with nothing to send."""

    remember: dict[int, str] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)
    saved: dict[int, int] = field(default_factory=dict)
    unchanged: list[int] = field(default_factory=list)
    #: rows whose PAYLOAD holds something always sent: their PAYLOAD hash is not remembered
    volatile: set[int] = field(default_factory=set)


def _diff_rows(
    diff: AttributeDiff,
    checked: CheckedRows,
    valid: list[int],
    user_keys: list[str],
    before: dict[str, Remembered],
    repeated: frozenset[int] = frozenset(),
) -> _Diffed:
    """Trim the valid rows' payloads (in `checked`) to what changed. The users nothing is
    remembered of (every user of a first sync) and the rows of a user with an earlier row in the
    delta (`repeated`) go whole, hashed together (`first_rows`)."""
    diffed = _Diffed()
    first: list[int] = []
    fresh: list[dict[str, Any]] = []
    payloads = checked.payloads
    if not before:  # nothing remembered of any of them (a first sync): no row to look up
        first = [i for i in valid if payloads[i] is not None]
        fresh = [payloads[i] for i in first]  # type: ignore[misc]
    for i in valid if before else ():
        payload = checked.payloads[i]
        if payload is None:
            continue
        known = None if i in repeated else before.get(user_keys[i])
        if known is None:
            first.append(i)
            fresh.append(payload)
            continue
        trimmed = diff.trim(payload, known)
        checked.payloads[i] = trimmed.payload
        diffed.remember[i], diffed.sent[i], diffed.saved[i] = trimmed.remember, trimmed.sent, trimmed.saved
        if trimmed.unchanged:
            diffed.unchanged.append(i)
        if trimmed.volatile:
            diffed.volatile.add(i)
    if first:
        remember, sent, volatile = diff.first_rows(fresh)
        diffed.remember.update(zip(first, remember, strict=True))
        diffed.sent.update(zip(first, sent, strict=True))
        diffed.volatile.update(i for i, flag in zip(first, volatile, strict=True) if flag)
    return diffed


def set_aside_unchanged(
    job: BatchJob,
    rows: pa.RecordBatch | pa.Table,
    hashes: list[str] | pa.Array,
    known: KnownUsers,
    prepared: Prepared,
) -> tuple[pa.RecordBatch | pa.Table, list[str], KnownUsers]:
    """The fast path: the rows whose PAYLOAD is exactly the one Braze last accepted
    (`known.unchanged`) go to `prepared.unchanged`, unread; the other rows are returned. The
    run's own process calls this too, with what a worker computed for the lookup (`known.shown`,
    `known.lookups`): a restamped snapshot's rows then never go to a worker a second time."""
    same = sorted(known.unchanged)
    picked = pa.array(same, pa.int64())
    shown = known.shown.take(picked) if known.shown is not None else None
    lookups = known.lookups.take(picked) if known.lookups is not None else None
    _set_aside_unchanged(
        job, rows, hashes, same, [known.unchanged[i] for i in same], prepared, shown, lookups
    )
    others = [i for i in range(rows.num_rows) if i not in known.unchanged]
    at = pa.array(others, pa.int64())
    rest = hashes.take(at).to_pylist() if isinstance(hashes, pa.Array) else [hashes[i] for i in others]
    return rows.take(at), rest, known.take(others)


def _set_aside_unchanged(
    job: BatchJob,
    rows: pa.RecordBatch | pa.Table,
    hashes: list[str] | pa.Array,
    positions: list[int],
    saved: list[int],
    prepared: Prepared,
    shown: pa.Array | None = None,
    lookups: pa.Array | None = None,
) -> None:
    """Rows with nothing Braze does not already hold: settled as `unchanged`, never sent.
    `shown`, `lookups`: the rows' masked identifiers and lookup hashes, when computed already."""
    at = pa.array(positions, pa.int64())
    if shown is None or lookups is None:
        columns = identifier_arrays(rows.take(at))[0]
        shown = pa.array(mask_identifier_columns(columns, len(positions)), pa.string())
        lookups = pa.array(column_lookup_hashes(columns, len(positions), job.lookup_key), pa.string())
    stamps = rows.column("UPDATED_AT").take(at).cast(pa.timestamp("us", tz="UTC"))
    table = pa.table(
        {
            "row_hash": hashes.take(at)
            if isinstance(hashes, pa.Array)
            else pa.array([hashes[i] for i in positions], pa.string()),
            "updated_at": stamps,
            "identifier": shown,
            "identifier_hash": lookups,
            "data_points_saved": pa.array(saved, pa.int32()),
        },
        schema=UNCHANGED_SCHEMA,
    )
    prepared.unchanged = (
        table if prepared.unchanged is None else pa.concat_tables([prepared.unchanged, table])
    )
    prepared.data_points_saved += sum(saved)


def _prepare_rejected(
    job: BatchJob,
    rows: pa.RecordBatch | pa.Table,
    checked: CheckedRows,
    hashes: list[str],
    prepared: Prepared,
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
                row_lookup_hashes(identifiers, job.lookup_key),
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


def _unprocessable(rows: pa.RecordBatch | pa.Table, hashes: list[str], exc: Exception) -> Prepared:
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
    return Prepared(
        unprocessable=1,
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
