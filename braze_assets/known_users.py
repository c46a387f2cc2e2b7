"""What the state knows of a delta's users, for the attribute diff (`attribute_diff.py`).

The run's own process holds the state connection, so it looks users up before batches go to the
worker processes (`delta_workers.py`). A restamped snapshot table makes that lookup the delta's
hot path: every row's user is remembered and most PAYLOADs are exactly the ones Braze last
accepted. So it works on Arrow columns, never on a Python object per remembered row, and asks
the state once for several scanned batches (`LOOKUP_ROWS`): the embedded state answers a lookup
by scanning what it remembers, so one lookup of 100,000 keys costs about what one of 20,000
does (measured: 0.75 against 3.2 microseconds per key, against a million remembered users).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from braze_assets.attribute_diff import Remembered, column_payload_hashes, column_user_keys
from braze_assets.datatypes import identifier_arrays
from braze_assets.lookup import column_lookup_hashes
from braze_assets.masking import mask_identifier_columns
from braze_assets.row_identity import located_batch_hashes

#: Scanned rows whose users one state lookup covers. Measured on a restamped snapshot of a
#: million users: 200,000 against 100,000 took the delta 9.0 s against 9.9 s and the run's
#: process 1.4 CPU-seconds less, for 73 MB more at its peak (two groups wait: `DeltaWriter`).
LOOKUP_ROWS = 200_000

#: The state's `remembered_table(user_keys, attributes)`.
Lookup = Callable[[pa.Array, bool], pa.Table]


def excluding(users: pa.Array, lookup: Lookup) -> Lookup:
    """`lookup`, finding nothing of `users`: the users of requests whose outcome is not known
    yet (`LedgerSession.planned_user_keys`: a run that died, or one still sending), whose rows
    then go whole. Recovery, which comes later, in the delivery, remembers them as holding
    nothing; a delta before it must not trim their rows against what Braze may no longer hold."""
    if not len(users):
        return lookup

    def without(user_keys: pa.Array, attributes: bool) -> pa.Table:
        found = lookup(user_keys, attributes)
        return found.filter(pc.invert(pc.is_in(found["user_key"], value_set=users)))

    return without


@dataclass(frozen=True)
class Identified:
    """A batch's per-row hashing: the user keys and PAYLOAD hashes a lookup needs, and what a row
    found unchanged is settled with (row hash, masked identifiers, lookup hashes). It is a pure
    function of the batch (`identify`), so the delta's workers do it where the batch is prepared,
    and the run's own process, which holds the state connection, only looks up and compares:
    on a restamped snapshot the hashing was two thirds of that process's work, and the process
    was the delta's bound while its workers waited."""

    #: each row's `user_key`
    keys: pa.Array
    #: each row's `payload_hash` (null where PAYLOAD is); None when the batch has no PAYLOAD
    payload_hashes: pa.Array | None
    #: rows whose identifiers have no exact text form: keyed by a placeholder, never matched
    unmatched: tuple[int, ...] = ()
    #: each row's `row_hash`, when the batch came without them (`identify`'s `hash_columns`)
    row_hashes: pa.Array | None = None
    #: each row's identifiers masked, and their lookup hashes: what a row is settled and logged
    #: with, so a row found unchanged is settled by the run's process without going to a worker
    #: again, and a row that goes on is not hashed twice
    shown: pa.Array | None = None
    lookups: pa.Array | None = None


def identify(
    rows: pa.RecordBatch | pa.Table, hash_columns: tuple[str, ...] = (), lookup_key: bytes | None = None
) -> Identified:
    """The user key, PAYLOAD hash, masked identifiers and lookup hashes of every row of a batch,
    and its row hashes when `hash_columns` are given (the batch came without them)."""
    arrays, problems = identifier_arrays(rows)
    keys = pa.array(column_user_keys(arrays, rows.num_rows), pa.string())
    digests = None
    if "PAYLOAD" in rows.schema.names:
        digests = pa.array(column_payload_hashes(rows.column("PAYLOAD")), pa.string())
    shown = lookups = None
    try:
        shown = pa.array(mask_identifier_columns(arrays, rows.num_rows), pa.string())
        lookups = pa.array(column_lookup_hashes(arrays, rows.num_rows, lookup_key), pa.string())
    except Exception:  # noqa: BLE001 - left to preparing the batch, which takes it apart row by row
        shown = lookups = None
    return Identified(
        keys,
        digests,
        tuple(sorted(problems)),
        pa.array(located_batch_hashes(rows, hash_columns), pa.string()) if hash_columns else None,
        shown,
        lookups,
    )


