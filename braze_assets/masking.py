"""PII masking for logs and UI metadata: identifiers are shown only in part."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

_PHONE = re.compile(r"^\+?[\d\s().-]{7,}$")


def mask(value: object) -> str:
    """`jane.doe@example.com` -> `j***@e***.com`; `+14155550123` -> `***23`; `user-12345` -> `use***`."""
    if value is None:
        return ""
    text = str(value)
    if "@" in text:
        local, _, domain = text.partition("@")
        name, dot, tld = domain.rpartition(".")
        return f"{local[:1]}***@{(name or tld)[:1]}***{dot}{tld if name else ''}"
    if _PHONE.match(text):
        return "***" + re.sub(r"\D", "", text)[-2:]
    return text[:3] + "***" if len(text) > 6 else "***"


#: Characters of a key shown (keys name attributes, properties and fields; some are long).
KEY_CHARS = 40
_LONG_DIGITS = re.compile(r"\d{7}")


def mask_key(key: object) -> str:
    """A JSON key as reasons and excerpts show it. Keys name attributes, properties and fields,
    and are shown (cut at `KEY_CHARS`), so a reason can say which one is wrong; but a table that
    builds its keys from data may make a key of an email or a phone number, so a key holding an
    `@` or seven digits in a row is masked like an identifier (a leading `$` kept)."""
    text = str(key)
    if "@" not in text and not _LONG_DIGITS.search(text):
        return text[:KEY_CHARS]
    bare = text.lstrip("$")
    return text[: len(text) - len(bare)] + mask(bare)


_EMAIL_IN_TEXT = re.compile(r"[^\s\"'`()<>,;:]+@[^\s\"'`()<>,;:]+")
_DIGITS_IN_TEXT = re.compile(r"\+?\d(?:[ .-]?\d){6,}")
_QUOTED = re.compile(r"\"([^\"]*)\"|'([^']*)'")


def mask_text(text: str, quoted: bool = False) -> str:
    """A driver's or server's message as errors and logs show it: emails and runs of seven or more
    digits (phone numbers, ids) masked like identifiers wherever they are. `quoted`: also every
    quoted value, for messages about a row's data (a conversion error quotes the cell it could
    not read, which may be anyone's name)."""
    if quoted:
        text = _QUOTED.sub(
            lambda m: m.group(0)[0] + mask(m.group(1) or m.group(2) or "") + m.group(0)[0], text
        )
    text = _EMAIL_IN_TEXT.sub(lambda m: mask(m.group(0)), text)
    return _DIGITS_IN_TEXT.sub(lambda m: mask(m.group(0)), text)


def mask_identifiers(identifiers: dict[str, Any]) -> str:
    """A row's identifier for display: `EXTERNAL_ID=use***`."""
    parts = []
    for kind, value in identifiers.items():
        if kind == "ALIAS":
            parts.append(f"ALIAS={mask(value[0])}/{value[1] or ''}")
        else:
            parts.append(f"{kind}={mask(value)}")
    return ", ".join(parts) or "(none)"


#: `_PHONE` for ASCII text, in RE2 syntax (Python's `\s` also takes \x0b and \x1c-\x1f).
_PHONE_ASCII = r"^\+?[0-9\t\n\x0b\x0c\r\x1c-\x1f ().-]{7,}$"


def mask_column(values: pa.Array) -> pa.Array:
    """`mask` over a string array, column-wise; text that is not ASCII or holds '@' goes through
    `mask` itself. Nulls stay null."""
    fallback = pc.or_(pc.invert(pc.string_is_ascii(values)), pc.match_substring(values, "@"))
    general = pc.if_else(
        pc.greater(pc.utf8_length(values), 6),
        pc.binary_join_element_wise(pc.utf8_slice_codeunits(values, 0, 3), "***", ""),
        "***",
    )
    phones = pc.match_substring_regex(values, _PHONE_ASCII)
    masked = general
    if pc.any(phones).as_py():  # digits only where needed: the regex replace is the slow part
        digits = pc.replace_substring_regex(pc.if_else(phones, values, ""), r"[^0-9]", "")
        phone = pc.binary_join_element_wise("***", pc.utf8_slice_codeunits(digits, -2, 1 << 30), "")
        masked = pc.if_else(phones, phone, general)
    if pc.any(fallback).as_py():
        python = masked.to_pylist()
        for i, value in enumerate(values.to_pylist()):
            if value is not None and (not value.isascii() or "@" in value):
                python[i] = mask(value)
        masked = pa.array(python, pa.string())
    return masked


