"""Catalogs in the local Braze emulator: their schemas, their items, and the checks of the catalog
endpoints (``docs/braze-contract.md`` B2a).

Pure functions and a plain holder, no I/O: the emulator's server calls :func:`new_catalog` for
``POST /catalogs`` and :func:`check_items` for ``PUT``/``DELETE /catalogs/{name}/items``; its store keeps
:class:`Catalog` objects under its own lock. Errors take Braze's catalog shape, ``{"id", "message",
"parameters", "parameter_values"}``, one entry per error id naming every offending item by its id, so a
client can drop those items and resend the rest. Messages marked B2a are Braze's own strings; the others
are the emulator's wording where Braze documents none.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from braze_assets.braze.contract import (
    CATALOG_ARRAY_MAX_ITEMS,
    CATALOG_FIELD_TYPES,
    CATALOG_ID_CHARS,
    CATALOG_ID_MAX_CHARS,
    CATALOG_MAX_FIELDS,
    CATALOG_MAX_ITEMS,
    CATALOG_MAX_NESTING,
    CATALOG_NAME_MAX_CHARS,
    CATALOG_VALUE_MAX_CHARS,
)

#: The paths of the asynchronous catalog item endpoints, which share one rate limit (B3).
CATALOG_ITEMS_PATH = re.compile(r"/catalogs/[^/]+/items")
_NAME = re.compile(CATALOG_ID_CHARS)  # item ids, catalog names and field names share one alphabet

MSG_INVALID_REQUEST = "Invalid Request"  # B2a
#: Item errors in the order the emulator reports them, with their messages.
ITEM_ERRORS = {
    "item-array-invalid": "'items' must be a non-empty array of objects",
    "request-includes-too-many-items": f"The request has more than {CATALOG_MAX_ITEMS} items",
    "items-missing-ids": "There are {} item(s) that do not have ids",  # B2a
    "ids-not-string": "Item ids must be strings",  # the PUT page's id; DELETE says ids-not-strings
    "ids-not-strings": "Item ids must be strings",
    "ids-too-large": f"Item ids can not be larger than {CATALOG_ID_MAX_CHARS} characters",  # B2a
    "invalid-ids": "Item ids can only include letters, numbers, hyphens, and underscores",  # B2a
    "ids-not-unique": "Item ids must be unique within a request",
    "invalid-fields": "Some of the fields given do not exist in the catalog",  # B2a
    "items-too-large": f"Item values can not be longer than {CATALOG_VALUE_MAX_CHARS:,} characters",
    "invalid-keys-in-value-object": "Keys of object values can not include '.' or '$'",
    "too-deep-nesting-in-value-object": f"Object values can not nest more than {CATALOG_MAX_NESTING} levels",
    "unable-to-coerce-value": "Some values do not match their field's type",
}


def catalog_error(error_id: str, message: str, parameters: Iterable[str] = (), values: Iterable = ()) -> dict:
    """One entry of an ``errors`` array (B2a)."""
    return {
        "id": error_id,
        "message": message,
        "parameters": list(parameters),
        "parameter_values": list(values),
    }


def invalid_request(errors: list[dict]) -> dict:
    """The body of a refused catalog request: ``{"message": "Invalid Request", "errors": [...]}`` (B2a)."""
    return {"message": MSG_INVALID_REQUEST, "errors": errors}


def catalog_not_found(name: str) -> dict:
    return invalid_request(
        [catalog_error("catalog-not-found", "Could not find catalog", ["catalog_name"], [name])]
    )


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Catalog:
    """One catalog: its schema (``fields``: name -> type, ``id`` first) and its items by id."""

    name: str
    description: str
    fields: dict[str, str]
    items: dict[str, dict] = field(default_factory=dict)
    updated_at: datetime = field(default_factory=_now)

    def public(self) -> dict:
        """The catalog as ``POST /catalogs`` and ``GET /catalogs`` show it."""
        return {
            "description": self.description,
            "fields": [{"name": name, "type": kind} for name, kind in self.fields.items()],
            "name": self.name,
            "num_items": len(self.items),
            "updated_at": self.updated_at.isoformat(timespec="milliseconds"),
        }

    def fresh(self) -> Catalog:
        """The same schema with no items (what a reset leaves of a configured catalog)."""
        return Catalog(self.name, self.description, dict(self.fields))

    def apply(self, method: str, items: list[dict]) -> None:
        """``PUT`` replaces each item whole, creating missing ones; ``DELETE`` removes them (an id that
        is not there is no error). The caller has checked ``items`` with :func:`check_items`."""
        for item in items:
            if method == "PUT":
                self.items[item["id"]] = dict(item)
            else:
                self.items.pop(item["id"], None)
        self.updated_at = _now()

    def dump(self) -> dict:
        return {**self.public(), "items": list(self.items.values())}

    @classmethod
    def load(cls, data: dict) -> Catalog:
        fields = {spec["name"]: spec["type"] for spec in data["fields"]}
        items = {item["id"]: item for item in data["items"]}
        return cls(
            data["name"], data["description"], fields, items, datetime.fromisoformat(data["updated_at"])
        )


# --- POST /catalogs ------------------------------------------------------------------------------------
def _schema_errors(name: Any, description: Any, fields: Any) -> list[dict]:
    if not isinstance(name, str) or not isinstance(description, str):
        return [catalog_error("catalog-array-invalid", "A catalog needs a string 'name' and 'description'")]
    errors = []
    if len(name) > CATALOG_NAME_MAX_CHARS:
        errors.append(
            catalog_error("catalog-name-too-large", "The catalog name is too long", ["name"], [name])
        )
    elif not _NAME.fullmatch(name):
        message = "Catalog names can only include letters, numbers, hyphens, and underscores"
        errors.append(catalog_error("invalid-catalog-name", message, ["name"], [name]))
    if len(description) > CATALOG_NAME_MAX_CHARS:
        errors.append(catalog_error("description-too-long", "The description is too long", ["description"]))
    if not (
        isinstance(fields, list)
        and fields
        and all(isinstance(spec, dict) and spec.keys() == {"name", "type"} for spec in fields)
        and all(isinstance(spec["name"], str) and isinstance(spec["type"], str) for spec in fields)
    ):
        message = "'fields' must be an array of objects with a string 'name' and 'type'"
        return [*errors, catalog_error("invalid-fields", message, ["fields"])]
    if fields[0] != {"name": "id", "type": "string"}:
        errors.append(catalog_error("id-not-first-column", "The first field must be 'id' of type 'string'"))
    names = [spec["name"] for spec in fields]
    for error_id, message, bad in (
        ("too-many-fields", f"A catalog has at most {CATALOG_MAX_FIELDS} fields", names[CATALOG_MAX_FIELDS:]),
        (
            "field-names-too-large",
            f"Field names can not be longer than {CATALOG_NAME_MAX_CHARS} characters",
            [n for n in names if len(n) > CATALOG_NAME_MAX_CHARS],
        ),
        (
            "invalid-field-names",
            "Field names can only include letters, numbers, hyphens, and underscores",
            [n for n in names if not _NAME.fullmatch(n)],
        ),
        (
            "field-names-not-unique",
            "Field names must be unique",
            sorted(n for n, k in Counter(names).items() if k > 1),
        ),
        (
            "invalid-field-types",
            f"Field types are {', '.join(sorted(CATALOG_FIELD_TYPES))}",
            [spec["type"] for spec in fields if spec["type"] not in CATALOG_FIELD_TYPES],
        ),
    ):
        if bad:
            errors.append(catalog_error(error_id, message, ["fields"], bad))
    return errors


def new_catalog(body: Any) -> Catalog | list[dict]:
    """Check a ``POST /catalogs`` body (exactly one catalog, B2a): the new catalog, or the errors.
    Whether the name is taken is the store's to say."""
    catalogs = body.get("catalogs") if isinstance(body, dict) else None
    if not isinstance(catalogs, list) or not catalogs or not all(isinstance(c, dict) for c in catalogs):
        return [catalog_error("catalog-array-invalid", "'catalogs' must be an array of objects")]
    if len(catalogs) > 1:
        return [catalog_error("too-many-catalog-atoms", "Only one catalog can be created per request")]
    [spec] = catalogs
    errors = _schema_errors(spec.get("name"), spec.get("description"), spec.get("fields"))
    if errors:
        return errors
    return Catalog(spec["name"], spec["description"], {f["name"]: f["type"] for f in spec["fields"]})


