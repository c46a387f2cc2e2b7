"""What a PAYLOAD must be: valid, lossless JSON of an object, within Braze's sizes, with the data
type's own fields right. `payload_facts` parses each PAYLOAD once and turns what it finds into
the numeric facts the pandera schema judges, with the sentence behind each problem.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from braze_assets.braze import contract
from braze_assets.datatypes.rows import RowBatch
from braze_assets.datatypes.spec import SECONDARY_ONLY, DataTypeSpec
from braze_assets.masking import mask, mask_key

_BRAZE_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}):(\d{3})([+-]\d{4}|Z)$")


def parse_braze_time(value: Any) -> dt.datetime | None:
    """ISO 8601, or Braze's `yyyy-MM-dd'T'HH:mm:ss:SSSZ`; None when unparseable [EVT]."""
    if not isinstance(value, str) or not value:
        return None
    match = _BRAZE_TIME.match(value)
    if match:
        zone = "+0000" if match.group(3) == "Z" else match.group(3)
        value = f"{match.group(1)}.{match.group(2)}{zone}"
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _shown(value: Any) -> str:
    """A rejected value as a reason quotes it: masked like an identifier (it may be an email or a
    phone number put in the wrong field), with its JSON type when that is the problem."""
    if isinstance(value, str):
        return repr(mask(value))
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        text = str(value)  # short numbers (0, 150, 9.99) are no one's phone number
        return text if len(text) <= 6 else f"a number ({mask(text)})"
    return f"a JSON {'array' if isinstance(value, list) else 'object'}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _event_problems(payload: dict) -> list[str]:
    name = payload.get("name")
    if type(name) is str and name and not name.isspace() and "time" not in payload:
        return _properties_problems(payload, "event")  # the usual event
    problems = []
    if not isinstance(name, str) or not name.strip():
        problems.append("event PAYLOAD has no 'name' (a non-empty string)")
    if "time" in payload and parse_braze_time(payload["time"]) is None:
        problems.append(f"event 'time' is not ISO 8601: {_shown(payload['time'])}")
    return problems + _properties_problems(payload, "event")


def _properties_problems(payload: dict, what: str) -> list[str]:
    properties = payload.get("properties")
    if properties is None:
        return []
    if not isinstance(properties, dict):
        return [f"{what} 'properties' must be a JSON object"]
    if (
        "time" not in properties
        and "event_name" not in properties
        and "" not in properties
        and "$" not in (names := "".join(properties))
        and len(names) <= contract.MAX_NAME_CHARS
    ):
        return []  # the usual properties: no "$" anywhere and all names together short enough
    problems = []
    for key in properties:
        if not key or len(key) > contract.MAX_NAME_CHARS or key.startswith("$"):
            problems.append(
                f"{what} property names must be 1-255 characters, not starting with $: {mask_key(key)!r}"
            )
        elif key in ("time", "event_name"):
            problems.append(f"{what} property name is reserved by Braze: {key!r}")
    return problems


def _purchase_problems(payload: dict) -> list[str]:
    product_id, currency, price = payload.get("product_id"), payload.get("currency"), payload.get("price")
    quantity = payload.get("quantity", 1)
    if (
        type(product_id) is str
        and 0 < len(product_id) <= contract.MAX_NAME_CHARS
        and currency in contract.ISO_4217_CURRENCIES
        and type(price) in (int, float)
        and type(quantity) is int
        and contract.PURCHASE_QUANTITY_MIN <= quantity <= contract.PURCHASE_QUANTITY_MAX
        and "time" not in payload
    ):
        return _properties_problems(payload, "purchase")  # the usual purchase
    missing = [k for k in ("product_id", "currency", "price") if payload.get(k) in (None, "")]
    problems = [f"purchase PAYLOAD is missing required keys: {', '.join(missing)}"] if missing else []
    product_id, currency = payload.get("product_id"), payload.get("currency")
    if product_id not in (None, "") and (
        not isinstance(product_id, str) or len(product_id) > contract.MAX_NAME_CHARS
    ):
        problems.append("purchase 'product_id' must be a string of at most 255 characters")
    if currency not in (None, "") and currency not in contract.ISO_4217_CURRENCIES:
        problems.append(f"purchase 'currency' is not an ISO 4217 currency code: {_shown(currency)}")
    if payload.get("price") not in (None, "") and not _is_number(payload["price"]):
        problems.append(f"purchase 'price' must be a number: got {_shown(payload['price'])}")
    quantity = payload.get("quantity", 1)
    if (
        not isinstance(quantity, int)
        or isinstance(quantity, bool)
        or not (contract.PURCHASE_QUANTITY_MIN <= quantity <= contract.PURCHASE_QUANTITY_MAX)
    ):
        problems.append(f"purchase 'quantity' must be a whole number from 1 to 100: got {_shown(quantity)}")
    if "time" in payload and parse_braze_time(payload["time"]) is None:
        problems.append(f"purchase 'time' is not ISO 8601: {_shown(payload['time'])}")
    return problems + _properties_problems(payload, "purchase")


