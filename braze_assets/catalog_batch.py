"""A batch of catalog rows prepared for the delta's files: the valid rows as catalog items, the
others rejected with their reasons.

Catalog rows share nothing with users' rows but the files they go to: no identifiers to mask or
hash, no pandera schema, no attribute diff; `catalog_items.py` checks them. So their preparation
is a module of its own rather than a branch of the users' path (`delta_batch.py`, which hands
catalog batches here). It is not part of `catalog_items.py`, which turns rows into items and knows
nothing of deltas. It fills the `Prepared` it is given, whose class it imports for type checking
only: `delta_batch.py` imports this module, so there is no import cycle at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from braze_assets.catalog_items import check_catalog_rows
from braze_assets.delta_schema import REJECTED_SCHEMA, VALID_SCHEMA, no_diff_columns, reason_key
from braze_assets.masking import mask_payload

if TYPE_CHECKING:
    from braze_assets.delta_batch import Prepared


def prepare_items(rows: pa.RecordBatch | pa.Table, hashes: list[str], prepared: Prepared) -> None:
    """Catalog rows (`catalog_items.py`) into `prepared`: items by id, never user identifiers."""
    checked = check_catalog_rows(rows)
    stamps = rows.column("UPDATED_AT").cast(pa.timestamp("us", tz="UTC"))
    shown = checked.shown
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
