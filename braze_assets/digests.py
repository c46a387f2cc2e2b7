"""BLAKE2b hex digests of many short texts, the inner loop of every per-row hash.

A delta hashes each row up to four times (its identity, its user, its PAYLOAD, its lookup hash),
so the loop is written once, here, the fastest way measured in CPython: one hasher set up per
batch (keying and sizing BLAKE2b costs as much as hashing a short text) and copied per text,
with no function call per row. 200,000 row texts: 0.115 s, against 0.186 s for a new hasher
per text and 0.14-0.17 s for raw digests hex-encoded in bulk.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def hex_digests(base: Any, texts: Iterable[bytes]) -> list[str]:
    """The hex digest of each text, hashed by a copy of `base` (a `hashlib.blake2b`)."""
    out: list[str] = []
    append, copy = out.append, base.copy
    for text in texts:
        hasher = copy()
        hasher.update(text)
        append(hasher.hexdigest())
    return out


def hex_digests_or_none(base: Any, texts: Iterable[bytes | None]) -> list[str | None]:
    """`hex_digests`, None where the text is None."""
    out: list[str | None] = []
    append, copy = out.append, base.copy
    for text in texts:
        if text is None:
            append(None)
            continue
        hasher = copy()
        hasher.update(text)
        append(hasher.hexdigest())
    return out
