"""The four CDI data types as one table-driven spec.

Per data type: the columns a source table must/may have, the Braze endpoint and batch limits, the
pandera schema every row must pass, and how a valid row becomes a Braze API object. Adding a data type
(catalogs, say) is one more `DataTypeSpec`, not a new code path.

Validation works on a batch of rows in two steps. `validate_batch` works out each row's facts:
identifier kinds and sizes column-wise, and the PAYLOAD parsed once per row (JSON, sizes, the type's
own field rules). The data type's pandera schema then judges the facts of the whole batch, so every
rule is declared in one place and each failing rule becomes one specific, human reason on that row
(`validate_facts`). Facts are numbers (codes and counts) so pandera judges them at numpy speed; the
sentences behind a non-zero `*_problem` fact are kept beside the frame.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pandera.pandas as pa
import pyarrow
import pyarrow.compute as pc

from braze_assets.braze import contract
from braze_assets.json_bytes import json_bytes
from braze_assets.masking import mask

IDENTIFIER_COLUMNS = ("EXTERNAL_ID", "ALIAS_NAME", "ALIAS_LABEL", "BRAZE_ID", "EMAIL", "PHONE")
#: Identifier kinds a row may carry (the alias is one kind made of two columns).
IDENTIFIER_KINDS = ("EXTERNAL_ID", "ALIAS", "BRAZE_ID", "EMAIL", "PHONE")
_BRAZE_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}):(\d{3})([+-]\d{4}|Z)$")


@dataclass(frozen=True)
class DataTypeSpec:
    name: str
    endpoint: str
    #: The `/users/track` array the objects go to, or None for deletions.
    track_array: str | None
    has_payload: bool
    identifier_kinds: tuple[str, ...]
    #: Top-level PAYLOAD keys allowed (None = any, as for attributes).
    allowed_payload_keys: frozenset[str] | None
    required_payload_keys: tuple[str, ...]
    max_per_request: int
    #: The array every request carries (catalogs: `items`); None: the objects' own group key.
    request_key: str | None = None

    @property
    def required_columns(self) -> tuple[str, ...]:
        if self.name == "catalogs":
            return ("UPDATED_AT", "ID", "PAYLOAD")
        return ("UPDATED_AT", "PAYLOAD") if self.has_payload else ("UPDATED_AT",)


_EVENT_KEYS = frozenset({"name", "time", "app_id", "properties", "_update_existing_only"})
_PURCHASE_KEYS = frozenset(
    {"product_id", "currency", "price", "quantity", "time", "app_id", "properties", "_update_existing_only"}
)

DATA_TYPES: dict[str, DataTypeSpec] = {
    "attributes": DataTypeSpec(
        "attributes",
        "/users/track",
        "attributes",
        True,
        IDENTIFIER_KINDS,
        None,
        (),
        contract.TRACK_MAX_OBJECTS,
    ),
    "events": DataTypeSpec(
        "events",
        "/users/track",
        "events",
        True,
        IDENTIFIER_KINDS,
        _EVENT_KEYS,
        ("name",),
        contract.TRACK_MAX_OBJECTS,
    ),
    "purchases": DataTypeSpec(
        "purchases",
        "/users/track",
        "purchases",
        True,
        IDENTIFIER_KINDS,
        _PURCHASE_KEYS,
        ("product_id", "currency", "price"),
        contract.TRACK_MAX_OBJECTS,
    ),
    "deletions": DataTypeSpec(
        "deletions",
        "/users/delete",
        None,
        False,
        ("EXTERNAL_ID", "ALIAS", "BRAZE_ID"),
        None,
        (),
        contract.DELETE_MAX_IDS,
    ),
    # Items, not users: rows carry ID (and DELETED), checked by catalog_items.py.
    "catalogs": DataTypeSpec(
        "catalogs",
        "/catalogs/{catalog}/items",
        None,
        True,
        (),
        None,
        (),
        contract.CATALOG_MAX_ITEMS,
        request_key="items",
    ),
}


# ----------------------------------------------------------------------------- row batches
#: Bit of each identifier kind in a row's kind code (the schema judges codes, reasons name kinds).
KIND_BITS = {kind: 1 << n for n, kind in enumerate(IDENTIFIER_KINDS)}
_SECONDARY_ONLY = frozenset({KIND_BITS["EMAIL"], KIND_BITS["PHONE"], KIND_BITS["EMAIL"] | KIND_BITS["PHONE"]})


def kinds_of(code: int) -> tuple[str, ...]:
    """The identifier kinds in a kind code, in `IDENTIFIER_KINDS` order."""
    return tuple(kind for kind in IDENTIFIER_KINDS if code & KIND_BITS[kind])


class IdentifierValueError(ValueError):
    """An identifier cell that is not text and has no exact text form (a float, non-UTF-8 bytes)."""

    def __init__(self, shown: str, problem: str) -> None:
        super().__init__(problem)
        self.shown, self.problem = shown, problem


def _text(value: Any) -> str | None:
    """An identifier value exactly as stored (Braze matches it exactly), None for NULL/blank.

    Text passes as it is; whole numbers and UTF-8 bytes have one exact text form and take it.
    Anything else (floats, invalid UTF-8, booleans, objects) has no exact text form: raising
    `IdentifierValueError` lets the row be rejected with a reason instead of sending a guess
    such as ``"b'user-42'"`` or ``"42.0"``.
    """
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise IdentifierValueError(
                f"0x{bytes(value)[:16].hex()}", "is binary data that is not UTF-8 text"
            ) from None
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, decimal.Decimal) and value == value.to_integral_value():
        text = str(value.quantize(decimal.Decimal(1)))
    else:
        raise IdentifierValueError(
            type(value).__name__,
            f"must be text or a whole number, not {type(value).__name__} (store identifiers as text)",
        )
    return text if text.strip() else None


def _texts(
    values: list[Any], column: str = "", problems: dict[int, list[str]] | None = None
) -> list[str | None]:
    """`_text` over a column; strings (the usual case) take the fast path. A value with no exact
    text form is kept as a placeholder (so the row still counts as identified) and its problem
    noted in `problems` by row position."""
    texts: list[str | None] = []
    for i, v in enumerate(values):
        if type(v) is str:
            texts.append(v if v and not v.isspace() else None)
            continue
        try:
            texts.append(_text(v))
        except IdentifierValueError as exc:
            texts.append(exc.shown)
            if problems is not None:
                problems.setdefault(i, []).append(f"{column} {exc.problem}")
    return texts


#: Visible ASCII: text holding one of these is not blank (`str.isspace` is false for each).
_VISIBLE_ASCII = "[!-~]"


def _text_array(
    values: pyarrow.Array | pyarrow.ChunkedArray, column: str, problems: dict[int, list[str]]
) -> pyarrow.Array:
    """`_texts` of one column as an Arrow string array. A text column is decided column-wise:
    a value holding a visible ASCII character is not blank, and only the others (blank, or
    wholly non-ASCII text, both rare in identifier columns) are looked at one by one."""
    if isinstance(values, pyarrow.ChunkedArray):
        values = values.combine_chunks()
    if pyarrow.types.is_large_string(values.type):
        values = values.cast(pyarrow.string())
    if not pyarrow.types.is_string(values.type):
        return pyarrow.array(_texts(values.to_pylist(), column, problems), pyarrow.string())
    if values.null_count == len(values):
        return values
    doubtful = pc.invert(pc.fill_null(pc.match_substring_regex(values, _VISIBLE_ASCII), True))
    if not pc.any(doubtful).as_py():
        return values
    texts = values.to_pylist()
    for i in np.flatnonzero(doubtful.to_numpy(zero_copy_only=False)):
        texts[i] = _texts([texts[i]])[0]
    return pyarrow.array(texts, pyarrow.string())


def identifier_arrays(
    table: pyarrow.Table | pyarrow.RecordBatch,
) -> tuple[dict[str, pyarrow.Array], dict[int, list[str]]]:
    """A batch's identifier columns as Arrow text, exactly as stored (null when NULL or blank),
    and the rows whose cells have no exact text form (position -> sentences)."""
    names = table.schema.names
    problems: dict[int, list[str]] = {}
    arrays = {c: _text_array(table.column(c), c, problems) for c in IDENTIFIER_COLUMNS if c in names}
    return arrays, problems


def identifier_texts(
    table: pyarrow.Table | pyarrow.RecordBatch,
) -> tuple[dict[str, list[str | None]], dict[int, list[str]]]:
    """`identifier_arrays` as Python lists."""
    arrays, problems = identifier_arrays(table)
    return {c: values.to_pylist() for c, values in arrays.items()}, problems


def payload_text(value: Any) -> str | bytes | None:
    """PAYLOAD as JSON text; warehouses with typed JSON/STRUCT payloads hand over objects."""
    return orjson.dumps(value).decode() if isinstance(value, (dict, list)) else value


class RowBatch:
    """A batch of CDI rows as columns: identifier values as text (exactly as stored; None when NULL
    or blank), PAYLOAD as JSON text, UPDATED_AT as an Arrow timestamp[us, UTC] array."""

    def __init__(
        self,
        updated_at: pyarrow.Array,
        identifiers: dict[str, list[str | None]],
        payload: list[Any] | None,
        identifier_problems: dict[int, list[str]] | None = None,
    ):
        self.updated_at, self.columns, self.payload = updated_at, identifiers, payload
        #: rows whose identifier cells have no exact text form: position -> sentences
        self.identifier_problems = identifier_problems or {}
        self.num_rows = len(updated_at)
        codes = np.zeros(self.num_rows, dtype=np.int64)
        for kind in ("EXTERNAL_ID", "BRAZE_ID", "EMAIL", "PHONE"):
            if kind in identifiers:
                codes |= KIND_BITS[kind] * self._present(kind)
        self.alias_problem = np.zeros(self.num_rows, dtype=np.int64)
        if "ALIAS_NAME" in identifiers or "ALIAS_LABEL" in identifiers:
            name, label = self._present("ALIAS_NAME"), self._present("ALIAS_LABEL")
            codes |= KIND_BITS["ALIAS"] * (name | label)
            self.alias_problem = np.where(name & ~label, 1, np.where(label & ~name, 2, 0))
        self.codes = codes

    def _present(self, column: str) -> np.ndarray:
        values = self.columns.get(column)
        if values is None:
            return np.zeros(self.num_rows, dtype=bool)
        return np.fromiter((v is not None for v in values), dtype=bool, count=self.num_rows)

    @classmethod
    def from_arrow(cls, table: pyarrow.Table | pyarrow.RecordBatch) -> RowBatch:
        """Columns as a source scan streams them (upper-case names)."""
        names = table.schema.names
        identifiers, problems = identifier_texts(table)
        payload = None
        if "PAYLOAD" in names:
            column = table.column("PAYLOAD")
            payload = column.to_pylist()
            if not (
                pyarrow.types.is_string(column.type)
                or pyarrow.types.is_large_string(column.type)
                or pyarrow.types.is_binary(column.type)
            ):
                payload = [payload_text(v) for v in payload]
        updated_at = table.column("UPDATED_AT")
        if isinstance(updated_at, pyarrow.ChunkedArray):
            updated_at = updated_at.combine_chunks()
        return cls(updated_at.cast(pyarrow.timestamp("us", tz="UTC")), identifiers, payload, problems)

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> RowBatch:
        """Rows as dicts (upper-case column names); a naive UPDATED_AT is taken as UTC."""
        present = {c for row in rows for c in row}
        problems: dict[int, list[str]] = {}
        identifiers = {
            c: _texts([row.get(c) for row in rows], c, problems) for c in IDENTIFIER_COLUMNS if c in present
        }
        payload = [payload_text(row.get("PAYLOAD")) for row in rows] if "PAYLOAD" in present else None
        stamps = [row.get("UPDATED_AT") for row in rows]
        return cls(pyarrow.array(stamps, pyarrow.timestamp("us", tz="UTC")), identifiers, payload, problems)

    def take(self, positions: list[int]) -> RowBatch:
        """The rows at `positions`, in that order."""
        remap = {old: new for new, old in enumerate(positions)}
        return RowBatch(
            self.updated_at.take(pyarrow.array(positions, pyarrow.int64())),
            {kind: [values[i] for i in positions] for kind, values in self.columns.items()},
            [self.payload[i] for i in positions] if self.payload is not None else None,
            {remap[i]: s for i, s in self.identifier_problems.items() if i in remap},
        )

    def identifiers(self, i: int) -> dict[str, Any]:
        """The identifier kinds of row `i`: kind -> value (alias -> (name, label))."""
        found: dict[str, Any] = {}
        for kind in ("EXTERNAL_ID", "BRAZE_ID", "EMAIL", "PHONE"):
            if kind in self.columns and self.columns[kind][i] is not None:
                found[kind] = self.columns[kind][i]
        if self.codes[i] & KIND_BITS["ALIAS"]:
            found["ALIAS"] = tuple(
                self.columns[c][i] if c in self.columns else None for c in ("ALIAS_NAME", "ALIAS_LABEL")
            )
        return found


def row_identifiers(row: dict[str, Any]) -> dict[str, Any]:
    """The identifier kinds present in one row: kind -> value (alias -> (name, label))."""
    return RowBatch.from_rows([row]).identifiers(0)


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
                f"{what} property names must be 1-255 characters, not starting with $: {key[:40]!r}"
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
_PROBLEM_SEPARATOR = "\n"


#: How deep a PAYLOAD may nest: the serializer's limit for the objects sent to Braze.
MAX_NESTING = 254
_LONG_DIGITS = re.compile(r"\d{19,}")  # 2**63 has 19 digits: shorter numbers always fit
_JSON_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')
_INT_RANGE = (-(1 << 63), (1 << 64) - 1)  # what the JSON parser keeps exactly


def _decode_problem(exc: Exception) -> str:
    message = str(exc)
    if "depth" in message or "recursion" in message.lower():
        return f"PAYLOAD nests deeper than {MAX_NESTING} levels (too deep to send)"
    if "infinity" in message:
        return "PAYLOAD has a whole number beyond 64 bits that cannot be sent exactly; send it as a string"
    return f"PAYLOAD is not valid JSON: {message.split(':')[0]}"


def _compact_json(parsed: Any) -> bytes | None:
    try:
        return orjson.dumps(parsed)
    except TypeError:  # orjson.JSONEncodeError: nested deeper than it writes (reported below)
        return None


def _lossy_json(raw: str | bytes, parsed: Any = None) -> str | None:
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
    if _LONG_DIGITS.search(text) is None and len(keys) == len(set(keys)):
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
        shown = ", ".join(sorted(repr(k[:40]) for k in duplicates)[:5])
        problems.append(f"PAYLOAD has duplicate keys (JSON keeps only the last; send each key once): {shown}")
    if too_big:
        problems.append(
            f"PAYLOAD has a whole number beyond 64 bits ({max(too_big)} digits) that "
            "cannot be sent exactly; send it as a string"
        )
    return _PROBLEM_SEPARATOR.join(problems) or None


def attribute_count(payload: dict, raw: str | bytes | None = None) -> int:
    """Attributes a PAYLOAD sets: each top-level key once, control keys (`_...`) not [A2.2].
    `raw`, the PAYLOAD's JSON text, lets the usual payload skip the key scan: with neither `"_`
    nor an escape (`\\u005f`) anywhere in it, no key starts with `_`."""
    if type(raw) is str and '"_' not in raw and "\\" not in raw:
        return len(payload)
    return len(payload) - len([key for key in payload if key[:1] == "_"])


def _payload_facts(
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
            notes["payload_problem"][i] = _decode_problem(exc)
            continue
        if type(payload) is not dict:
            problem[i] = 1
            notes["payload_problem"][i] = f"PAYLOAD must be a JSON object: got {type(payload).__name__}"
            continue
        lossy = _lossy_json(raw, payload)
        if lossy is not None:
            problem[i] = 1
            notes["payload_problem"][i] = lossy
            continue
        payloads[i] = payload
        if counted:
            attributes[i] = attribute_count(payload, raw)
        forbidden = every if strict or codes[i] in _SECONDARY_ONLY else primary
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
                    f"{', '.join(unknown)[:80]} (allowed: {', '.join(sorted(allowed))})"
                ]
        if not problems and rules is not None:
            problems = rules(payload)
        if problems:
            type_problem[i] = len(problems)
            notes["type_problem"][i] = _PROBLEM_SEPARATOR.join(problems)
    return payloads


# ----------------------------------------------------------------------------- pandera schemas
#: The facts the schema judges, one rule each: counts and codes, 0 meaning "fine" for the
#: `*_problem`/`*_keys` columns, whose sentences are kept beside the frame.
_INT_FACTS = (
    "identifier_kinds",
    "identifier_problem",
    "alias_problem",
    "external_id_bytes",
    "payload_problem",
    "payload_bytes",
    "attribute_count",
    "payload_identifier_keys",
    "type_problem",
)


def allowed_kind_codes(spec: DataTypeSpec) -> list[int]:
    """Kind codes a row of this data type may have: exactly one kind, or email with phone."""
    codes = [KIND_BITS[kind] for kind in spec.identifier_kinds]
    if {"EMAIL", "PHONE"} <= set(spec.identifier_kinds):
        codes.append(KIND_BITS["EMAIL"] | KIND_BITS["PHONE"])  # CDI: email wins [A2.1][B1.3]
    return codes


def _schema_for(spec: DataTypeSpec) -> pa.DataFrameSchema:
    """The pandera schema over the facts of a batch; each column carries exactly one rule."""
    columns = {
        # pandas-stubs allow only "ns"; pandas 2 takes "us"
        "updated_at": pa.Column(pd.DatetimeTZDtype("us", "UTC"), nullable=False),  # type: ignore[arg-type]
        "identifier_kinds": pa.Column(int, pa.Check.isin(allowed_kind_codes(spec), name="one_identifier")),
        "identifier_problem": pa.Column(int, pa.Check.eq(0, name="identifier_text")),
        "alias_problem": pa.Column(int, pa.Check.eq(0, name="alias_pair")),
        "external_id_bytes": pa.Column(
            int, pa.Check.le(contract.EXTERNAL_ID_MAX_BYTES, name="external_id_size")
        ),
    }
    if spec.has_payload:
        columns.update(
            payload_problem=pa.Column(int, pa.Check.eq(0, name="payload_json")),
            payload_bytes=pa.Column(int, pa.Check.le(contract.PAYLOAD_MAX_BYTES, name="payload_size")),
            payload_identifier_keys=pa.Column(int, pa.Check.eq(0, name="payload_identifiers")),
            type_problem=pa.Column(int, pa.Check.eq(0, name=f"{spec.name}_fields")),
        )
    if spec.name == "attributes":
        columns["attribute_count"] = pa.Column(
            int, pa.Check.le(contract.MAX_ATTRIBUTES_PER_ROW, name="attribute_count")
        )
    return pa.DataFrameSchema(columns, name=f"cdi_{spec.name}", strict=False, coerce=False)


SCHEMAS: dict[str, pa.DataFrameSchema] = {name: _schema_for(s) for name, s in DATA_TYPES.items()}


def _reason(column: str, value: Any, spec: DataTypeSpec, note: str | None) -> str:
    if note is not None:
        if column == "payload_identifier_keys":
            return f"PAYLOAD contains identifier keys (identifiers belong in their own columns): {note}"
        return note  # the *_problem sentences
    if column == "updated_at":
        return "UPDATED_AT is null"
    if column == "identifier_kinds":
        kinds = kinds_of(int(value))
        if not kinds:
            shown = ", ".join("ALIAS_NAME+ALIAS_LABEL" if k == "ALIAS" else k for k in spec.identifier_kinds)
            return f"row has no identifier (set exactly one of {shown})"
        if len(kinds) > 1:
            return f"row has several identifier types (CDI rows carry exactly one): {', '.join(kinds)}"
        return (
            f"{spec.name} rows cannot use EMAIL or PHONE (Braze deletes by EXTERNAL_ID, "
            f"alias or BRAZE_ID only): {kinds[0]}"
        )
    if column == "alias_problem":
        return (
            "ALIAS_NAME is set but ALIAS_LABEL is empty (a user alias needs both)"
            if value == 1
            else "ALIAS_LABEL is set but ALIAS_NAME is empty (a user alias needs both)"
        )
    if column == "external_id_bytes":
        return (
            f"EXTERNAL_ID is longer than {contract.EXTERNAL_ID_MAX_BYTES} bytes "
            f"(EXTERNAL_USER_ID_TOO_LARGE): {value} bytes"
        )
    if column == "payload_bytes":
        return f"Payload was greater than 1MB: {value} bytes"
    if column == "attribute_count":
        return f"PAYLOAD has more than {contract.MAX_ATTRIBUTES_PER_ROW} attributes: {value}"
    return f"{column}: {value}"


def validate_facts(
    facts: pd.DataFrame, spec: DataTypeSpec, notes: dict[str, dict[int, str]] | None = None
) -> dict[int, list[str]]:
    """Run the data type's pandera schema lazily; return {row position: [reasons]} for failing
    rows. `notes` holds the sentences behind the non-zero `*_problem`/`*_keys` facts."""
    notes = notes or {}
    try:
        SCHEMAS[spec.name].validate(facts, lazy=True)
    except pa.errors.SchemaErrors as err:
        reasons: dict[int, list[str]] = {}
        cases = err.failure_cases
        for column, index, value in zip(cases["column"], cases["index"], cases["failure_case"], strict=True):
            if index is None or (isinstance(index, float) and index != index):
                raise  # a frame-level failure (wrong dtype): a bug, not bad input
            note = notes.get(column, {}).get(int(index))
            reasons.setdefault(int(index), []).extend(
                _reason(column, value, spec, note).split(_PROBLEM_SEPARATOR)
            )
        return {i: reasons[i] for i in sorted(reasons)}
    return {}


@dataclass
class CheckedRows:
    """A batch after validation: reasons by row position, parsed payloads, the data points each
    valid row costs, and the batch itself (identifiers by row: `batch.identifiers(i)`)."""

    batch: RowBatch
    failures: dict[int, list[str]]
    payloads: list[dict | None]
    data_points: np.ndarray

    def identifiers(self, i: int) -> dict[str, Any]:
        return self.batch.identifiers(i)


def validate_batch(batch: RowBatch, spec: DataTypeSpec) -> CheckedRows:
    """Validate a batch with the data type's schema: identifier facts are worked out column-wise,
    each PAYLOAD is parsed once, and pandera judges the facts of the whole batch at once."""
    n = batch.num_rows
    facts = {name: np.zeros(n, dtype=np.int64) for name in _INT_FACTS}
    facts["identifier_kinds"] = batch.codes
    facts["alias_problem"] = batch.alias_problem
    external = batch.columns.get("EXTERNAL_ID")
    if external is not None:
        facts["external_id_bytes"] = np.fromiter(
            (0 if v is None else len(v) if v.isascii() else len(v.encode()) for v in external),
            dtype=np.int64,
            count=n,
        )
    notes: dict[str, dict[int, str]] = {
        "payload_problem": {},
        "payload_identifier_keys": {},
        "type_problem": {},
        "identifier_problem": {},
    }
    for i, sentences in batch.identifier_problems.items():
        facts["identifier_problem"][i] = len(sentences)
        notes["identifier_problem"][i] = _PROBLEM_SEPARATOR.join(sentences)
    payloads: list[dict | None] = [None] * n
    if spec.has_payload:
        payloads = _payload_facts(batch, spec, facts, notes)
    frame = pd.DataFrame(
        {"updated_at": batch.updated_at.to_pandas().astype("datetime64[us, UTC]"), **facts}, copy=False
    )
    failures = validate_facts(frame, spec, notes) if n else {}
    if spec.name == "attributes":
        points = facts["attribute_count"]
    else:
        points = np.full(n, 1 if spec.name in ("events", "purchases") else 0, dtype=np.int64)
    return CheckedRows(batch, failures, payloads, points)


def validate_rows(rows: list[dict[str, Any]], spec: DataTypeSpec) -> CheckedRows:
    """Validate source rows given as dicts (upper-case column names), e.g. a preview sample."""
    return validate_batch(RowBatch.from_rows(rows), spec)


# ----------------------------------------------------------------------------- API objects
def identifier_fields(identifiers: dict[str, Any]) -> dict[str, Any]:
    """A valid row's identifier as `/users/track` object fields [B1.1]: one primary identifier, or
    email and/or phone (Braze looks up by email when both are present [B1.3])."""
    fields = {}
    for kind, value in identifiers.items():
        if kind == "ALIAS":
            fields["user_alias"] = {"alias_name": value[0], "alias_label": value[1]}
        else:
            fields[kind.lower()] = value
    return fields


def braze_times(stamps: pyarrow.Array) -> list[str | None]:
    """Braze's ISO 8601 times (`2024-05-01T12:00:00.123Z`, milliseconds truncated) for a
    timestamp[us, UTC] array, column-wise."""
    text = stamps.cast(pyarrow.timestamp("ms"), safe=False).cast(pyarrow.string())
    text = pc.replace_substring(text, " ", "T", max_replacements=1)  # "YYYY-MM-DD HH:MM:SS.mmm"
    return pc.binary_join_element_wise(text, "Z", "").to_pylist()


def build_objects(
    checked: CheckedRows, spec: DataTypeSpec, positions: list[int], update_existing_only: bool
) -> list[bytes | None]:
    """The valid rows at `positions` as the JSON objects Braze receives: track objects, or
    `[key, id]` pairs for deletions (grouped into requests by delivery). A row whose object cannot
    be serialized (nested deeper than the serializer goes) gets None here and its reason in
    `checked.failures`."""
    batch, payloads = checked.batch, checked.payloads
    dumps = json_bytes
    objects: list[bytes | None] = []
    if spec.name == "deletions":
        for i in positions:
            kind, value = next(iter(batch.identifiers(i).items()))
            if kind == "ALIAS":
                objects.append(dumps(["user_aliases", {"alias_name": value[0], "alias_label": value[1]}]))
            else:
                objects.append(dumps([f"{kind.lower()}s", value]))
        return objects
    single = {
        KIND_BITS[k]: (k.lower(), batch.columns[k])
        for k in ("EXTERNAL_ID", "BRAZE_ID", "EMAIL", "PHONE")
        if k in batch.columns
    }
    codes = batch.codes.tolist()
    times = braze_times(batch.updated_at) if spec.name != "attributes" else None
    for i in positions:
        payload = payloads[i]
        if payload is None:  # validation rejects every row without a usable PAYLOAD
            raise ValueError(f"row {i} has no valid PAYLOAD: only valid rows become objects")
        plain = single.get(codes[i])
        if plain is not None:  # one identifier column: the usual row
            obj = {plain[0]: plain[1][i], **payload}
        else:
            obj = {**identifier_fields(batch.identifiers(i)), **payload}
        if times is None:
            # An alias-only user is created only with an explicit false [ATTR]; CDI's toggle decides.
            obj.setdefault("_update_existing_only", update_existing_only)
        else:
            obj.setdefault("time", times[i])  # CDI: no `time` -> UPDATED_AT [A2.2]
            if update_existing_only:
                obj.setdefault("_update_existing_only", True)
        try:
            objects.append(dumps(obj))
        except TypeError as exc:  # orjson.JSONEncodeError: too deep (the only way a parsed
            objects.append(None)  # payload fails to serialize again)
            checked.failures[i] = [
                f"PAYLOAD nests deeper than {MAX_NESTING} levels (too deep to send)"
                if "ecursion" in str(exc)
                else "PAYLOAD cannot be serialized for Braze"
            ]
    return objects
