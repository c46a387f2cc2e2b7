"""Braze requests planned from serialized objects, within Braze's per-request limits: at most
75 objects and 4 MB for `/users/track`, 50 ids of one type for `/users/delete`, 50 items of one
operation for catalogs. Delivery sends them; the dry run counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from braze_assets.braze import contract
from braze_assets.datatypes import DataTypeSpec
from braze_assets.json_bytes import json_bytes


@dataclass
class PlannedRequest:
    """One request's body and the chunk rows it carries."""

    batch_id: str
    body: bytes
    rows: list[int]  # positions in the chunk
    array: str  # track array, or the delete id key


def plan_requests(spec: DataTypeSpec, objects: list[bytes], batch_prefix: str) -> list[PlannedRequest]:
    """Group serialized objects into requests within Braze's per-request limits [B1.2][B2]."""
    groups: dict[str, list[int]] = {}
    item_ids: list[str] = []
    if spec.track_array:
        groups[spec.track_array] = list(range(len(objects)))
        payloads = objects
    else:  # deletions: one identifier type per request; catalogs: one op (PUT, DELETE)
        payloads = []
        for i, raw in enumerate(objects):
            key, value = orjson.loads(raw)
            groups.setdefault(key, []).append(i)
            payloads.append(json_bytes(value))
            if spec.request_key is not None:  # catalogs: Braze refuses an id twice in a request
                item_ids.append(value["id"])
    requests: list[PlannedRequest] = []
    for array, positions in groups.items():
        head = b'{"' + (spec.request_key or array).encode() + b'":['
        for rows in _fill(positions, payloads, spec.max_per_request, len(head) + 2, item_ids):
            body = head + b",".join(payloads[i] for i in rows) + b"]}"
            requests.append(PlannedRequest(f"{batch_prefix}-{len(requests)}", body, rows, array))
    return requests


def _fill(
    positions: list[int], payloads: list[bytes], max_objects: int, overhead: int, item_ids: list[str]
) -> list[list[int]]:
    """Consecutive groups of `positions`, each at most `max_objects` long and whose payloads,
    comma-joined plus `overhead` bytes, fit Braze's body limit; with `item_ids` (catalogs, by
    position), none holding an id twice (two rows of one item in a run go in order, apart)."""
    groups: list[list[int]] = []
    current: list[int] = []
    ids: set[str] = set()
    size = overhead
    for i in positions:
        extra = len(payloads[i]) + 1
        repeated = bool(item_ids) and item_ids[i] in ids
        if current and (
            len(current) == max_objects or size + extra > contract.SEND_BODY_MAX_BYTES or repeated
        ):
            groups.append(current)
            current, size = [], overhead
            ids.clear()
        current.append(i)
        if item_ids:
            ids.add(item_ids[i])
        size += extra
    if current:
        groups.append(current)
    return groups
