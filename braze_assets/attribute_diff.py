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
remembers advances only when Braze accepts it (`Delivery`); a row that failed changes nothing, so
its attributes are sent again, and a row held (Braze may have applied it) leaves its user
remembered as holding nothing, so that user's next row goes whole.

The diff assumes this sync is what writes these attributes: a value changed in Braze by another
writer is not seen, and is corrected only when the warehouse value changes. `send: full_payload`
turns the diff off.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from braze_assets.datatypes import payload_text
from braze_assets.datatypes.payload_rules import attribute_points
from braze_assets.digests import hex_digests, hex_digests_or_none

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


def column_user_keys(columns: Mapping[str, Sequence[str | None] | pa.Array], num_rows: int) -> list[str]:
    """`user_key` for every row of a batch of identifier columns (text, None when absent), as
    `identifier_arrays` or `RowBatch.identifiers` give them: the key text is built column-wise,
    and only the hashing is done row by row."""

    def text(kind: str) -> pa.Array | None:
        # a column with no value adds "" to every row's text: left out (most tables use one kind)
        values = columns.get(kind)
        if values is None:
            return None
        values = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
        return None if values.null_count == len(values) else values

    # Each present kind as "KIND=value\x1f" ("" when absent), joined, the last \x1f dropped.
    # (pyarrow's null_handling="skip" join drops rows where every part is null, so it is not used.)
    pieces = []
    names, labels = text("ALIAS_NAME"), text("ALIAS_LABEL")
    if names is not None or labels is not None:
        name = names if names is not None else pa.nulls(num_rows, pa.string())
        label = labels if labels is not None else pa.nulls(num_rows, pa.string())
        alias = pc.binary_join_element_wise(
            "ALIAS=", pc.fill_null(name, ""), "/", pc.fill_null(label, ""), "\x1f", ""
        )
        pieces.append(pc.if_else(pc.or_(pc.is_valid(name), pc.is_valid(label)), alias, ""))
    for kind in ("BRAZE_ID", "EMAIL", "EXTERNAL_ID", "PHONE"):  # sorted, as user_key sorts kinds
        values = text(kind)
        if values is not None:
            pieces.append(pc.fill_null(pc.binary_join_element_wise(f"{kind}=", values, "\x1f", ""), ""))
    if not pieces:
        texts: list[bytes] = [b""] * num_rows
    else:
        joined = pieces[0] if len(pieces) == 1 else pc.binary_join_element_wise(*pieces, "")
        texts = pc.utf8_slice_codeunits(joined, 0, -1).cast(pa.binary()).to_pylist()
    if len(texts) != num_rows:  # every row keeps its own key, whatever pyarrow does
        raise RuntimeError(f"built {len(texts)} user keys for {num_rows} rows")
    return hex_digests(hashlib.blake2b(digest_size=16, person=_PERSON), texts)


#: Copied for each PAYLOAD: a copy costs half of a new hasher's keyword parsing, once per row.
_PAYLOAD_HASHER = hashlib.blake2b(digest_size=16)


def payload_hash(raw: str | bytes | None) -> str | None:
    """A hash of a PAYLOAD exactly as stored (text or bytes)."""
    data = _payload_bytes(raw)
    if data is None:
        return None
    hasher = _PAYLOAD_HASHER.copy()
    hasher.update(data)
    return hasher.hexdigest()


def payload_hashes(raws: Sequence[str | bytes | None]) -> list[str | None]:
    """`payload_hash` of many PAYLOADs (one loop, no call per row)."""
    return hex_digests_or_none(_PAYLOAD_HASHER, [_payload_bytes(raw) for raw in raws])


def _payload_bytes(raw: Any) -> bytes | None:
    if raw is None:
        return None
    return raw.encode() if isinstance(raw, str) else bytes(raw)


