"""The four CDI data types as one table-driven spec.

Per data type: the columns a source table must/may have, the Braze endpoint and batch limits, the
pandera schema every row must pass, and how a valid row becomes a Braze API object. Adding a data type
(catalogs, say) is one more `DataTypeSpec`, not a new code path.

Validation works in two steps. `row_facts` reads each row once (JSON parse, identifier resolution,
sizes, the type's own field rules) into a flat frame of facts; the data type's pandera schema then
judges those facts, so every rule is declared in one place and each failing rule becomes one specific,
human reason on that row (`validate_facts`).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Callable

import orjson
import pandas as pd
import pandera.pandas as pa

from braze_assets.braze import contract

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

    @property
    def required_columns(self) -> tuple[str, ...]:
        return ("UPDATED_AT", "PAYLOAD") if self.has_payload else ("UPDATED_AT",)


_EVENT_KEYS = frozenset({"name", "time", "app_id", "properties", "_update_existing_only"})
_PURCHASE_KEYS = frozenset(
    {"product_id", "currency", "price", "quantity", "time", "app_id", "properties",
     "_update_existing_only"}
)

DATA_TYPES: dict[str, DataTypeSpec] = {
    "attributes": DataTypeSpec(
        "attributes", "/users/track", "attributes", True, IDENTIFIER_KINDS, None, (),
        contract.TRACK_MAX_OBJECTS,
    ),
    "events": DataTypeSpec(
        "events", "/users/track", "events", True, IDENTIFIER_KINDS, _EVENT_KEYS, ("name",),
        contract.TRACK_MAX_OBJECTS,
    ),
    "purchases": DataTypeSpec(
        "purchases", "/users/track", "purchases", True, IDENTIFIER_KINDS, _PURCHASE_KEYS,
        ("product_id", "currency", "price"), contract.TRACK_MAX_OBJECTS,
    ),
    "deletions": DataTypeSpec(
        "deletions", "/users/delete", None, False, ("EXTERNAL_ID", "ALIAS", "BRAZE_ID"), None, (),
        contract.DELETE_MAX_IDS,
    ),
}


# ----------------------------------------------------------------------------- row facts
def _text(value: Any) -> str | None:
    """An identifier value exactly as stored (Braze matches it exactly), None for NULL/blank."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value)
    return text if text.strip() else None


def row_identifiers(row: dict[str, Any]) -> dict[str, Any]:
    """The identifier kinds present in a row: kind -> value (alias -> (name, label))."""
    found: dict[str, Any] = {}
    for kind in ("EXTERNAL_ID", "BRAZE_ID", "EMAIL", "PHONE"):
        value = _text(row.get(kind))
        if value is not None:
            found[kind] = value
    name, label = _text(row.get("ALIAS_NAME")), _text(row.get("ALIAS_LABEL"))
    if name is not None or label is not None:
        found["ALIAS"] = (name, label)
    return found


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _event_problems(payload: dict) -> list[str]:
    problems = []
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append("event PAYLOAD has no 'name' (a non-empty string)")
    if "time" in payload and parse_braze_time(payload["time"]) is None:
        problems.append(f"event 'time' is not ISO 8601: {str(payload['time'])[:40]!r}")
    return problems + _properties_problems(payload, "event")


def _properties_problems(payload: dict, what: str) -> list[str]:
    properties = payload.get("properties")
    if properties is None:
        return []
    if not isinstance(properties, dict):
        return [f"{what} 'properties' must be a JSON object"]
    problems = []
    for key in properties:
        if not key or len(key) > contract.MAX_NAME_CHARS or key.startswith("$"):
            problems.append(f"{what} property names must be 1-255 characters, not starting with $: "
                            f"{key[:40]!r}")
        elif key in ("time", "event_name"):
            problems.append(f"{what} property name is reserved by Braze: {key!r}")
    return problems


