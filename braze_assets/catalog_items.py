"""Catalog syncs: CDI's catalog table (`UPDATED_AT`, `ID`, `PAYLOAD`, optional `DELETED`) as the
items Braze's asynchronous catalog endpoints take (docs/braze-contract.md, catalogs).

A row with `DELETED` true deletes item `ID` (`DELETE /catalogs/{catalog}/items`); any other row
creates or replaces it with its PAYLOAD's fields (`PUT`, which creates a missing item). Each row is
checked here first, with a reason naming the rule, for what Braze documents: the id's characters
and length, field names without `.` or `$`, nesting depth, and the length of text values. Whether a
field exists in the catalog, and its type, only Braze knows: it names the failing items, and
delivery fails those and sends the rest again.

A row becomes an object `[op, item]` (op `PUT` or `DELETE`): delivery groups them by op into
requests of at most 50 items.
"""

from __future__ import annotations

import decimal
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa

from braze_assets.braze import contract
from braze_assets.datatypes.payload_rules import NON_FINITE_REASON, decode_problem, lossy_json
from braze_assets.json_bytes import holds_non_finite, json_bytes
from braze_assets.masking import mask_key, mask_payload

CATALOG_COLUMNS = ("UPDATED_AT", "ID", "PAYLOAD")
_ID = re.compile(contract.CATALOG_ID_CHARS)
#: DELETED as text (a warehouse without booleans), compared in lower case.
_TRUE = frozenset({"true", "1", "t", "yes"})
_FALSE = frozenset({"false", "0", "f", "no", ""})


@dataclass
class CatalogRows:
    """A batch of catalog rows, checked: objects of the valid ones, reasons of the others."""

    objects: dict[int, bytes] = field(default_factory=dict)
    failures: dict[int, list[str]] = field(default_factory=dict)
    ids: list[str | None] = field(default_factory=list)
    deleted: list[bool] = field(default_factory=list)
    #: each row's id as the log and previews show it (`shown_id`)
    shown: list[str] = field(default_factory=list)


#: Characters of a refused id shown; item ids are not personal data, but may be long.
SHOWN_ID_CHARS = 60
#: Above this a double no longer holds every whole number exactly.
_EXACT_DOUBLE = 2**53


def shown_id(item_id: str | None, raw: Any) -> str:
    """A row's item id for the log: the id itself, or the value that could not be one, quoted
    (cut at `SHOWN_ID_CHARS`, with its length), or `(no id)`."""
    if item_id is not None:
        return f"ID={item_id}"
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return "(no id)"
    text = raw if isinstance(raw, str) else str(raw)  # bytes show as b'...'
    if len(text) > SHOWN_ID_CHARS:
        return f"ID={text[:SHOWN_ID_CHARS] + '...'!r} ({len(text)} characters)"
    return f"ID={text!r}" if isinstance(raw, str) else f"ID={text}"


