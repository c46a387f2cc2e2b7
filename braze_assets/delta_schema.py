"""What a delta's Parquet files hold: the schemas of its valid, unchanged and rejected rows, and
how rejection reasons are grouped for counting.

Three modules make these files: `delta_batch.py` prepares users' rows, `catalog_batch.py`
catalog items, and `delta_writer.py` appends both to the same files. The schemas are the one
thing all three must agree on, so they live here, apart from any of them; `reason_key` too, which
delivery also uses to group Braze's failure messages the way the delta groups its reasons.
"""

from __future__ import annotations

import pyarrow as pa

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


def reason_key(reason: str) -> str:
    """Group reasons for counting: row-specific detail always follows the first ': ', unless what
    comes before it is a quoted name (Braze's "'visits': 'inc' must be a number"): then the
    whole message is the reason."""
    head, sep, _ = reason.partition(": ")
    return reason if not sep or head.startswith(("'", '"')) else head
