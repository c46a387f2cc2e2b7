"""Looking a user up in the sync log without keeping their identifier in clear.

The sync log (ledger rows, rejected rows) shows identifiers masked (`masking.py`), which is not
enough to answer "what happened to jane@example.com?" or to forget her on request. So each row
also keeps a *lookup hash* of each identifier it carries: a keyed BLAKE2b of the identifier kind
and its exact value. A search or a purge hashes what the operator typed the same way and matches
hashes; the identifier itself is never stored beyond the masked form.

The key comes from `BRAZE_ASSETS_LOOKUP_KEY` (any text, kept like a password). Without it the
hashes are unkeyed: they still keep identifiers out of the log, but anyone holding the log and a
list of candidate emails could test them. Changing the key makes older rows unsearchable (they
stay in the log, and retention removes them as usual).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from braze_assets.digests import hex_digests_or_none

LOOKUP_KEY_ENV = "BRAZE_ASSETS_LOOKUP_KEY"
#: The identifier kinds a search can name, as rows carry them.
KINDS = ("EXTERNAL_ID", "BRAZE_ID", "EMAIL", "PHONE", "ALIAS")
_PERSON = b"braze-assets-id"


def lookup_key() -> bytes:
    """The key lookup hashes are made with (from the environment; see above)."""
    # BLAKE2b takes a key of at most 64 bytes: a longer one is hashed down to that.
    raw = os.environ.get(LOOKUP_KEY_ENV, "").encode()
    return raw if len(raw) <= 64 else hashlib.blake2b(raw).digest()


def lookup_hash(kind: str, value: str | tuple[str | None, str | None], key: bytes | None = None) -> str:
    """The lookup hash of one identifier (`ALIAS`: a (name, label) pair)."""
    if kind not in KINDS:
        raise ValueError(f"unknown identifier kind {kind!r}; one of {', '.join(KINDS)}")
    text = "\x1f".join(x or "" for x in value) if isinstance(value, tuple) else value
    digest = hashlib.blake2b(
        f"{kind}\x1f{text}".encode(), digest_size=16, key=lookup_key() if key is None else key, person=_PERSON
    )
    return digest.hexdigest()


def row_lookup_hashes(identifiers: Mapping[str, Any], key: bytes | None = None) -> str | None:
    """A row's lookup hashes, space-separated (a row may carry an email and a phone), or None."""
    key = lookup_key() if key is None else key
    found = [lookup_hash(kind, value, key) for kind, value in identifiers.items() if value is not None]
    return " ".join(found) or None


def _non_null(values: Sequence[str | None] | pa.Array) -> Sequence[str | None] | pa.Array | None:
    """A column's values, or None when every one is null."""
    if isinstance(values, pa.Array):
        return values if values.null_count < len(values) else None
    return values if any(v is not None for v in values) else None


def _text_array(values: Sequence[str | None] | pa.Array) -> pa.Array:
    if not isinstance(values, pa.Array):
        return pa.array(values, pa.string())
    return values if pa.types.is_string(values.type) else values.cast(pa.string())


def _text_list(values: Sequence[str | None] | pa.Array | None, num_rows: int) -> Sequence[str | None]:
    if values is None:
        return [None] * num_rows
    return values.to_pylist() if isinstance(values, pa.Array) else values


def column_lookup_hashes(
    columns: Mapping[str, Sequence[str | None] | pa.Array], num_rows: int, key: bytes | None = None
) -> list[str | None]:
    """`row_lookup_hashes` for every row of a batch of identifier columns (text, None when absent).
    One keyed hasher is set up per batch and copied per value (keying BLAKE2b costs as much as
    hashing a short identifier), and a batch with one identifier column, the usual one, is
    hashed in a single pass."""
    key = lookup_key() if key is None else key
    base = hashlib.blake2b(digest_size=16, key=key, person=_PERSON)
    # Columns null in every row add nothing to any row (a table usually carries one kind).
    columns = {kind: texts for kind, values in columns.items() if (texts := _non_null(values)) is not None}
    found: list[list[str | None]] = []
    for kind in ("EXTERNAL_ID", "BRAZE_ID", "EMAIL", "PHONE"):
        values = columns.get(kind)
        if values is not None:  # "KIND\x1fvalue" built column-wise (null stays null), then hashed
            texts = pc.binary_join_element_wise(f"{kind}\x1f", _text_array(values), "")
            found.append(hex_digests_or_none(base, texts.cast(pa.binary()).to_pylist()))
    if "ALIAS_NAME" in columns or "ALIAS_LABEL" in columns:
        names = _text_list(columns.get("ALIAS_NAME"), num_rows)
        labels = _text_list(columns.get("ALIAS_LABEL"), num_rows)
        found.append(
            [
                None if name is None and label is None else lookup_hash("ALIAS", (name, label), key)
                for name, label in zip(names, labels, strict=True)
            ]
        )
    if not found:
        return [None] * num_rows
    if len(found) == 1:
        return found[0]
    return [" ".join(h for h in hashes if h is not None) or None for hashes in zip(*found, strict=True)]