def column_payload_hashes(values: pa.Array | pa.ChunkedArray) -> list[str | None]:
    """`payload_hash` of a whole PAYLOAD column; JSON-typed columns as `payload_text` gives them."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    kind = values.type
    raw: list[bytes | None]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        raw = values.cast(pa.binary()).to_pylist()
    else:
        raw = [_payload_bytes(_text_or_none(v)) for v in values.to_pylist()]
    return hex_digests_or_none(_PAYLOAD_HASHER, raw)


def _text_or_none(value: Any) -> str | bytes | None:
    """`payload_text`, or None for a value JSON has no form for (a struct holding a decimal):
    such a row is never matched by its hash, and validation says what is wrong with it."""
    try:
        return payload_text(value)
    except (TypeError, ValueError):
        return None


#: The hash of a value orjson cannot write (nested deeper than it goes): never one remembered,
#: since such a row cannot be sent either, and is rejected with its reason when its object is built.
_UNWRITABLE = "-" * 16


def _value_hash(value: object) -> str:
    if value is None:
        return _NULL
    try:
        text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return _UNWRITABLE
    return hashlib.blake2b(text, digest_size=8).hexdigest()


#: Braze's array and number operators as a top-level attribute's value: `{"add": [...]}`,
#: `{"remove": [...]}`, `{"inc": 1}` (docs/braze-contract.md, attributes).
_OPERATORS = frozenset({"add", "remove", "inc"})


def _is_operator(value: object) -> bool:
    """An instruction, not a value to compare: `{"add": [...]}`, `{"inc": 1}`, or anything with
    a `$` key (`$add`, `$remove`, `$update` on arrays of objects, `$time`)."""
    if not isinstance(value, dict) or not value:
        return False
    return value.keys() <= _OPERATORS or any(str(key).startswith("$") for key in value)


def _sent_as_is(always: frozenset[str], key: str, value: object) -> bool:
    """A (non-control) attribute sent as it is whatever was accepted: listed in `always`, or
    an operator value."""
    return key in always or (type(value) is dict and _is_operator(value))


class Remembered(NamedTuple):
    """What Braze last accepted from this sync for one user. A plain tuple, as a batch looks up
    thousands of them; the per-attribute hashes stay JSON text until a row is diffed (the fast
    path compares the PAYLOAD hash alone)."""

    payload_hash: str | None
    attributes_json: str = "{}"
    #: the attributes (data points) of that payload: what a row with the same payload saves
    payload_attributes: int = 0

    @property
    def attributes(self) -> dict[str, str]:
        parsed: dict[str, str] = orjson.loads(self.attributes_json)
        return parsed


class FirstRows(NamedTuple):
    """`AttributeDiff.first_rows`: per payload, what to remember, the attributes sent, and
    whether it holds something always sent (`AttributeDiff._sends_always_of`)."""

    remember: list[str]
    sent: list[int]
    volatile: list[bool]


class Trimmed(NamedTuple):
    """One row after the diff: the payload to send, what to remember once Braze accepts it, and
    the attributes (data points) sent and saved. A tuple: there is one per row of a delta."""

    payload: dict[str, Any]
    remember: str
    sent: int
    saved: int
    #: something was remembered of this user and nothing differs from it: nothing to send
    unchanged: bool
    #: the payload holds something sent whatever was accepted (`AttributeDiff._sends_always_of`)
    volatile: bool = False


#: Scalar attribute values whose hashes one `AttributeDiff` keeps (then starts afresh).
_HASHES_KEPT = 50_000
_SCALARS = (str, int, bool)  # not float: 0.0 and -0.0 are one dict key, two JSON texts
#: Longer text is hashed each time: it rarely repeats, and keeping it would keep it in memory.
_TEXT_KEPT = 64
#: Scalar values hashed a column at a time (`first_rows`), as the Arrow type that keeps them exact.
_ARROW_SCALARS = {str: pa.string(), int: pa.int64(), bool: pa.bool_()}
#: Payloads of one key set from which `first_rows` goes column-wise.
_COLUMN_WISE_ROWS = 16


#: A batch's payloads a key at a time: their shared keys, and each key's values in row order.
_Shared = tuple[tuple[str, ...], list[Sequence[Any]]]


def _shared_columns(payloads: Sequence[dict[str, Any]]) -> _Shared | None:
    """The payloads' keys and their values a key at a time, when every payload has the same keys
    (in any order); None otherwise. A payload as long as the first that holds each of the first's
    keys has the same keys: both are checked without a Python loop per row."""
    if not payloads:
        return None
    keys = tuple(payloads[0])
    if set(map(len, payloads)) != {len(keys)}:
        return None
    try:
        return keys, [list(map(operator.itemgetter(key), payloads)) for key in keys]
    except KeyError:
        return None


def _billed(keys: Sequence[str], columns: Sequence[Sequence[Any]], count: int) -> list[int]:
    """Data points of `count` payloads of these keys sent whole, from their values a key at a
    time: control keys are never billed, and only a column holding arrays or objects can cost
    more than one point a row."""
    base = sum(1 for key in keys if key[:1] != "_")
    points = [base] * count
    for key, values in zip(keys, columns, strict=True):
        if key[:1] == "_" or not ({list, dict} & set(map(type, values))):
            continue
        for i, value in enumerate(values):
            extra = attribute_points(key, value) - 1
            if extra:
                points[i] += extra
    return points


class AttributeDiff:
    """The diff of one attributes sync (`always`: its `always_send` keys).

    Attribute values repeat across users (a plan, a city, a flag), so the hash of a scalar value
    is computed once and kept, keyed by its type too (`True` and `1` are one dict key
    but two JSON texts); serializing and hashing every value was most of the diff's cost."""

    def __init__(self, always_send: Sequence[str] = ()):
        #: the sync's own `always_send` keys; a PAYLOAD holding one of `ALWAYS_SENT` is never
        #: remembered by its hash, but one remembered before a key was listed may be
        self.listed = frozenset(always_send)
        self.always = ALWAYS_SENT | self.listed
        self._hashes: dict[tuple[type, object], str] = {}

    def __getstate__(self) -> dict[str, Any]:  # sent to worker processes without the hashes
        return {"always": self.always, "_hashes": {}}

    def _hash(self, value: object) -> str:
        kind = type(value)
        if kind not in _SCALARS or (isinstance(value, str) and len(value) > _TEXT_KEPT):
            return _value_hash(value)
        hashes = self._hashes
        digest = hashes.get((kind, value))
        if digest is None:
            if len(hashes) >= _HASHES_KEPT:
                hashes.clear()
            digest = hashes[(kind, value)] = _value_hash(value)
        return digest

    def trim(self, payload: dict[str, Any], before: Remembered | None) -> Trimmed:
        """The attributes of `payload` to send against what was accepted `before` (None: nothing
        is known of this user, so everything goes)."""
        if before is None:  # a user seen first: all of it goes, and all of it is remembered
            return self._first(payload)
        known = before.attributes
        kept: dict[str, Any] = {}
        remember = dict(known)
        sent = saved = 0
        always = self.always
        volatile = False
        for key, value in payload.items():
            if key[:1] == "_":  # control keys: never billed, always as sent
                kept[key] = value
                continue
            if _sent_as_is(always, key, value):
                kept[key] = value
                remember.pop(key, None)  # its value in Braze is no longer known
                sent += attribute_points(key, value)
                volatile = True
                continue
            digest = self._hash(value)
            if known.get(key) == digest:
                saved += attribute_points(key, value)
                continue
            kept[key] = value
            remember[key] = digest
            sent += attribute_points(key, value)
        return Trimmed(kept, orjson.dumps(remember).decode(), sent, saved, sent == 0, volatile)

    def _sends_always_of(self, payloads: Sequence[dict[str, Any]], shared: _Shared | None) -> list[bool]:
        """Which payloads hold something sent whatever was accepted before: an operator value,
        `subscription_groups` or an `always_send` key. Such a PAYLOAD is never settled as
        unchanged for being exactly the one last accepted (its PAYLOAD hash is not remembered):
        its increment or subscription change is meant again. A key at a time where the payloads
        share their keys (`shared`): only a column holding objects can hold an operator."""
        if shared is None:
            return [self._sends_always(payload) for payload in payloads]
        keys, columns = shared
        always = self.always
        if any(key[:1] != "_" and key in always for key in keys):
            return [True] * len(payloads)
        flags = [False] * len(payloads)
        for key, values in zip(keys, columns, strict=True):
            if key[:1] != "_" and dict in set(map(type, values)):
                for i, value in enumerate(values):
                    if type(value) is dict and _is_operator(value):
                        flags[i] = True
        return flags

    def _sends_always(self, payload: dict[str, Any]) -> bool:
        always = self.always
        return any(key[:1] != "_" and _sent_as_is(always, key, value) for key, value in payload.items())

    def first_rows(self, payloads: Sequence[dict[str, Any]]) -> FirstRows:
        """`trim(payload, None)` of many payloads of users seen first (a first sync's every row):
        what to remember of each, its attributes sent, and which hold something always sent. The payloads
        sharing their keys (most of a table: its PAYLOAD is built by one query) are taken a key
        at a time, once for all three, and each distinct value is hashed once; a per-row loop
        here was most of the diff's cost."""
        shared = _shared_columns(payloads)
        return FirstRows(*self._remember_and_bill(payloads, shared), self._sends_always_of(payloads, shared))

    def _remember_and_bill(
        self, payloads: Sequence[dict[str, Any]], shared: _Shared | None
    ) -> tuple[list[str], list[int]]:
        count = len(payloads)
        if shared is not None and count >= _COLUMN_WISE_ROWS:  # the usual batch: one key set
            keys, columns = shared
            return self._column_wise(keys, columns, count), _billed(keys, columns, count)
        remember: list[str] = [""] * count
        sent: list[int] = [0] * count
        by_keys: dict[tuple[str, ...], list[int]] = {}
        for i, payload in enumerate(payloads):
            by_keys.setdefault(tuple(sorted(payload)), []).append(i)
        for keys, rows in by_keys.items():
            if len(rows) < _COLUMN_WISE_ROWS:
                for i in rows:
                    trimmed = self._first(payloads[i])
                    remember[i], sent[i] = trimmed.remember, trimmed.sent
                continue
            columns = [[payloads[i][key] for i in rows] for key in keys]
            texts = self._column_wise(keys, columns, len(rows))
            for i, text, billed in zip(rows, texts, _billed(keys, columns, len(rows)), strict=True):
                remember[i], sent[i] = text, billed
        return remember, sent

    def _column_wise(self, keys: Sequence[str], columns: Sequence[Sequence[Any]], count: int) -> list[str]:
        """What to remember of `count` rows of one key set, from their values a key at a time."""
        pieces = [self._remembered_column(key, values) for key, values in zip(keys, columns, strict=True)]
        texts = [piece for piece in pieces if piece is not None]
        if not texts:
            return ["{}"] * count
        joined = pc.binary_join_element_wise(*texts, "")  # each piece ends with ","
        return pc.binary_join_element_wise("{", pc.utf8_slice_codeunits(joined, 0, -1), "}", "").to_pylist()

    def _remembered_column(self, key: str, values: Sequence[Any]) -> pa.Array | None:
        """One attribute's `"key":"hash",` for a group of rows ("" where nothing is remembered:
        an operator); None when the key is never remembered."""
        if key[:1] == "_" or key in self.always:
            return None
        digests: pa.Array | None = None
        first = next((value for value in values if value is not None), None)
        if type(first) in _ARROW_SCALARS:
            # Arrow's own inference refuses a column of mixed kinds (text and numbers, numbers
            # and booleans, beyond 64 bits) or widens it (numbers and floats): row by row below.
            try:
                column = pa.array(values)
            except (OverflowError, pa.ArrowException):
                column = None
            if column is not None and column.type == _ARROW_SCALARS[type(first)]:
                encoded = pc.dictionary_encode(column)
                hashed = pa.array([self._hash(v) for v in encoded.dictionary.to_pylist()], pa.string())
                digests = pc.fill_null(hashed.take(encoded.indices), _NULL)
        if digests is None:  # mixed, float or nested values: row by row
            hash_of = self._hash
            digests = pa.array(
                [None if type(v) is dict and _is_operator(v) else hash_of(v) for v in values], pa.string()
            )
        head = orjson.dumps(key).decode() + ':"'
        return pc.fill_null(pc.binary_join_element_wise(head, digests, '",', ""), "")

    def _first(self, payload: dict[str, Any]) -> Trimmed:
        always, hashed = self.always, self._hash
        remember: dict[str, str] = {}
        sent = 0
        for key, value in payload.items():
            if key[:1] == "_":
                continue
            sent += attribute_points(key, value)
            if _sent_as_is(always, key, value):
                continue
            remember[key] = hashed(value)
        return Trimmed(payload, orjson.dumps(remember).decode(), sent, 0, False)