def _purchase_problems(payload: dict) -> list[str]:
    missing = [k for k in ("product_id", "currency", "price") if payload.get(k) in (None, "")]
    problems = [f"purchase PAYLOAD is missing required keys: {', '.join(missing)}"] if missing else []
    product_id, currency = payload.get("product_id"), payload.get("currency")
    if product_id not in (None, "") and (
        not isinstance(product_id, str) or len(product_id) > contract.MAX_NAME_CHARS
    ):
        problems.append("purchase 'product_id' must be a string of at most 255 characters")
    if currency not in (None, "") and currency not in contract.ISO_4217_CURRENCIES:
        problems.append(f"purchase 'currency' is not an ISO 4217 currency code: "
                        f"{str(currency)[:20]!r}")
    if payload.get("price") not in (None, "") and not _is_number(payload["price"]):
        problems.append(f"purchase 'price' must be a number: got {str(payload['price'])[:20]!r}")
    quantity = payload.get("quantity", 1)
    if not isinstance(quantity, int) or isinstance(quantity, bool) or not (
        contract.PURCHASE_QUANTITY_MIN <= quantity <= contract.PURCHASE_QUANTITY_MAX
    ):
        problems.append(f"purchase 'quantity' must be a whole number from 1 to 100: "
                        f"got {str(quantity)[:20]!r}")
    if "time" in payload and parse_braze_time(payload["time"]) is None:
        problems.append(f"purchase 'time' is not ISO 8601: {str(payload['time'])[:40]!r}")
    return problems + _properties_problems(payload, "purchase")


_TYPE_RULES: dict[str, Callable[[dict], list[str]]] = {
    "events": _event_problems,
    "purchases": _purchase_problems,
}
#: Separates several field problems of one row inside the `type_problem` fact.
_PROBLEM_SEPARATOR = "\n"


def attribute_count(payload: dict) -> int:
    """Attributes a PAYLOAD sets: each top-level key once, control keys (`_...`) not [A2.2]."""
    return sum(1 for key in payload if not key.startswith("_"))


def estimated_data_points(spec: DataTypeSpec, attributes: int) -> int:
    """Braze data points a valid row costs: one per attribute, one per event or purchase [A4.5]."""
    if spec.name == "attributes":
        return attributes
    return 1 if spec.name in ("events", "purchases") else 0


def row_facts(row: dict[str, Any], spec: DataTypeSpec, identifiers: dict[str, Any]
              ) -> tuple[dict[str, Any], dict | None]:
    """Everything the schema judges about one row (whose `row_identifiers` are given), and the
    parsed PAYLOAD (None if unusable)."""
    alias = identifiers.get("ALIAS")
    facts: dict[str, Any] = {
        "updated_at": row.get("UPDATED_AT"),
        "identifier_kinds": "+".join(k for k in IDENTIFIER_KINDS if k in identifiers),
        "alias_problem": (
            "ALIAS_NAME is set but ALIAS_LABEL is empty (a user alias needs both)"
            if alias and alias[1] is None
            else "ALIAS_LABEL is set but ALIAS_NAME is empty (a user alias needs both)"
            if alias and alias[0] is None
            else ""
        ),
        "external_id_bytes": len(identifiers.get("EXTERNAL_ID", "").encode()),
        "payload_problem": "",
        "payload_bytes": 0,
        "attribute_count": 0,
        "payload_identifier_keys": "",
        "type_problem": "",
    }
    if not spec.has_payload:
        return facts, None
    raw = row.get("PAYLOAD")
    if isinstance(raw, (dict, list)):  # warehouses with typed JSON/STRUCT payloads
        raw = orjson.dumps(raw).decode()
    if raw is None:
        facts["payload_problem"] = "PAYLOAD is null"
        return facts, None
    facts["payload_bytes"] = len(raw.encode()) if isinstance(raw, str) else len(raw)
    if facts["payload_bytes"] > contract.PAYLOAD_MAX_BYTES:
        return facts, None  # reported by the size rule; not worth parsing
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        facts["payload_problem"] = f"PAYLOAD is not valid JSON: {str(exc).split(':')[0]}"
        return facts, None
    if not isinstance(payload, dict):
        facts["payload_problem"] = f"PAYLOAD must be a JSON object: got {type(payload).__name__}"
        return facts, None
    facts["attribute_count"] = attribute_count(payload)
    forbidden = set(contract.PRIMARY_IDENTIFIERS)
    if spec.name != "attributes" or facts["identifier_kinds"] in ("EMAIL", "PHONE", "EMAIL+PHONE"):
        forbidden |= set(contract.SECONDARY_IDENTIFIERS)
    facts["payload_identifier_keys"] = ", ".join(sorted(forbidden & payload.keys()))
    if spec.allowed_payload_keys is not None:
        unknown = sorted(payload.keys() - spec.allowed_payload_keys - forbidden)
        if unknown:
            facts["type_problem"] = (
                f"{spec.name[:-1]} PAYLOAD has keys Braze does not take: {', '.join(unknown)[:80]} "
                f"(allowed: {', '.join(sorted(spec.allowed_payload_keys))})"
            )
    if not facts["type_problem"] and spec.name in _TYPE_RULES:
        facts["type_problem"] = _PROBLEM_SEPARATOR.join(_TYPE_RULES[spec.name](payload))
    return facts, payload


