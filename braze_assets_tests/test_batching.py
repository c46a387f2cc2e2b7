"""Request planning (`braze_assets.request_plan.plan_requests`) against Braze's per-request limits.

`/users/track`: at most 75 objects in total per request and a body of at most 4 MB [B1.2].
`/users/delete`: at most 50 identifiers per request, of exactly one identifier type [B2].
"""

from __future__ import annotations

import math
import random
from collections import Counter

import orjson
import pytest

from braze_assets.braze import contract
from braze_assets.datatypes import DATA_TYPES
from braze_assets.request_plan import plan_requests

TRACK_MAX_OBJECTS = 75  # [B1.2] current default, combined across the three arrays
# [B1.2] "bodies up to 4 MB": the sender keeps under 4,000,000 bytes, within either reading.
MAX_BODY_BYTES = contract.SEND_BODY_MAX_BYTES
assert MAX_BODY_BYTES <= 4 * 1000 * 1000 <= contract.MAX_BODY_BYTES
DELETE_MAX_IDS = 50  # [B2]
DELETE_KEYS = {"external_ids", "user_aliases", "braze_ids"}
TRACK_TYPES = ["attributes", "events", "purchases"]


def track_object(data_type: str, i: int, blob_bytes: int = 0) -> dict:
    base = {"external_id": f"user-{i}"}
    if data_type == "events":
        base |= {"name": "app_open", "time": "2024-05-01T12:00:00.000Z"}
    elif data_type == "purchases":
        base |= {
            "product_id": "sku-tee",
            "currency": "USD",
            "price": 12.5,
            "time": "2024-05-01T12:00:00.000Z",
        }
    else:
        base |= {"plan": "gold", "_update_existing_only": False}
    if blob_bytes:
        base["properties" if data_type != "attributes" else "notes"] = (
            {"blob": "x" * blob_bytes} if data_type != "attributes" else "x" * blob_bytes
        )
    return base


def check_track_plan(data_type: str, objects: list[dict]) -> list:
    """Plan `objects` and check every invariant; return the requests."""
    spec = DATA_TYPES[data_type]
    raw = [orjson.dumps(o) for o in objects]
    requests = plan_requests(spec, raw, "run1-0")
    seen: list[int] = []
    for request in requests:
        assert 1 <= len(request.rows) <= TRACK_MAX_OBJECTS
        assert len(request.body) <= MAX_BODY_BYTES
        assert request.array == data_type
        body = orjson.loads(request.body)  # valid JSON ...
        assert list(body) == [data_type]  # ... holding only this data type's array
        assert body[data_type] == [objects[i] for i in request.rows]
        seen.extend(request.rows)
    # Every object exactly once, in order.
    assert seen == list(range(len(objects)))
    ids = [r.batch_id for r in requests]
    assert len(set(ids)) == len(ids) and all(i.startswith("run1-0-") for i in ids)
    return requests


def assert_filled_greedily(requests, objects_raw: list[bytes]) -> None:
    """No request was closed early: the next object would have broken a limit."""
    for request, following in zip(requests, requests[1:], strict=False):
        nxt = objects_raw[following.rows[0]]
        assert len(request.rows) == TRACK_MAX_OBJECTS or len(request.body) + 1 + len(nxt) > MAX_BODY_BYTES, (
            request.batch_id
        )


# ----------------------------------------------------------------------------- /users/track
@pytest.mark.parametrize("data_type", TRACK_TYPES)
@pytest.mark.parametrize("count", [1, 74, 75, 76, 150, 151, 1000])
def test_track_requests_hold_at_most_75_objects(data_type, count):
    requests = check_track_plan(data_type, [track_object(data_type, i) for i in range(count)])
    assert len(requests) == math.ceil(count / TRACK_MAX_OBJECTS)
    assert [len(r.rows) for r in requests[:-1]] == [TRACK_MAX_OBJECTS] * (len(requests) - 1)


def test_no_objects_make_no_requests():
    assert plan_requests(DATA_TYPES["attributes"], [], "run1-0") == []
    assert plan_requests(DATA_TYPES["deletions"], [], "run1-0") == []


@pytest.mark.parametrize("data_type", TRACK_TYPES)
def test_track_bodies_stay_under_4mb_with_900kb_objects(data_type):
    objects = [track_object(data_type, i, blob_bytes=900_000) for i in range(11)]
    raw = [orjson.dumps(o) for o in objects]
    assert all(900_000 < len(r) < 901_000 for r in raw)
    requests = check_track_plan(data_type, objects)
    # Four ~900 KB objects fit in 4 MB, five do not: 4 + 4 + 3.
    assert [len(r.rows) for r in requests] == [4, 4, 3]
    assert all(len(r.body) > 3_600_000 for r in requests[:2])
    assert_filled_greedily(requests, raw)


