"""Pay Braze only for what changed: attribute-level change detection for attributes syncs.

Braze bills a data point for every custom attribute written, changed or not, and the most common
CDI source, a snapshot or a view that restamps `UPDATED_AT` on every row, re-sends every attribute
every run. The ledger cannot help there: a restamped row is a new row. So, per sync and user, the
state backend remembers what Braze last accepted from this sync (`remembered`): a hash of the
user's whole PAYLOAD text and a short hash per top-level attribute. A delta then

* sets aside a row whose PAYLOAD is exactly the last accepted one, before validating it (the fast
  path of a snapshot table): it is settled as `unchanged` and sends nothing;
* sends, of any other row, only the attributes whose value changed; a `null` only when the last
  accepted value was not known to be null; a row left with nothing to send is `unchanged` too.

Always sent as they are: identifiers, control keys (`_update_existing_only`, `_merge_objects`),
`subscription_groups`, operator values (`{"add": ...}`, `{"remove": ...}`, `{"inc": ...}`, and
`$add`, `$remove`, `$update`, `$time`) and the keys a sync lists in `always_send`. What a row
remembers advances only when Braze accepts it (`Delivery`); a row that failed or is held changes
nothing, so its attributes are sent again.

The diff assumes this sync is what writes these attributes: a value changed in Braze by another
writer is not seen, and is corrected only when the warehouse value changes. `send: full_payload`
turns the diff off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

#: Keys sent as they are whatever was accepted before (besides control keys, `_...`).
ALWAYS_SENT = frozenset({"subscription_groups"})
_NULL = "null"  # what a null value is remembered as
_PERSON = b"braze-assets-ua"


def user_key(identifiers: Mapping[str, Any]) -> str:
    """Who a row is about, for the remembered attributes: its identifiers (kind and value)."""
    text = "\x1f".join(
        f"{kind}={'/'.join(x or '' for x in value) if isinstance(value, tuple) else value}"
        for kind, value in sorted(identifiers.items())
    )
    return hashlib.blake2b(text.encode(), digest_size=16, person=_PERSON).hexdigest()


def column_user_keys(columns: Mapping[str, Sequence[str | None]], num_rows: int) -> list[str]:
    """`user_key` for every row of a batch of identifier columns (text, None when absent), as
    `RowBatch.identifiers` would give them, without building a dict per row."""
    parts: list[list[str]] = [[] for _ in range(num_rows)]
    names = columns.get("ALIAS_NAME")
    labels = columns.get("ALIAS_LABEL")
    if names is not None or labels is not None:
        for i in range(num_rows):
            name = names[i] if names is not None else None
            label = labels[i] if labels is not None else None
            if name is not None or label is not None:
                parts[i].append(f"ALIAS={name or ''}/{label or ''}")
    for kind in ("BRAZE_ID", "EMAIL", "EXTERNAL_ID", "PHONE"):  # sorted, as user_key sorts kinds
        values = columns.get(kind)
        if values is not None:
            for i, value in enumerate(values):
                if value is not None:
                    parts[i].append(f"{kind}={value}")
    blake2b = hashlib.blake2b
    return [blake2b("\x1f".join(p).encode(), digest_size=16, person=_PERSON).hexdigest() for p in parts]


def payload_hash(raw: str | bytes | None) -> str | None:
    """A hash of a PAYLOAD exactly as stored (text or bytes)."""
    if raw is None:
        return None
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _value_hash(value: object) -> str:
    if value is None:
        return _NULL
    return hashlib.blake2b(orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


#: Braze's array and number operators as a top-level attribute's value: `{"add": [...]}`,
#: `{"remove": [...]}`, `{"inc": 1}` (docs/braze-contract.md, attributes).
_OPERATORS = frozenset({"add", "remove", "inc"})


def _is_operator(value: object) -> bool:
    """An instruction, not a value to compare: `{"add": [...]}`, `{"inc": 1}`, or anything with
    a `$` key (`$add`, `$remove`, `$update` on arrays of objects, `$time`)."""
    if not isinstance(value, dict) or not value:
        return False
    return value.keys() <= _OPERATORS or any(str(key).startswith("$") for key in value)


@dataclass(frozen=True)
class Remembered:
    """What Braze last accepted from this sync for one user."""

    payload_hash: str | None
    attributes: dict[str, str]
    #: the attributes (data points) of that payload: what a row with the same payload saves
    payload_attributes: int = 0

    @classmethod
    def from_row(
        cls, payload_hash: str | None, text: str | None, payload_attributes: int | None
    ) -> Remembered:
        return cls(payload_hash, orjson.loads(text) if text else {}, int(payload_attributes or 0))


@dataclass(frozen=True)
class Trimmed:
    """One row after the diff: the payload to send, what to remember once Braze accepts it, and
    the attributes (data points) sent and saved."""

    payload: dict[str, Any]
    remember: str
    sent: int
    saved: int
    #: something was remembered of this user and nothing differs from it: nothing to send
    unchanged: bool


class AttributeDiff:
    """The diff of one attributes sync (`always`: its `always_send` keys)."""

    def __init__(self, always_send: Sequence[str] = ()):
        self.always = ALWAYS_SENT | frozenset(always_send)

    def trim(self, payload: dict[str, Any], before: Remembered | None) -> Trimmed:
        """The attributes of `payload` to send against what was accepted `before` (None: nothing
        is known of this user, so everything goes)."""
        known = before.attributes if before is not None else {}
        kept: dict[str, Any] = {}
        remember = dict(known)
        sent = saved = 0
        for key, value in payload.items():
            if key[:1] == "_":  # control keys: never billed, always as sent
                kept[key] = value
                continue
            if key in self.always or _is_operator(value):
                kept[key] = value
                remember.pop(key, None)  # its value in Braze is no longer known
                sent += 1
                continue
            digest = _value_hash(value)
            if before is not None and known.get(key) == digest:
                saved += 1
                continue
            kept[key] = value
            remember[key] = digest
            sent += 1
        return Trimmed(kept, orjson.dumps(remember).decode(), sent, saved, before is not None and sent == 0)