def _text_id(value: Any) -> tuple[str | None, str | None]:
    """The item id as text, or why it cannot be one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "ID is empty (every catalog row needs the item's id)"
    if isinstance(value, bool):
        return None, "ID must be text or a whole number, not bool"
    if isinstance(value, float):  # a FLOAT64 column, or a Parquet integer column with nulls
        if not math.isfinite(value) or not value.is_integer():
            return None, "ID must be text or a whole number, not a number with a fraction"
        if abs(value) > _EXACT_DOUBLE:
            return None, (
                "ID is a floating-point number too large to be exact (over 2^53): keep ids as text "
                "or in an integer column"
            )
        value = int(value)
    if isinstance(value, decimal.Decimal):  # a NUMBER column (Snowflake's NUMBER(38,0))
        if not value.is_finite() or value != value.to_integral_value():
            return None, "ID must be text or a whole number, not a number with a fraction"
        value = int(value)
    text = str(value) if isinstance(value, int) else value
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            return None, "ID is not UTF-8 text"
    if not isinstance(text, str):
        return None, f"ID must be text, not {type(value).__name__}"
    if len(text) > contract.CATALOG_ID_MAX_CHARS:
        return None, f"ID is longer than {contract.CATALOG_ID_MAX_CHARS} characters (ids-too-large)"
    if not _ID.fullmatch(text):  # `$` would let a final line end through
        return None, "ID may hold only letters, digits, '-' and '_' (invalid-ids)"
    return text, None


def _value_problem(value: Any, depth: int = 1) -> str | None:
    """The first rule a value breaks, or None. Nesting is counted as Braze counts it: a field
    whose value is an object or array is one level deep, each container inside it one more (a
    plain value adds none); the PAYLOAD itself is `depth` 0. Iterative: JSON may nest deeper
    than Python recurses."""
    stack = [(value, depth)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, str):
            if len(current) > contract.CATALOG_VALUE_MAX_CHARS:
                limit = contract.CATALOG_VALUE_MAX_CHARS
                return f"a text value is longer than {limit:,} characters (items-too-large)"
            continue
        if not isinstance(current, (dict, list)):
            continue
        if depth > contract.CATALOG_MAX_NESTING:
            return _too_deep()
        if isinstance(current, dict):
            for key in current:
                if "." in key or "$" in key:
                    return f"field name {mask_key(key)!r} contains '.' or '$' (invalid-keys-in-value-object)"
            stack.extend((inner, depth + 1) for inner in current.values())
        else:
            stack.extend((inner, depth + 1) for inner in current)
    return None


def _deleted(value: Any) -> bool | None:
    """DELETED as a flag: a boolean, a number 1 or 0, or its text in any case; None otherwise."""
    if value is None:
        return False
    if isinstance(value, str):
        text = value.strip().lower()
        return True if text in _TRUE else False if text in _FALSE else None
    if isinstance(value, numbers.Number) and value in (0, 1):  # NUMERIC (Decimal) and doubles too
        return bool(value)
    return None


def _parsed(raw: Any) -> tuple[Any, str | None]:
    """A PAYLOAD as its fields, or why it cannot be sent as the table holds it: text that is not
    JSON, or that a JSON library would change (a key twice, a whole number beyond 64 bits, NaN
    or Infinity), as for user data types (`payload_rules`)."""
    if not isinstance(raw, (str, bytes)):  # a typed object from the warehouse
        return raw, NON_FINITE_REASON if holds_non_finite(raw) else None
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        problem = decode_problem(exc)
        if problem.startswith("PAYLOAD nests deeper"):  # deeper than orjson reads: past Braze's limit too
            return None, _too_deep()
        return None, problem
    return parsed, lossy_json(raw, parsed)


def _too_deep() -> str:
    return (
        f"PAYLOAD nests deeper than {contract.CATALOG_MAX_NESTING} levels (too-deep-nesting-in-value-object)"
    )


def check_catalog_rows(rows: pa.RecordBatch | pa.Table) -> CatalogRows:
    """Check every row of a batch and build the objects of the valid ones."""
    names = rows.schema.names
    ids = rows.column("ID").to_pylist() if "ID" in names else [None] * rows.num_rows
    payloads = rows.column("PAYLOAD").to_pylist() if "PAYLOAD" in names else [None] * rows.num_rows
    deleted = rows.column("DELETED").to_pylist() if "DELETED" in names else [None] * rows.num_rows
    stamps = rows.column("UPDATED_AT").null_count if "UPDATED_AT" in names else rows.num_rows
    null_stamps = rows.column("UPDATED_AT").is_null().to_pylist() if stamps else [False] * rows.num_rows
    checked = CatalogRows()
    for i in range(rows.num_rows):
        reasons: list[str] = []
        if null_stamps[i]:
            reasons.append("UPDATED_AT is null")
        item_id, problem = _text_id(ids[i])
        if problem:
            reasons.append(problem)
        remove = _deleted(deleted[i])
        if remove is None:
            reasons.append("DELETED must be true or false")
        fields: dict[str, Any] = {}
        raw = payloads[i]
        if not remove:
            if raw is None:
                reasons.append("PAYLOAD is null (an item to create or update needs its fields)")
            else:
                parsed, problem = _parsed(raw)
                if problem:
                    reasons.append(problem)
                elif not isinstance(parsed, dict):  # `null` too: it would replace the item with nothing
                    reasons.append("PAYLOAD must be a JSON object")
                else:
                    if "id" in parsed:
                        reasons.append("PAYLOAD has an 'id' field: the item's id comes from the ID column")
                    problem = _value_problem(parsed, depth=0)
                    if problem:
                        reasons.append(problem)
                    fields = parsed
        checked.ids.append(item_id)
        checked.shown.append(shown_id(item_id, ids[i]))
        checked.deleted.append(bool(remove))
        if reasons:
            checked.failures[i] = reasons
            continue
        item = {"id": item_id} if remove else {"id": item_id, **fields}
        checked.objects[i] = json_bytes(["DELETE" if remove else "PUT", item])
    return checked


def excerpt(raw: Any) -> str:
    """A rejected row's PAYLOAD as the rejected file shows it (masked like any PAYLOAD)."""
    return mask_payload(raw)
