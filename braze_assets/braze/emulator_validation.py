"""Request and object validation for the local Braze emulator, and how accepted objects apply.

Pure functions (no I/O, no state) that enforce the documented ``/users/track``, ``/users/delete`` and
``/users/export/ids`` contract. Section numbers refer to ``docs/braze-contract.md``. Request-level
violations raise :class:`RequestError` (the whole request is refused); object-level violations return
the error message that Braze puts in the ``errors`` array (B1.4, B1.5). The last section holds the
attribute-merge and profile-creation rules the emulator's store applies to valid objects (B1.1, B1.3).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeGuard

from braze_assets.braze.contract import (  # one source for the limits the client obeys too
    DELETE_ID_KEYS as DELETE_KEYS,
)
from braze_assets.braze.contract import (
    DELETE_MAX_IDS as MAX_DELETE_IDS,
)
from braze_assets.braze.contract import (
    EXTERNAL_ID_MAX_BYTES,
    MAX_NAME_CHARS,
)
from braze_assets.braze.contract import (
    ISO_4217_CURRENCIES as ISO_4217_CODES,
)
from braze_assets.braze.contract import (
    TRACK_MAX_OBJECTS as MAX_TRACK_OBJECTS,
)

TRACK_ARRAYS = ("attributes", "events", "purchases")  # B1.4: processing order
RESERVED_PROPERTY_KEYS = frozenset({"time", "event_name"})  # B1.1 event object

# Messages marked with a section are Braze's own strings (documented or seen in fixtures); the rest are
# the emulator's wording where Braze documents none (B1.5, D).
MSG_IDENTIFIER_REQUIRED = "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"  # B1.5
MSG_TWO_PRIMARIES = "Only one of 'external_id', 'braze_id' or 'user_alias' may be provided"
MSG_BAD_ALIAS = "'user_alias' must be an object with non-empty string 'alias_name' and 'alias_label'"
MSG_BAD_EXTERNAL_ID = "'external_id' must be a non-empty string"
MSG_EXTERNAL_ID_TOO_LARGE = "EXTERNAL_USER_ID_TOO_LARGE"  # B1.3, B1.5
MSG_BAD_BRAZE_ID = "'braze_id' must be a non-empty string"
MSG_BAD_EMAIL = "The value provided for the 'email' field is not a valid email."  # B1.5
MSG_BAD_PHONE = "The value provided for the 'phone' field is not a valid phone number."
MSG_BAD_QUANTITY = "'quantity' is not valid"  # B1.5
MSG_NOT_OBJECT = "Each element must be a JSON object"
MSG_ALL_INVALID = "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."  # B1.4
MSG_MAX_INPUT = "Max Input Length Exceeded"  # B1.2
MSG_MAX_IDS = "The max number of ids per request was exceeded"  # B2

_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
_PHONE_RE = re.compile(r"^\+?[0-9][0-9 ().\-]{5,30}$")
_JAVA_TIME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}):(\d{3})(Z|[+-]\d{4})$")
_PRIORITIZATION = frozenset({"identified", "unidentified", "most_recently_updated"})
# Keys of an attributes object that are not profile attributes (B1.1).
CONTROL_KEYS = frozenset(
    {"external_id", "user_alias", "braze_id", "_update_existing_only", "_merge_objects", "push_token_import"}
)


class RequestError(Exception):
    """The whole request is refused with ``status`` and ``{"message": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Identity(NamedTuple):
    """How an object names its user (B1.3)."""

    type: str  # external_id | user_alias | braze_id | email | phone
    value: Any  # str, or (alias_name, alias_label) for user_alias
    key: str  # identity_key(type, value)


class ExportRequest(NamedTuple):
    """A valid ``/users/export/ids`` body: whom to export and which fields (``None``: all)."""

    external_ids: tuple[str, ...] = ()
    user_aliases: tuple[tuple[str, str], ...] = ()
    braze_id: str | None = None
    email: str | None = None
    phone: str | None = None
    device_id: str | None = None
    fields: frozenset[str] | None = None


class DeleteId(NamedTuple):
    """One identifier of a /users/delete request (B2); ``prioritization`` only for email and phone."""

    type: str  # external_id | user_alias | braze_id | email | phone
    id: Any  # str, or {"alias_name", "alias_label"} for user_alias
    prioritization: tuple[str, ...] = ()


def _is_text(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value != ""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def valid_email(value: Any) -> bool:
    """EMAIL_BAD_FORMAT check (B1.5): one ``@`` and a dotted domain, no whitespace."""
    return isinstance(value, str) and _EMAIL_RE.match(value) is not None


def valid_phone(value: Any) -> bool:
    """Phone works as an identifier only when valid (B1.3); E.164 is recommended (B1.1)."""
    return isinstance(value, str) and _PHONE_RE.match(value) is not None


def valid_time(value: Any) -> bool:
    """Event/purchase ``time``: ISO 8601 or ``yyyy-MM-dd'T'HH:mm:ss:SSSZ`` (B1.1, A2.2)."""
    if not isinstance(value, str):
        return False
    java = _JAVA_TIME_RE.match(value)
    if java:
        value = f"{java[1]}.{java[2]}{java[3]}"
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def parse_time(value: str) -> datetime:
    """A ``time`` that :func:`valid_time` accepted, as an aware UTC datetime (naive means UTC)."""
    java = _JAVA_TIME_RE.match(value)
    if java:
        value = f"{java[1]}.{java[2]}{java[3]}"
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def format_time(value: datetime) -> str:
    """Braze's export form of a time: ISO 8601 in UTC with milliseconds, ``2024-05-01T12:00:00.000Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def identity_key(id_type: str, value: Any) -> str:
    """Stable key of an identifier, e.g. ``external_id:u1``; emails compare case-insensitively and phones
    by their digits, so one user has one key."""
    if id_type == "user_alias":
        return f"user_alias:{value[0]}:{value[1]}"
    if id_type == "email":
        return f"email:{value.lower()}"
    if id_type == "phone":
        return "phone:" + "".join(ch for ch in value if ch.isdigit())
    return f"{id_type}:{value}"


def resolve_identity(obj: dict) -> Identity | str:
    """Apply B1.3: one primary identifier, else email (wins) or phone; returns an error message if not."""
    external_id, alias, braze_id = obj.get("external_id"), obj.get("user_alias"), obj.get("braze_id")
    if external_id is not None:
        if alias is not None or braze_id is not None:
            return MSG_TWO_PRIMARIES
        if not isinstance(external_id, str) or not external_id:
            return MSG_BAD_EXTERNAL_ID
        if len(external_id.encode()) > EXTERNAL_ID_MAX_BYTES:
            return MSG_EXTERNAL_ID_TOO_LARGE
        return Identity("external_id", external_id, "external_id:" + external_id)
    if alias is not None:
        if braze_id is not None:
            return MSG_TWO_PRIMARIES
        if not (
            isinstance(alias, dict)
            and _is_text(alias.get("alias_name"))
            and _is_text(alias.get("alias_label"))
        ):
            return MSG_BAD_ALIAS
        value = (alias["alias_name"], alias["alias_label"])
        return Identity("user_alias", value, identity_key("user_alias", value))
    if braze_id is not None:
        if not _is_text(braze_id):
            return MSG_BAD_BRAZE_ID
        return Identity("braze_id", braze_id, "braze_id:" + braze_id)
    for secondary, valid, message in (
        ("email", valid_email, MSG_BAD_EMAIL),
        ("phone", valid_phone, MSG_BAD_PHONE),
    ):
        contact = obj.get(secondary)
        if contact is not None:
            return (
                Identity(secondary, contact, identity_key(secondary, contact)) if valid(contact) else message
            )
    return MSG_IDENTIFIER_REQUIRED


def _check_attributes(obj: dict) -> str | None:
    """Attributes object (B1.1): control flags are booleans, ``email`` is well formed, and the
    operators the emulator applies (``inc``, ``add``/``remove``) carry the right types."""
    for flag in ("_update_existing_only", "_merge_objects", "push_token_import"):
        if flag in obj and not isinstance(obj[flag], bool):
            return f"'{flag}' must be a boolean"
    if obj.get("email") is not None and not valid_email(obj["email"]):
        return MSG_BAD_EMAIL
    if obj.get("phone") is not None and not isinstance(obj["phone"], str):
        return "'phone' must be a string"
    for key, value in obj.items():
        if not isinstance(value, dict) or not value:
            continue
        if value.keys() == {"inc"} and not is_number(value["inc"]):
            return f"'{key}': 'inc' must be a number"
        if value.keys() <= {"add", "remove"} and not all(isinstance(v, list) for v in value.values()):
            return f"'{key}': 'add' and 'remove' must be arrays"
    return None


def _check_properties(properties: Any) -> str | None:
    """Property names: non-empty, at most 255 characters, no leading ``$``, not reserved (B1.1)."""
    if not isinstance(properties, dict):
        return "'properties' must be an object"
    for key in properties:
        if not key or len(key) > MAX_NAME_CHARS or key.startswith("$") or key in RESERVED_PROPERTY_KEYS:
            return f"'properties' key {key!r} is not valid"
    return None


def _check_event(obj: dict) -> str | None:
    """Event object (B1.1): ``name`` and ``time`` required; optional ``properties``."""
    if not _is_text(obj.get("name")):
        return "'name' is required and must be a non-empty string"
    if not valid_time(obj.get("time")):
        return "'time' is required and must be an ISO-8601 time"
    if "properties" in obj:
        return _check_properties(obj["properties"])
    return None


def _check_purchase(obj: dict) -> str | None:
    """Purchase object (B1.1): product_id, ISO 4217 currency, numeric price, quantity 1..100, time."""
    product_id = obj.get("product_id")
    if not _is_text(product_id) or len(product_id) > MAX_NAME_CHARS:
        return "'product_id' is required and must be a string of 1 to 255 characters"
    if obj.get("currency") not in ISO_4217_CODES:
        return "'currency' must be a valid ISO 4217 alphabetic currency code"
    if not is_number(obj.get("price")):
        return "'price' is required and must be a number"
    quantity = obj.get("quantity", 1)
    if not (isinstance(quantity, int) and not isinstance(quantity, bool) and 1 <= quantity <= 100):
        return MSG_BAD_QUANTITY
    if not valid_time(obj.get("time")):
        return "'time' is required and must be an ISO-8601 time"
    if "properties" in obj:
        return _check_properties(obj["properties"])
    return None


_OBJECT_CHECKS = {"attributes": _check_attributes, "events": _check_event, "purchases": _check_purchase}


def validate_object(array: str, obj: Any, full: bool = True) -> Identity | str:
    """Validate one element of ``attributes``/``events``/``purchases``: its identity or an error message.
    ``full=False`` checks the identifier only (the emulator's lean mode)."""
    if not isinstance(obj, dict):
        return MSG_NOT_OBJECT
    identity = resolve_identity(obj)
    if isinstance(identity, str) or not full:
        return identity
    return _OBJECT_CHECKS[array](obj) or identity


def track_arrays(body: Any, legacy_batching: bool) -> dict[str, list]:
    """Request-level checks for /users/track; returns the arrays that were sent.

    B1.2: more than 75 objects in total (or, with legacy batching, more than 75 in one array)
    refuses the whole request with ``400 Max Input Length Exceeded``.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "Invalid JSON: the body must be a JSON object")
    arrays = {}
    for name in TRACK_ARRAYS:
        if name in body:
            if not isinstance(body[name], list):
                raise RequestError(400, f"'{name}' must be an array")
            arrays[name] = body[name]
    sizes = [len(items) for items in arrays.values()]
    if (max(sizes, default=0) if legacy_batching else sum(sizes)) > MAX_TRACK_OBJECTS:
        raise RequestError(400, MSG_MAX_INPUT)
    return arrays


def _delete_id(key: str, item: Any) -> DeleteId:
    if key in ("external_ids", "braze_ids"):
        if not _is_text(item):
            raise RequestError(400, f"'{key}' must contain non-empty strings")
        return DeleteId(key[:-1], item)
    if key == "user_aliases":
        if not (
            isinstance(item, dict) and _is_text(item.get("alias_name")) and _is_text(item.get("alias_label"))
        ):
            raise RequestError(400, MSG_BAD_ALIAS)
        return DeleteId("user_alias", {"alias_name": item["alias_name"], "alias_label": item["alias_label"]})
    field, check = ("email", valid_email) if key == "email_addresses" else ("phone", valid_phone)
    if not (isinstance(item, dict) and check(item.get(field))):
        raise RequestError(400, f"'{key}' must contain objects with a valid '{field}'")
    order = item.get("prioritization")
    if not (isinstance(order, list) and order and set(order) <= _PRIORITIZATION):
        raise RequestError(400, f"'prioritization' must be a non-empty array of {sorted(_PRIORITIZATION)}")
    if {"identified", "unidentified"} <= set(order):
        raise RequestError(400, "'identified' and 'unidentified' are mutually exclusive")
    return DeleteId(field, item[field], tuple(order))


def delete_ids(body: Any) -> list[DeleteId]:
    """Validate a /users/delete body (B2): exactly one identifier kind, 1 to 50 identifiers."""
    if not isinstance(body, dict):
        raise RequestError(400, "Invalid JSON: the body must be a JSON object")
    present = [key for key in DELETE_KEYS if key in body]
    if len(present) != 1:
        raise RequestError(400, f"Exactly one of {', '.join(repr(k) for k in DELETE_KEYS)} must be provided")
    key = present[0]
    items = body[key]
    if not isinstance(items, list) or not items:
        raise RequestError(400, f"'{key}' must be a non-empty array")
    if len(items) > MAX_DELETE_IDS:
        raise RequestError(400, MSG_MAX_IDS)
    return [_delete_id(key, item) for item in items]


#: ``fields_to_export`` names Braze documents for /users/export/ids; the emulator fills those it stores
#: (identifiers, attributes, ``custom_events``, ``purchases``) and leaves the others out of each user.
EXPORT_FIELDS = frozenset(
    """
    apps attributed_campaign attributed_source attributed_adgroup attributed_ad braze_id
    campaigns_received canvases_received cards_clicked country created_at custom_attributes
    custom_events devices dob email email_subscribe external_id first_name gender home_city language
    last_coordinates last_name phone purchases push_subscribe push_tokens random_bucket time_zone
    total_revenue uninstalled_at user_aliases
    """.split()
)
#: Standard attributes exported under their own name; every other attribute is a custom attribute.
STANDARD_ATTRIBUTES = frozenset(
    {
        "country",
        "dob",
        "email",
        "email_subscribe",
        "first_name",
        "gender",
        "home_city",
        "language",
        "last_name",
        "phone",
        "push_subscribe",
        "time_zone",
    }
)
MAX_EXPORT_IDS = 50  # external_ids and user_aliases per request
_EXPORT_SINGLE_KEYS = ("device_id", "email_address", "phone")  # one per request, alone


def export_request(body: Any) -> ExportRequest:
    """Validate a /users/export/ids body: up to 50 ``external_ids`` and ``user_aliases`` (together), or
    a single ``braze_id``; ``device_id``, ``email_address`` or ``phone`` only one per request, alone;
    ``fields_to_export`` an array of documented field names (absent: every field)."""
    if not isinstance(body, dict):
        raise RequestError(400, "Invalid JSON: the body must be a JSON object")
    external_ids = body.get("external_ids", [])
    aliases = body.get("user_aliases", [])
    if not isinstance(external_ids, list) or not all(_is_text(item) for item in external_ids):
        raise RequestError(400, "'external_ids' must be an array of non-empty strings")
    if not isinstance(aliases, list) or not all(
        isinstance(a, dict) and _is_text(a.get("alias_name")) and _is_text(a.get("alias_label"))
        for a in aliases
    ):
        raise RequestError(400, MSG_BAD_ALIAS)
    if len(external_ids) + len(aliases) > MAX_EXPORT_IDS:
        raise RequestError(400, MSG_MAX_IDS)
    singles = {key: body[key] for key in ("braze_id", *_EXPORT_SINGLE_KEYS) if key in body}
    for key, value in singles.items():
        if not _is_text(value):
            raise RequestError(400, f"'{key}' must be a non-empty string")
    alone = [key for key in _EXPORT_SINGLE_KEYS if key in singles]
    if alone and (len(singles) > 1 or external_ids or aliases):
        raise RequestError(400, f"'{alone[0]}' must be the only identifier of the request")
    if not (external_ids or aliases or singles):
        raise RequestError(
            400, "Provide 'external_ids', 'user_aliases', 'braze_id', 'device_id', 'email_address' or 'phone'"
        )
    fields = body.get("fields_to_export")
    if fields is not None:
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise RequestError(400, "'fields_to_export' must be an array of strings")
        unknown = sorted(set(fields) - EXPORT_FIELDS)
        if unknown:
            raise RequestError(400, f"'fields_to_export' has unknown fields: {', '.join(unknown)}")
        fields = frozenset(fields)
    return ExportRequest(
        tuple(external_ids),
        tuple((a["alias_name"], a["alias_label"]) for a in aliases),
        singles.get("braze_id"),
        singles.get("email_address"),
        singles.get("phone"),
        singles.get("device_id"),
        fields,
    )


# --- how accepted objects apply to a profile (used by the emulator's store) ---------------------------
def deep_merge(current: dict, update: dict) -> dict:
    """Nested custom attributes with ``_merge_objects: true`` are deep-merged (B1.1)."""
    merged = dict(current)
    for key, value in update.items():
        old = merged.get(key)
        merged[key] = deep_merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else value
    return merged


def apply_attribute(attributes: dict, key: str, value: Any, merge_objects: bool) -> None:
    """B1.1 custom attribute forms: ``null`` removes, ``{"inc": n}`` increments, ``{"add"/"remove": [...]}``
    edit a unique-valued array, anything else sets. Nested-object operators (``$add``, ``$time``...) are
    stored as sent, not interpreted."""
    current = attributes.get(key)
    if value is None:
        attributes.pop(key, None)
    elif isinstance(value, dict) and value.keys() == {"inc"}:
        attributes[key] = (current if is_number(current) else 0) + value["inc"]
    elif isinstance(value, dict) and value and value.keys() <= {"add", "remove"}:
        items = list(current) if isinstance(current, list) else []
        for item in value.get("add", ()):
            if item not in items:
                items.append(item)
        attributes[key] = [item for item in items if item not in value.get("remove", ())]
    elif merge_objects and isinstance(value, dict) and isinstance(current, dict):
        attributes[key] = deep_merge(current, value)
    else:
        attributes[key] = value


def creates_profile(array: str, identity: Identity, obj: dict) -> bool:
    """Whether an object may create a missing profile (B1.1, B1.3, A2.1).

    ``external_id``, email and phone create unless ``_update_existing_only`` is true; ``user_alias`` creates
    only from an attributes object with ``_update_existing_only: false`` (events and purchases with an alias
    are always update-only); ``braze_id`` never creates.
    """
    flag = obj.get("_update_existing_only")
    if identity.type == "braze_id":
        return False
    if identity.type == "user_alias":
        return array == "attributes" and flag is False
    return flag is not True