@dataclass(frozen=True)
class KnownUsers:
    """What was found of one batch's users: each row's user key; the rows whose PAYLOAD is
    exactly the one Braze last accepted from this sync (position -> the data points that saves),
    set aside unread; what the state remembers of the other rows' users (`before`); and the
    rows' PAYLOAD hashes (null where not computed). Columns stay Arrow arrays: this goes to a
    worker with its batch, and Arrow buffers pickle as they are, Python strings one by one."""

    keys: pa.Array
    before: dict[str, Remembered]
    payload_hashes: pa.Array
    unchanged: dict[int, int]
    #: rows whose user had an earlier row in the delta: diffed as if nothing were remembered
    repeated: frozenset[int] = frozenset()
    #: the rows' masked identifiers and lookup hashes (`Identified`), when computed already
    shown: pa.Array | None = None
    lookups: pa.Array | None = None

    @classmethod
    def find(
        cls,
        batches: Sequence[pa.RecordBatch | pa.Table],
        remembered: Lookup,
        identified: Sequence[Identified] | None = None,
        seen: SeenUsers | None = None,
        always_sent: frozenset[str] = frozenset(),
    ) -> list[KnownUsers]:
        """One `KnownUsers` per batch, from one lookup of all their users (and a second, of the
        remembered attributes, for the users whose PAYLOAD changed). `identified`: each batch's
        `identify`, when it was done elsewhere (None: done here). `seen`: the delta's rows so
        far; a row whose user had an older row with another PAYLOAD in the delta (`SeenUsers`)
        is treated as a user nothing is remembered of (sent whole), since what was accepted
        before the run is no longer what Braze will hold when it arrives. `always_sent`: the
        sync's own `always_send` keys (`AttributeDiff.listed`); a PAYLOAD that may hold one is
        diffed, never set aside for matching the last accepted text, which may have been
        accepted before the key was listed."""
        ids = list(identified) if identified is not None else [identify(rows) for rows in batches]
        digests = [
            i.payload_hashes if i.payload_hashes is not None else pa.nulls(rows.num_rows, pa.string())
            for rows, i in zip(batches, ids, strict=True)
        ]
        every_key = pa.concat_arrays([i.keys for i in ids]) if ids else pa.array([], pa.string())
        found = remembered(pc.unique(every_key), False)
        if not found.num_rows:
            if seen is not None:  # noted all the same: a later row may find them
                seen.repeated(every_key, _row_parts(batches, digests))
            return [
                cls(i.keys, {}, d, {}, shown=i.shown, lookups=i.lookups)
                for i, d in zip(ids, digests, strict=True)
            ]
        column = {name: found.column(name).combine_chunks() for name in found.column_names}
        # where each row's user is in `found`, for all the batches at once (one hash table)
        at = pc.index_in(every_key, value_set=column["user_key"])
        again = seen.repeated(every_key, _row_parts(batches, digests)) if seen is not None else None
        if again is not None:
            at = pc.if_else(again, pa.nulls(len(at), at.type), at)
        starts = np.cumsum([0] + [len(i.keys) for i in ids]).tolist()
        matches = [
            _match(d, _unless(i.unmatched, at.slice(start, len(i.keys))), column, may_hold(rows, always_sent))
            for rows, i, d, start in zip(batches, ids, digests, starts[:-1], strict=True)
        ]
        changed = [pc.filter(i.keys, differing) for i, (_, differing) in zip(ids, matches, strict=True)]
        before: dict[str, Remembered] = {}
        if any(len(c) for c in changed):
            texts = remembered(pc.unique(pa.concat_arrays(changed)), True).to_pylist()
            before = {
                row["user_key"]: Remembered(row["payload_hash"], row["attributes"], row["payload_attributes"])
                for row in texts
            }
        repeats = [
            frozenset(np.flatnonzero(again.slice(start, len(i.keys)).to_numpy(zero_copy_only=False)).tolist())
            if again is not None
            else frozenset()
            for i, start in zip(ids, starts[:-1], strict=True)
        ]
        return [
            cls(
                i.keys,
                {key: before[key] for key in set(c.to_pylist()) if key in before},
                d,
                unchanged,
                r,
                i.shown,
                i.lookups,
            )
            for i, d, c, (unchanged, _), r in zip(ids, digests, changed, matches, repeats, strict=True)
        ]

    @classmethod
    def nothing(cls, rows: pa.RecordBatch | pa.Table) -> KnownUsers:
        """Nothing remembered of any of the batch's users."""
        keys = pa.array(column_user_keys(identifier_arrays(rows)[0], rows.num_rows), pa.string())
        return cls(keys, {}, pa.nulls(rows.num_rows, pa.string()), {})

    @classmethod
    def concat(cls, parts: Sequence[KnownUsers]) -> KnownUsers:
        """Several batches' `KnownUsers` as one, for the batches' rows taken together in order
        (rows set aside as unchanged already: `unchanged` is empty in each)."""
        if any(part.unchanged for part in parts):
            raise ValueError("batches are taken together only once their unchanged rows are set aside")
        starts = np.cumsum([0] + [len(part.keys) for part in parts]).tolist()

        def joined(arrays: list[pa.Array | None]) -> pa.Array | None:
            return None if any(a is None for a in arrays) else pa.concat_arrays(arrays)

        return cls(
            pa.concat_arrays([part.keys for part in parts]),
            {key: value for part in parts for key, value in part.before.items()},
            pa.concat_arrays([part.payload_hashes for part in parts]),
            {},
            frozenset(start + i for part, start in zip(parts, starts, strict=False) for i in part.repeated),
            joined([part.shown for part in parts]),
            joined([part.lookups for part in parts]),
        )

    def take(self, positions: list[int]) -> KnownUsers:
        """The rows at `positions`, in that order."""
        at = pa.array(positions, pa.int64())
        return KnownUsers(
            self.keys.take(at),
            self.before,
            self.payload_hashes.take(at),
            {n: self.unchanged[i] for n, i in enumerate(positions) if i in self.unchanged},
            frozenset(n for n, i in enumerate(positions) if i in self.repeated),
            None if self.shown is None else self.shown.take(at),
            None if self.lookups is None else self.lookups.take(at),
        )