def _present_columns(
    columns: Mapping[str, Sequence[str | None] | pa.Array], num_rows: int
) -> dict[str, pa.Array]:
    """Identifier columns as Arrow text, without those that are null in every row (they add
    nothing to any row, and a table usually carries one kind of identifier)."""
    arrays = {}
    for kind, values in columns.items():
        array = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
        if array.null_count < num_rows:
            arrays[kind] = array
    return arrays


def mask_identifier_columns(
    columns: Mapping[str, Sequence[str | None] | pa.Array], num_rows: int
) -> list[str]:
    """`mask_identifiers` for every row of a batch of identifier columns (text, None when absent),
    column-wise: kinds in the order rows report them, the alias as `ALIAS=name/label`."""
    present = _present_columns(columns, num_rows)
    parts = []
    for kind in ("EXTERNAL_ID", "BRAZE_ID", "EMAIL", "PHONE"):
        if kind in present:
            parts.append(pc.binary_join_element_wise(f"{kind}=", mask_column(present[kind]), ""))
    if "ALIAS_NAME" in present or "ALIAS_LABEL" in present:
        empty = pa.nulls(num_rows, pa.string())
        name, label = present.get("ALIAS_NAME", empty), present.get("ALIAS_LABEL", empty)
        alias = pc.binary_join_element_wise(
            "ALIAS=", pc.fill_null(mask_column(name), ""), "/", pc.fill_null(label, ""), ""
        )
        parts.append(pc.if_else(pc.or_(pc.is_valid(name), pc.is_valid(label)), alias, None))
    if not parts:
        return ["(none)"] * num_rows
    if len(parts) == 1:  # the usual table: one kind of identifier
        shown = pc.fill_null(parts[0], "(none)").to_pylist()
    else:
        # Each present part followed by ", ", absent parts as "", then the last ", " dropped.
        # (pyarrow's null_handling="skip" join drops rows where every part is null, shifting the
        # rows after them, so it is not used.)
        pieces = [pc.fill_null(pc.binary_join_element_wise(part, ", ", ""), "") for part in parts]
        joined = pc.utf8_slice_codeunits(pc.binary_join_element_wise(*pieces, ""), 0, -2)
        shown = pc.if_else(pc.equal(joined, ""), "(none)", joined).to_pylist()
    if len(shown) != num_rows:  # every row keeps its own entry, whatever pyarrow does
        raise RuntimeError(f"masked {len(shown)} identifiers for {num_rows} rows")
    return shown


def mask_payload(raw: object, limit: int = 200) -> str:
    """A PAYLOAD for display: its JSON shape and keys, every string value masked like an
    identifier and long numbers too (a payload may hold emails or phone numbers anywhere).
    Text that is not JSON cannot be masked and is not shown."""
    if raw is None:
        return ""
    unreadable = f"(not shown: not valid JSON, {len(raw) if hasattr(raw, '__len__') else 0} bytes)"
    if isinstance(raw, (dict, list)):
        value = raw
    elif isinstance(raw, (str, bytes, bytearray, memoryview)):
        try:
            value = orjson.loads(bytes(raw) if isinstance(raw, (bytearray, memoryview)) else raw)
        except orjson.JSONDecodeError:
            return unreadable
    else:
        return unreadable

    def masked(node: object, depth: int = 0) -> object:
        if depth > 20:
            return "..."
        if isinstance(node, dict):
            return {mask_key(k): masked(v, depth + 1) for k, v in list(node.items())[:20]}
        if isinstance(node, list):
            return [masked(v, depth + 1) for v in node[:10]]
        if isinstance(node, str):
            return mask(node)
        if isinstance(node, (int, float)) and not isinstance(node, bool) and len(str(node)) > 6:
            return mask(str(node))
        return node

    text = orjson.dumps(masked(value)).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."
