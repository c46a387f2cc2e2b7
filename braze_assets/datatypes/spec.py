"""The table of data types: what each CDI data type's rows carry and where Braze takes them.

Adding a data type is one more `DataTypeSpec` entry, not a new code path.
"""

from __future__ import annotations

from dataclasses import dataclass

from braze_assets.braze import contract

IDENTIFIER_COLUMNS = ("EXTERNAL_ID", "ALIAS_NAME", "ALIAS_LABEL", "BRAZE_ID", "EMAIL", "PHONE")
#: Identifier kinds a row may carry (the alias is one kind made of two columns).
IDENTIFIER_KINDS = ("EXTERNAL_ID", "ALIAS", "BRAZE_ID", "EMAIL", "PHONE")


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
    def budget(self) -> str:
        """The Braze rate budget this type's requests count against: every asynchronous catalog
        item endpoint shares one, whatever the catalog and method; each other endpoint has its own
        (docs/braze-contract.md). Delivery leases from it and the dry run prices by it."""
        return contract.CATALOG_ITEMS_BUDGET if self.request_key is not None else self.endpoint

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


#: Bit of each identifier kind in a row's kind code (the schema judges codes, reasons name kinds).
KIND_BITS = {kind: 1 << n for n, kind in enumerate(IDENTIFIER_KINDS)}
#: Kind codes of rows identified by email and/or phone only (no primary identifier).
SECONDARY_ONLY = frozenset({KIND_BITS["EMAIL"], KIND_BITS["PHONE"], KIND_BITS["EMAIL"] | KIND_BITS["PHONE"]})


def kinds_of(code: int) -> tuple[str, ...]:
    """The identifier kinds in a kind code, in `IDENTIFIER_KINDS` order."""
    return tuple(kind for kind in IDENTIFIER_KINDS if code & KIND_BITS[kind])


def allowed_kind_codes(spec: DataTypeSpec) -> list[int]:
    """Kind codes a row of this data type may have: exactly one kind, or email with phone."""
    codes = [KIND_BITS[kind] for kind in spec.identifier_kinds]
    if {"EMAIL", "PHONE"} <= set(spec.identifier_kinds):
        codes.append(KIND_BITS["EMAIL"] | KIND_BITS["PHONE"])  # CDI: email wins [A2.1][B1.3]
    return codes