_TYPE_RULES: dict[str, Callable[[dict], list[str]]] = {
    "events": _event_problems,
    "purchases": _purchase_problems,
}
#: Separates several field problems of one row inside the `type_problem` fact.
PROBLEM_SEPARATOR = "\n"


#: How deep a PAYLOAD may nest: the serializer's limit for the objects sent to Braze.
MAX_NESTING = 254
_LONG_DIGITS = re.compile(r"\d{19,}")  # 2**63 has 19 digits: shorter numbers always fit
_JSON_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')
_INT_RANGE = (-(1 << 63), (1 << 64) - 1)  # what the JSON parser keeps exactly


#: Why a PAYLOAD holding NaN or Infinity is rejected (JSON has no form for them).
NON_FINITE_REASON = (
    "PAYLOAD holds NaN or Infinity, which JSON cannot carry (Braze would get null, which removes "
    "the attribute); send a number or null"
)
_NUMBER = re.compile(r"-?[0-9.eE+-]+")


def decode_problem(exc: orjson.JSONDecodeError) -> str:
    """Why orjson could not read a PAYLOAD, from where it stopped (`exc.doc` at `exc.pos`)."""
    message = str(exc)
    if "depth" in message or "recursion" in message.lower():
        return f"PAYLOAD nests deeper than {MAX_NESTING} levels (too deep to send)"
    at = exc.doc[exc.pos :] if isinstance(exc.doc, str) else ""
    if at.startswith(("NaN", "Infinity", "-Infinity")):
        return NON_FINITE_REASON
    if "infinity" in message:
        number = _NUMBER.match(at)
        if number is not None and any(c in number.group() for c in ".eE"):
            return "PAYLOAD has a number too large for a double (beyond 1.8e308), which Braze cannot take"
        return "PAYLOAD has a whole number beyond 64 bits that cannot be sent exactly; send it as a string"
    return f"PAYLOAD is not valid JSON: {message.split(':')[0]}"


def _compact_json(parsed: Any) -> bytes | None:
    try:
        return orjson.dumps(parsed)
    except TypeError:  # orjson.JSONEncodeError: nested deeper than it writes (reported below)
        return None


def lossy_json(raw: str | bytes, parsed: Any = None) -> str | None:
    """Why this PAYLOAD would not reach Braze as written, or None. A JSON parser silently keeps
    the last of duplicate keys and turns whole numbers beyond 64 bits into floats; both change
    the data, so such a row is rejected with the reason instead.

    Cheapest first: text that is exactly the compact serialization of what was `parsed` (as
    warehouses' JSON functions write it) lost nothing, since a parsed object cannot serialize
    with a key twice or with a float where the text had a whole number. Otherwise a look at the
    text (a 19-digit run, a key name seen twice) decides whether the exact, slower parse is needed."""
    if parsed is not None and _compact_json(parsed) == (raw.encode() if isinstance(raw, str) else raw):
        return None
    text = raw if isinstance(raw, str) else raw.decode("utf-8")
    keys = _JSON_KEY.findall(text)
    # a key written with an escape (`"\u0061"` is `"a"`) may repeat another in other letters
    if _LONG_DIGITS.search(text) is None and len(keys) == len(set(keys)) and "\\" not in "".join(keys):
        return None
    duplicates: set[str] = set()
    too_big: list[int] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                duplicates.add(key)
            seen.add(key)
        return dict(items)

    def whole(digits: str) -> int | float:
        try:
            value = int(digits)
        except ValueError:  # longer than Python converts: certainly beyond 64 bits
            too_big.append(len(digits))
            return 0
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            too_big.append(len(digits.lstrip("-")))
        return value

    try:
        json.loads(text, object_pairs_hook=pairs, parse_int=whole)
    except RecursionError:
        return f"PAYLOAD nests deeper than {MAX_NESTING} levels (too deep to send)"
    problems = []
    if duplicates:
        shown = ", ".join(sorted(repr(mask_key(k)) for k in duplicates)[:5])
        problems.append(f"PAYLOAD has duplicate keys (JSON keeps only the last; send each key once): {shown}")
    if too_big:
        problems.append(
            f"PAYLOAD has a whole number beyond 64 bits ({max(too_big)} digits) that "
            "cannot be sent exactly; send it as a string"
        )
    return PROBLEM_SEPARATOR.join(problems) or None


def attribute_count(payload: dict, raw: str | bytes | None = None) -> int:
    """Attributes a PAYLOAD sets: each top-level key once, control keys (`_...`) not [A2.2].
    `raw`, the PAYLOAD's JSON text, lets the usual payload skip the key scan: with neither `"_`
    nor an escape (`\\u005f`) anywhere in it, no key starts with `_`."""
    if type(raw) is str and '"_' not in raw and "\\" not in raw:
        return len(payload)
    return len(payload) - len([key for key in payload if key[:1] == "_"])