# ----------------------------------------------------------------------------- pandera schemas
def _empty(series: pd.Series) -> pd.Series:
    return series == ""


def _schema_for(spec: DataTypeSpec) -> pa.DataFrameSchema:
    """The pandera schema over `row_facts` columns; each column carries exactly one rule."""
    allowed = set(spec.identifier_kinds)
    if {"EMAIL", "PHONE"} <= allowed:
        allowed.add("EMAIL+PHONE")  # CDI: with both, email is the identifier [A2.1][B1.3]
    columns = {
        "updated_at": pa.Column(pd.DatetimeTZDtype("us", "UTC"), nullable=False),
        "identifier_kinds": pa.Column(
            str,
            pa.Check(
                lambda s: s.map(lambda v: v in allowed),
                name="one_identifier",
            ),
        ),
        "alias_problem": pa.Column(str, pa.Check(_empty, name="alias_pair")),
        "external_id_bytes": pa.Column(
            int, pa.Check.le(contract.EXTERNAL_ID_MAX_BYTES, name="external_id_size")
        ),
    }
    if spec.has_payload:
        columns.update(
            payload_problem=pa.Column(str, pa.Check(_empty, name="payload_json")),
            payload_bytes=pa.Column(
                int, pa.Check.le(contract.PAYLOAD_MAX_BYTES, name="payload_size")
            ),
            payload_identifier_keys=pa.Column(str, pa.Check(_empty, name="payload_identifiers")),
            type_problem=pa.Column(str, pa.Check(_empty, name=f"{spec.name}_fields")),
        )
    if spec.name == "attributes":
        columns["attribute_count"] = pa.Column(
            int, pa.Check.le(contract.MAX_ATTRIBUTES_PER_ROW, name="attribute_count")
        )
    return pa.DataFrameSchema(columns, name=f"cdi_{spec.name}", strict=False, coerce=False)


SCHEMAS: dict[str, pa.DataFrameSchema] = {name: _schema_for(s) for name, s in DATA_TYPES.items()}