def _unless(unmatched: tuple[int, ...], at: pa.Array) -> pa.Array:
    """`at` with the rows whose identifiers have no exact text form taken out: their user key
    was made from a placeholder, so they are never matched; validation rejects them."""
    if not unmatched:
        return at
    mask = np.zeros(len(at), dtype=bool)
    mask[list(unmatched)] = True
    return pc.if_else(pa.array(mask), pa.nulls(len(at), at.type), at)


def may_hold(rows: pa.RecordBatch | pa.Table, keys: frozenset[str]) -> pa.Array | None:
    """Which rows' PAYLOAD may hold one of `keys` at its top level (None: none can). Text is
    searched for each key as JSON writes it, quotes included, and a text with a `\\u` or `\\/`
    escape (a key may be written so) is taken to hold one; a value equal to a key only sends
    that row through the diff. A typed PAYLOAD (a struct) holds a key when its type has the
    field; other types are taken to hold one."""
    if not keys or "PAYLOAD" not in rows.schema.names:
        return None
    column = rows.column("PAYLOAD")
    kind = column.type
    if pa.types.is_struct(kind):
        if any(kind.field(n).name in keys for n in range(kind.num_fields)):
            return pa.array([True] * rows.num_rows, pa.bool_())
        return None
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)):
        return pa.array([True] * rows.num_rows, pa.bool_())  # no text to search: diff them all
    found = pc.fill_null(pc.match_substring_regex(column, r"\\[u/]"), False)
    for key in sorted(keys):
        hit = pc.fill_null(pc.match_substring(column, orjson.dumps(key).decode()), False)
        found = pc.or_(found, hit)
    return found.combine_chunks() if isinstance(found, pa.ChunkedArray) else found


def _match(
    digests: pa.Array, at: pa.Array, found: dict[str, pa.Array], holding: pa.Array | None = None
) -> tuple[dict[int, int], pa.Array]:
    """A batch's PAYLOAD hashes (`digests`) against the remembered users `found` (`at`: where
    each row's user is there, null when nowhere): its rows unchanged (position -> data points
    saved), and which rows' users are remembered with another PAYLOAD. `holding`: rows never
    unchanged by their hash alone (`may_hold`), diffed like those with another PAYLOAD."""
    if at.null_count == len(at):
        return {}, pa.array([False] * len(at), pa.bool_())
    last = found["payload_hash"].take(at)
    same = pc.fill_null(pc.equal(digests, last), False)
    if holding is not None:
        same = pc.and_(same, pc.invert(holding))
    saved = found["payload_attributes"].take(pc.filter(at, same)).to_pylist()
    same_at = np.flatnonzero(same.to_numpy(zero_copy_only=False)).tolist()
    differing = pc.and_(pc.is_valid(at), pc.invert(same))
    return dict(zip(same_at, saved, strict=True)), differing