def attribute_points(key: str, value: object) -> int:
    """Data points Braze bills for writing attribute `key` with `value`: one, except that
    creating an array of objects costs one per attribute of each object, and so does adding
    objects (`$add`); updating them (`$update`) costs one per property set (docs/braze-contract.md,
    data points). `subscription_groups` is a list of objects but not an attribute's array: one."""
    if key == "subscription_groups":
        return 1
    if isinstance(value, list):
        return _objects_points(value) or 1
    if isinstance(value, dict):
        added, updated = value.get("$add"), value.get("$update")
        if isinstance(added, list) and _objects_points(added):
            return _objects_points(added)
        if isinstance(updated, list) and updated:
            set_by = [u.get("$new_object") if isinstance(u, dict) else None for u in updated]
            return max(1, sum(len(new) if isinstance(new, dict) else 1 for new in set_by))
    return 1


def _objects_points(items: list[Any]) -> int:
    """One point per attribute of each object, for a non-empty list of objects only (else 0)."""
    if not items or not all(isinstance(item, dict) for item in items):
        return 0
    return max(1, sum(len(item) for item in items))


def payload_points(payload: dict[str, Any]) -> int:
    """Data points of a payload sent whole: `attribute_points` of each key but control keys."""
    return sum(attribute_points(key, value) for key, value in payload.items() if key[:1] != "_")


def payload_facts(
    batch: RowBatch, spec: DataTypeSpec, facts: dict[str, np.ndarray], notes: dict[str, dict[int, str]]
) -> list[dict | None]:
    """Parse each PAYLOAD once; fill the payload facts (and the sentences behind non-zero ones).
    Returns the parsed payloads (None where unusable)."""
    payloads: list[dict | None] = [None] * batch.num_rows
    sizes, problem = facts["payload_bytes"], facts["payload_problem"]
    attributes, identifier_keys = facts["attribute_count"], facts["payload_identifier_keys"]
    type_problem = facts["type_problem"]
    primary = frozenset(contract.PRIMARY_IDENTIFIERS)
    every = primary | frozenset(contract.SECONDARY_IDENTIFIERS)
    strict = spec.name != "attributes"
    counted = not strict  # attributes cost a data point each; an event or a purchase costs one
    allowed, rules = spec.allowed_payload_keys, _TYPE_RULES.get(spec.name)
    codes = batch.codes.tolist()
    loads, decode_error, max_bytes = orjson.loads, orjson.JSONDecodeError, contract.PAYLOAD_MAX_BYTES
    for i, raw in enumerate(batch.payload or [None] * batch.num_rows):
        if raw is None:
            problem[i] = 1
            notes["payload_problem"][i] = "PAYLOAD is null"
            continue
        if type(raw) is not str and type(raw) is not bytes:
            if not isinstance(raw, (bytearray, memoryview)):
                problem[i] = 1
                notes["payload_problem"][i] = (
                    f"PAYLOAD must be JSON text or a JSON object, not {type(raw).__name__}"
                )
                continue
            raw = bytes(raw)
        size = len(raw) if type(raw) is bytes or raw.isascii() else len(raw.encode())
        sizes[i] = size
        if size > max_bytes:
            continue  # reported by the size rule; not worth parsing
        try:
            payload = loads(raw)
        except decode_error as exc:
            problem[i] = 1
            notes["payload_problem"][i] = decode_problem(exc)
            continue
        if type(payload) is not dict:
            problem[i] = 1
            notes["payload_problem"][i] = f"PAYLOAD must be a JSON object: got {type(payload).__name__}"
            continue
        lossy = lossy_json(raw, payload)
        if lossy is not None:
            problem[i] = 1
            notes["payload_problem"][i] = lossy
            continue
        payloads[i] = payload
        if counted:
            attributes[i] = attribute_count(payload, raw)
        forbidden = every if strict or codes[i] in SECONDARY_ONLY else primary
        if not forbidden.isdisjoint(payload):
            found = sorted(forbidden.intersection(payload))
            identifier_keys[i] = len(found)
            notes["payload_identifier_keys"][i] = ", ".join(found)
        problems: list[str] = []
        if allowed is not None and not payload.keys() <= allowed:
            unknown = sorted(payload.keys() - allowed - forbidden)
            if unknown:
                problems = [
                    f"{spec.name[:-1]} PAYLOAD has keys Braze does not take: "
                    f"{', '.join(map(mask_key, unknown))[:80]} (allowed: {', '.join(sorted(allowed))})"
                ]
        if not problems and rules is not None:
            problems = rules(payload)
        if problems:
            type_problem[i] = len(problems)
            notes["type_problem"][i] = PROBLEM_SEPARATOR.join(problems)
    return payloads