def _reason(column: str, value: Any, spec: DataTypeSpec) -> str:
    if column == "updated_at":
        return "UPDATED_AT is null"
    if column == "identifier_kinds":
        if not value:
            kinds = ", ".join("ALIAS_NAME+ALIAS_LABEL" if k == "ALIAS" else k
                              for k in spec.identifier_kinds)
            return f"row has no identifier (set exactly one of {kinds})"
        kinds = value.split("+")
        if len(kinds) > 1:
            return f"row has several identifier types (CDI rows carry exactly one): {', '.join(kinds)}"
        return (f"{spec.name} rows cannot use EMAIL or PHONE (Braze deletes by EXTERNAL_ID, "
                f"alias or BRAZE_ID only): {value}")
    if column == "external_id_bytes":
        return (f"EXTERNAL_ID is longer than {contract.EXTERNAL_ID_MAX_BYTES} bytes "
                f"(EXTERNAL_USER_ID_TOO_LARGE): {value} bytes")
    if column == "payload_bytes":
        return f"Payload was greater than 1MB: {value} bytes"
    if column == "attribute_count":
        return f"PAYLOAD has more than {contract.MAX_ATTRIBUTES_PER_ROW} attributes: {value}"
    if column == "payload_identifier_keys":
        return f"PAYLOAD contains identifier keys (identifiers belong in their own columns): {value}"
    return str(value)  # the *_problem columns already hold the sentence


def validate_facts(facts: pd.DataFrame, spec: DataTypeSpec) -> dict[int, list[str]]:
    """Run the data type's pandera schema lazily; return {row position: [reasons]} for failing rows."""
    try:
        SCHEMAS[spec.name].validate(facts, lazy=True)
    except pa.errors.SchemaErrors as err:
        reasons: dict[int, list[str]] = {}
        cases = err.failure_cases
        for column, index, value in zip(cases["column"], cases["index"], cases["failure_case"]):
            if index is None or (isinstance(index, float) and index != index):
                raise  # a frame-level failure (wrong dtype): a bug, not bad input
            reasons.setdefault(int(index), []).extend(
                _reason(column, value, spec).split(_PROBLEM_SEPARATOR))
        return reasons
    return {}


@dataclass
class CheckedRows:
    """A batch of rows after validation: reasons by row position, parsed payloads, identifiers."""

    failures: dict[int, list[str]]
    payloads: list[dict | None]
    identifiers: list[dict[str, Any]]
    data_points: list[int]


def validate_rows(rows: list[dict[str, Any]], spec: DataTypeSpec) -> CheckedRows:
    """Validate source rows (upper-case column names) with the data type's schema."""
    if not rows:
        return CheckedRows({}, [], [], [])
    facts, payloads, identifiers = [], [], []
    for row in rows:
        found = row_identifiers(row)
        fact, payload = row_facts(row, spec, found)
        facts.append(fact)
        payloads.append(payload)
        identifiers.append(found)
    frame = pd.DataFrame(facts, columns=list(SCHEMAS[spec.name].columns))
    frame["updated_at"] = pd.to_datetime(frame["updated_at"], utc=True).astype(
        "datetime64[us, UTC]")
    points = [estimated_data_points(spec, fact["attribute_count"]) for fact in facts]
    return CheckedRows(validate_facts(frame, spec), payloads, identifiers, points)


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


def braze_time(ts: pd.Timestamp | dt.datetime) -> str:
    return ts.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def build_object(
    spec: DataTypeSpec, identifiers: dict[str, Any], payload: dict | None, updated_at: Any,
    update_existing_only: bool,
) -> Any:
    """A valid row as the object Braze receives: a track object, or (key, id) for deletions."""
    if spec.name == "deletions":
        kind, value = next(iter(identifiers.items()))
        if kind == "ALIAS":
            return ["user_aliases", {"alias_name": value[0], "alias_label": value[1]}]
        return [f"{kind.lower()}s", value]
    obj = {**identifier_fields(identifiers), **payload}
    if spec.name == "attributes":
        # An alias-only user is created only with an explicit false [ATTR]; CDI's toggle decides.
        obj.setdefault("_update_existing_only", update_existing_only)
    else:
        obj.setdefault("time", braze_time(updated_at))  # CDI: no `time` -> UPDATED_AT [A2.2]
        if update_existing_only:
            obj.setdefault("_update_existing_only", True)
    return obj