def name_taken(name: str) -> dict:
    message = "A catalog with that name already exists"  # B2a
    return invalid_request([catalog_error("catalog-name-already-exists", message, ["name"], [name])])


def configured_catalog(name: str, fields: Mapping[str, str], description: str = "") -> Catalog:
    """A catalog given by name and ``{field: type}`` (``id`` may be left out: it is always the first
    field, a string); raises ``ValueError`` with the errors ``POST /catalogs`` would answer."""
    specs = [{"name": "id", "type": "string"}]
    specs += [{"name": k, "type": v} for k, v in fields.items() if (k, v) != ("id", "string")]
    result = new_catalog({"catalogs": [{"name": name, "description": description, "fields": specs}]})
    if isinstance(result, list):
        problems = "; ".join(f"{e['id']} {e['parameter_values'] or ''}".rstrip() for e in result)
        raise ValueError(f"catalog {name!r}: {problems}")
    return result


def parse_catalog_option(text: str) -> tuple[str, dict[str, str]]:
    """``--catalog products:title=string,price=number`` -> ``("products", {"title": "string", ...})``."""
    name, _, spec = text.partition(":")
    fields: dict[str, str] = {}
    for pair in filter(None, spec.split(",")):
        key, equals, kind = pair.partition("=")
        if not equals:
            raise ValueError(f"--catalog {text!r}: expected NAME:FIELD=TYPE,..., got {pair!r}")
        fields[key.strip()] = kind.strip()
    configured_catalog(name, fields)  # the same checks as the server's
    return name, fields