def test_mixed_sizes_respect_both_limits_and_keep_order():
    rng = random.Random(20240501)
    objects = []
    for i in range(400):
        pick = rng.random()
        size = rng.randint(500_000, 1_000_000) if pick < 0.04 else rng.randint(0, 20_000)
        objects.append(track_object("attributes", i, blob_bytes=size))
    raw = [orjson.dumps(o) for o in objects]
    requests = check_track_plan("attributes", objects)
    assert_filled_greedily(requests, raw)
    # Both limits actually bound some request in this mix.
    assert any(len(r.rows) == TRACK_MAX_OBJECTS for r in requests)
    assert any(len(r.rows) < TRACK_MAX_OBJECTS and r is not requests[-1] for r in requests)


def test_object_bytes_are_sent_unchanged():
    # Unicode, nested objects and explicit nulls survive planning byte for byte.
    objects = [
        {
            "external_id": f"user-{i}",
            "name": "Zoë 🎉",
            "dob": None,
            "pets": {"$add": [{"id": i, "kind": "cat"}]},
            "_merge_objects": True,
        }
        for i in range(80)
    ]
    raw = [orjson.dumps(o) for o in objects]
    requests = plan_requests(DATA_TYPES["attributes"], raw, "p")
    assert [len(r.rows) for r in requests] == [75, 5]
    for request in requests:
        assert request.body == b'{"attributes":[' + b",".join(raw[i] for i in request.rows) + b"]}"


# ----------------------------------------------------------------------------- /users/delete
def deletion_objects(rng: random.Random, counts: dict[str, int]) -> list[list]:
    kinds = [k for k, n in counts.items() for _ in range(n)]
    rng.shuffle(kinds)  # interleave the identifier types
    objects, serial = [], Counter()
    for kind in kinds:
        serial[kind] += 1
        n = serial[kind]
        value = (
            {"alias_name": f"alias-{n}", "alias_label": "crm"}
            if kind == "user_aliases"
            else f"{kind[:-1]}-{n}"
        )
        objects.append([kind, value])
    return objects


@pytest.mark.parametrize(
    "counts",
    [
        {"external_ids": 130, "user_aliases": 60, "braze_ids": 55},
        {"external_ids": 50, "user_aliases": 1, "braze_ids": 100},
        {"external_ids": 3, "user_aliases": 2, "braze_ids": 1},
    ],
)
def test_deletions_hold_at_most_50_ids_of_one_type(counts):
    objects = deletion_objects(random.Random(7), counts)
    requests = plan_requests(DATA_TYPES["deletions"], [orjson.dumps(o) for o in objects], "run1-0")

    seen: list[int] = []
    per_key: dict[str, list] = {k: [] for k in counts}
    for request in requests:
        body = orjson.loads(request.body)
        assert len(body) == 1, body.keys()  # one identifier type per request
        ((key, ids),) = body.items()
        assert key in DELETE_KEYS and key == request.array
        assert 1 <= len(ids) <= DELETE_MAX_IDS
        # The body lists exactly the request's rows, in row order, all of this type.
        assert ids == [objects[i][1] for i in request.rows]
        assert all(objects[i][0] == key for i in request.rows)
        assert request.rows == sorted(request.rows)
        per_key[key].extend(ids)
        seen.extend(request.rows)

    assert sorted(seen) == list(range(len(objects)))  # every deletion exactly once
    for key in counts:  # and, per type, in the original order
        assert per_key[key] == [o[1] for o in objects if o[0] == key]
    assert len(requests) == sum(math.ceil(n / DELETE_MAX_IDS) for n in counts.values())
    ids = [r.batch_id for r in requests]
    assert len(set(ids)) == len(ids)


def test_deletions_of_one_type_fill_requests_of_50():
    objects = [["external_ids", f"user-{i}"] for i in range(120)]
    requests = plan_requests(DATA_TYPES["deletions"], [orjson.dumps(o) for o in objects], "p")
    assert [len(r.rows) for r in requests] == [50, 50, 20]
    assert orjson.loads(requests[2].body) == {"external_ids": [f"user-{i}" for i in range(100, 120)]}
