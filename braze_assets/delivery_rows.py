"""The rows delivery writes to the state, built column-wise from a chunk of the delta.

A chunk is 20,000 rows; building these tables with a loop per row cost more than sending the
chunk, so every function here works on Arrow columns. What each ledger status means is in
`state/base.py`; what the remembered attributes are is in `attribute_diff.py`.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from braze_assets.delivery_answers import RESENT_UNKNOWN, UNSURE
from braze_assets.state.base import REMEMBERED_COLUMNS


def lookup_column(rows: pa.Table) -> pa.Array | pa.ChunkedArray:
    """The rows' lookup hashes (`lookup.py`); null for a delta written before they were kept."""
    if "identifier_hash" in rows.column_names:
        return rows["identifier_hash"]
    return pa.nulls(rows.num_rows, pa.string())


def ledger_rows(
    chunk: pa.Table,
    status: list[str | None],
    batch_ids: list[str],
    messages: list[str | None],
    run_id: str,
) -> pa.Table:
    """A chunk's settled rows, one status, request and message each. The objects go along:
    `StateStore.append` keeps held rows' details from them."""
    return pa.table(
        {
            "row_hash": chunk["row_hash"],
            "updated_at": chunk["updated_at"],
            "status": pa.array(status, pa.string()),
            "batch_id": pa.array(batch_ids, pa.string()),
            "identifier": chunk["identifier"],
            "identifier_hash": lookup_column(chunk),
            "message": pa.array(messages, pa.string()),
            "run_id": pa.array([run_id] * chunk.num_rows, pa.string()),
            "object": chunk["object"],
        }
    )


def unsent_rows(rows: pa.Table, status: str, message: pa.Array | pa.ChunkedArray, run_id: str) -> pa.Table:
    """Rows of a delta file settled without being sent (`invalid`, `unchanged`): no request."""
    return pa.table(
        {
            "row_hash": rows["row_hash"],
            "updated_at": rows["updated_at"],
            "status": pa.array([status] * rows.num_rows, pa.string()),
            "batch_id": pa.nulls(rows.num_rows, pa.string()),
            "identifier": rows["identifier"],
            "identifier_hash": lookup_column(rows),
            "message": message,
            "run_id": pa.array([run_id] * rows.num_rows, pa.string()),
        }
    )


def planned_rows(chunk: pa.Table, batch_of: list[str], run_id: str) -> pa.Table:
    """A chunk's rows as planned: each with the request it goes in."""
    return pa.table(
        {
            "row_hash": chunk["row_hash"],
            "updated_at": chunk["updated_at"],
            "batch_id": pa.array(batch_of, pa.string()),
            "identifier": chunk["identifier"],
            "identifier_hash": lookup_column(chunk),
            "run_id": pa.array([run_id] * chunk.num_rows, pa.string()),
            # the diff's user: recovery forgets what is remembered of it (state/base.py)
            "user_key": chunk["user_key"]
            if "user_key" in chunk.column_names
            else pa.nulls(chunk.num_rows, pa.string()),
        }
    )


#: How an object asking Braze to update only an existing user says so (objects are compact JSON).
#: Braze accepts such a row for a user it does not have and applies nothing, with nothing in its
#: answer to tell: so its user is known to hold nothing remembered, and the next row goes whole.
_UPDATE_ONLY = '"_update_existing_only":true'


def accepted_attributes(
    rows: pa.Table, status: list[str | None], messages: list[str | None] | None = None
) -> pa.Table:
    """What Braze holds now of the users whose rows it accepted (attribute_diff.py), one row per
    user, from the newest row accepted (`REMEMBERED_COLUMNS`); none for rows without a diff. A
    row accepted with `UNSURE` (`messages`), sent update-only, held, or left to be sent again
    after an unknown outcome (`RESENT_UNKNOWN`; Braze may have applied either) leaves its user
    known to hold nothing remembered (no PAYLOAD hash, no attribute), so that user's next row
    goes whole."""
    if "user_key" not in rows.column_names or rows["user_key"].null_count == rows.num_rows:
        return pa.table({name: pa.array([], pa.string()) for name in REMEMBERED_COLUMNS})
    statuses = pa.array(status, pa.string())
    # rows Braze may have applied without saying so: held, or left to be sent again
    maybe_applied = pc.fill_null(pc.equal(statuses, "held"), False)
    if messages is not None and RESENT_UNKNOWN in messages:
        again = pc.fill_null(pc.equal(pa.array(messages, pa.string()), RESENT_UNKNOWN), False)
        maybe_applied = pc.or_(maybe_applied, pc.and_(pc.is_null(statuses), again))
    recorded = pc.and_(  # rows that leave their user remembered: accepted, or maybe applied
        pc.or_(pc.fill_null(pc.equal(statuses, "accepted"), False), maybe_applied),
        pc.is_valid(rows["user_key"]),
    )
    # Only the columns kept, so the chunk's objects are never copied; a chunk whose users are
    # each accepted once (the usual case) needs no sort.
    remembered = ["user_key", "payload_hash", "remember", "payload_attributes"]  # REMEMBERED_COLUMNS
    chosen = rows.select([*remembered, "updated_at"])
    unsure: pa.Array | None = None
    if messages is not None and UNSURE in messages:
        unsure = pa.array([m == UNSURE for m in messages], pa.bool_())
    if "object" in rows.column_names:  # Braze may have applied an update-only row to nobody
        update_only = pc.match_substring(rows["object"], _UPDATE_ONLY)
        unsure = update_only if unsure is None else pc.or_(unsure, update_only)
    if pc.any(maybe_applied).as_py():
        unsure = maybe_applied if unsure is None else pc.or_(unsure, maybe_applied)
    if unsure is not None and pc.any(unsure).as_py():
        chosen = chosen.set_column(
            1, "payload_hash", pc.if_else(unsure, pa.scalar(None, pa.string()), chosen["payload_hash"])
        ).set_column(2, "remember", pc.if_else(unsure, "{}", chosen["remember"]))
    chosen = chosen.filter(pc.fill_null(recorded, False))
    if chosen.num_rows > 1 and pc.count_distinct(chosen["user_key"]).as_py() < chosen.num_rows:
        # Newest first within each user; on a tie the later row of the chunk wins.
        chosen = chosen.append_column("position", pa.array(range(chosen.num_rows), pa.int64()))
        order = pc.sort_indices(
            chosen,
            sort_keys=[("user_key", "ascending"), ("updated_at", "descending"), ("position", "descending")],
        )
        chosen = chosen.take(order)
        keys = chosen["user_key"].combine_chunks()
        first = pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))
        chosen = chosen.filter(pa.concat_arrays([pa.array([True]), first.cast(pa.bool_())]))
    return chosen.select(remembered).rename_columns(list(REMEMBERED_COLUMNS))