# --- PUT and DELETE /catalogs/{name}/items -------------------------------------------------------------
def _walk(value: Any) -> tuple[int, bool, int]:
    """The longest string in a value, whether an object in it has a key with ``.`` or ``$``, and how
    deep objects and arrays nest in it (iterative: JSON may nest deeper than Python recurses)."""
    longest, bad_key, deepest = 0, False, 0
    stack = [(value, 0)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, str):
            longest = max(longest, len(current))
        elif isinstance(current, dict | list):
            deepest = max(deepest, depth + 1)
            if isinstance(current, dict):
                bad_key = bad_key or any("." in key or "$" in key for key in current)
                current = list(current.values())
            stack.extend((child, depth + 1) for child in current)
    return longest, bad_key, deepest


def _is_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


_FITS = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "time": _is_time,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: (
        isinstance(v, list) and len(v) <= CATALOG_ARRAY_MAX_ITEMS and all(isinstance(s, str) for s in v)
    ),
}


def _value_problems(fields: Mapping[str, str], item: dict) -> list[str]:
    """What is wrong with an item's values against the schema (``null`` fits every field)."""
    problems = []
    for key, value in item.items():
        kind = fields.get(key)
        if kind is None:
            problems.append("invalid-fields")
        elif key != "id" and value is not None:
            longest, bad_key, depth = _walk(value)
            if longest > CATALOG_VALUE_MAX_CHARS:
                problems.append("items-too-large")
            if bad_key:
                problems.append("invalid-keys-in-value-object")
            if depth > CATALOG_MAX_NESTING:
                problems.append("too-deep-nesting-in-value-object")
            if not _FITS[kind](value):
                problems.append("unable-to-coerce-value")
    return problems


def check_items(method: str, fields: Mapping[str, str], body: Any) -> tuple[list[dict], list[dict]]:
    """Check a ``PUT`` (``method="PUT"``, items against ``fields``) or ``DELETE`` (ids only) body:
    ``(items, [])`` when it is valid, else ``([], errors)``. One bad item fails the request (B2a)."""
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
        return [], [catalog_error("item-array-invalid", ITEM_ERRORS["item-array-invalid"])]
    if len(items) > CATALOG_MAX_ITEMS:
        message = ITEM_ERRORS["request-includes-too-many-items"]
        return [], [catalog_error("request-includes-too-many-items", message, ["items"], [len(items)])]
    named: dict[str, list] = {}  # error id -> the ids of the items it applies to, in request order
    missing = 0
    for item in items:
        if "id" not in item:
            missing += 1  # nothing to name it by: counted only
            continue
        item_id = item["id"]
        problems = _value_problems(fields, item) if method == "PUT" else []
        if not isinstance(item_id, str):
            problems.append("ids-not-string" if method == "PUT" else "ids-not-strings")
        elif len(item_id) > CATALOG_ID_MAX_CHARS:
            problems.append("ids-too-large")
        elif not _NAME.fullmatch(item_id):
            problems.append("invalid-ids")
        for problem in problems:
            if item_id not in named.setdefault(problem, []):
                named[problem].append(item_id)
    ids = Counter(item["id"] for item in items if isinstance(item.get("id"), str))
    duplicates = [item_id for item_id, times in ids.items() if times > 1]
    if duplicates:
        named["ids-not-unique"] = duplicates
    errors = []
    if missing:
        errors.append(catalog_error("items-missing-ids", ITEM_ERRORS["items-missing-ids"].format(missing)))
    errors += [
        catalog_error(error_id, message, ["id"], named[error_id])
        for error_id, message in ITEM_ERRORS.items()
        if error_id in named
    ]
    return ([], errors) if errors else (items, [])