def _row_parts(batches: Sequence[pa.RecordBatch | pa.Table], digests: Sequence[pa.Array]) -> pa.Table:
    """Each row's PAYLOAD hash and UPDATED_AT (as stored: a timestamp as its integer, never as
    text, which cost more than the rest of the lookup)."""
    stamps = []
    for rows in batches:
        column = rows.column("UPDATED_AT") if "UPDATED_AT" in rows.schema.names else None
        if column is None:
            stamps.append(pa.nulls(rows.num_rows, pa.int64()))
            continue
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_timestamp(column.type) or pa.types.is_integer(column.type):
            stamps.append(column.cast(pa.int64()))
        else:  # a stamp validation will reject; still the same for copies of one row
            stamps.append(
                pa.array([None if v is None else hash(str(v)) for v in column.to_pylist()], pa.int64())
            )
    return pa.table(
        {
            "payload": pa.concat_arrays(list(digests)) if digests else pa.array([], pa.string()),
            "stamp": pa.concat_arrays(stamps) if stamps else pa.array([], pa.int64()),
        }
    )


class SeenUsers:
    """The rows of a delta's users so far, to tell a row whose user had another, older row in it.

    Two rows of one user in a run, each diffed against what Braze accepted before the run, would
    leave Braze at the wrong value: X accepted, then rows A and X, and the second is "unchanged"
    while Braze holds A. So a row goes whole when its user had a row with another PAYLOAD stamped
    no later than it, earlier in the delta. The same PAYLOAD restamped is not another row (a
    change log re-emitting a row keeps its savings). A row older than one already seen is diffed
    against what was accepted before the run, as it came: the rows go in scan order, as they
    would whole, and Braze applies what is sent last; the diff only never sends less than that
    order needs. The rows are kept in an
    in-memory DuckDB table of 64-bit hashes, which spills past its memory limit."""

    def __init__(self) -> None:
        self._con = duckdb.connect(config={"memory_limit": "128MB"})
        # 64-bit hashes of the user key and of the PAYLOAD: one lookup of 100,000 rows against a
        # million seen took 50 ms of CPU, against 500 ms with the texts themselves. A collision
        # of two users only sends a row whole; of two PAYLOADs of one user, 1 in 2^64.
        self._con.execute("CREATE TABLE seen (user_hash UBIGINT, payload_hash UBIGINT, stamp BIGINT)")

    def repeated(self, keys: pa.Array, rows: pa.Table) -> pa.Array | None:
        """Which rows (`keys`, in delta order, and each row's `_row_parts`) had an earlier row of
        their user, in this call or before, with another PAYLOAD and a stamp no later than
        theirs; None when none had. Every row is then noted."""
        if not len(keys):
            return None
        batch = rows.append_column("user_key", keys).append_column("pos", pa.array(np.arange(len(keys))))
        self._con.register("batch", batch)
        try:
            self._con.execute(
                "CREATE OR REPLACE TEMP TABLE hashed AS SELECT pos, hash(user_key) AS user_hash, "
                "hash(payload) AS payload_hash, coalesce(stamp, 0) AS stamp FROM batch"
            )
            again = self._con.execute(
                "SELECT h.pos FROM hashed h JOIN seen s ON s.user_hash = h.user_hash "
                "AND s.payload_hash <> h.payload_hash AND s.stamp <= h.stamp "
                "UNION SELECT h.pos FROM hashed h JOIN hashed e ON e.user_hash = h.user_hash "
                "AND e.pos < h.pos AND e.payload_hash <> h.payload_hash AND e.stamp <= h.stamp"
            ).fetchnumpy()["pos"]
            self._con.execute("INSERT INTO seen SELECT user_hash, payload_hash, stamp FROM hashed")
        finally:
            self._con.unregister("batch")
        if not len(again):
            return None
        mask = np.zeros(len(keys), dtype=bool)
        mask[again] = True
        return pa.array(mask)

    def close(self) -> None:
        self._con.close()
