"""What a person's reconcile needs to ask Braze about a held event or purchase.

A held row's outcome is unknown (docs/architecture.md, Delivery guarantees). For events and
purchases Braze can be asked afterwards (`release.py`): that needs the unmasked identifier, the
event name or product_id and the time sent, kept beside the ledger until the row stops being held.
"""

from __future__ import annotations

import datetime as dt
import re

import orjson
import pyarrow as pa

HELD_DETAILS_SCHEMA = pa.schema(
    [
        ("row_hash", pa.string()),
        ("id_type", pa.string()),  # external_id | user_alias | braze_id | email | phone
        ("id_value", pa.string()),  # user_alias: {"alias_name": .., "alias_label": ..} as JSON
        ("kind", pa.string()),  # event | purchase
        ("name", pa.string()),  # the event name or the product_id
        ("sent_time", pa.timestamp("us", tz="UTC")),  # the object's `time` (else UPDATED_AT)
    ]
)
#: How Braze picks the user an object names [B1.3]: the first of these the object carries.
_IDENTITY_ORDER = ("external_id", "user_alias", "braze_id", "email", "phone")
_JAVA_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}):(\d{3})(Z|[+-]\d{4})$")


def _sent_time(value: object) -> dt.datetime | None:
    """An object's `time` (ISO 8601 or `yyyy-MM-dd'T'HH:mm:ss:SSSZ`) in UTC; naive means UTC."""
    if not isinstance(value, str):
        return None
    java = _JAVA_TIME.match(value)
    if java:
        value = f"{java[1]}.{java[2]}{'+0000' if java[3] == 'Z' else java[3]}"
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def held_detail(raw: bytes) -> tuple[str, str, str, str, dt.datetime] | None:
    """What reconcile needs of a sent object: (id_type, id_value, kind, name, time), or None for
    objects Braze cannot be asked about (attributes, deletions)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None  # a deletion: [key, id]
    if isinstance(obj.get("product_id"), str):
        kind, name = "purchase", obj["product_id"]
    elif isinstance(obj.get("name"), str):
        kind, name = "event", obj["name"]
    else:
        return None
    sent = _sent_time(obj.get("time"))
    id_type = next((key for key in _IDENTITY_ORDER if obj.get(key) is not None), None)
    if sent is None or id_type is None:
        return None
    value = obj[id_type]
    if id_type == "user_alias":
        if not isinstance(value, dict):
            return None
        value = alias_key(value.get("alias_name"), value.get("alias_label"))
    return id_type, str(value), kind, name, sent


def alias_key(name: object, label: object) -> str:
    """A user alias as `held_details.id_value` keeps it."""
    return orjson.dumps({"alias_name": name, "alias_label": label}).decode()


def held_details_table(objects: dict[str, bytes | None]) -> pa.Table:
    """The details of the held rows whose objects are given (rows Braze cannot be asked about,
    or whose object was not found, have none)."""
    rows = [
        (h, *detail)
        for h, raw in objects.items()
        if raw is not None and (detail := held_detail(raw)) is not None
    ]
    return pa.Table.from_pylist(
        [dict(zip(HELD_DETAILS_SCHEMA.names, r, strict=True)) for r in rows], HELD_DETAILS_SCHEMA
    )
