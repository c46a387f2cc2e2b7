"""CDI rows as columns: identifier cells as exact text (or a reason they have none), PAYLOAD as
JSON text, UPDATED_AT as UTC timestamps; the identifier kinds of each row as a bit code.
"""

from __future__ import annotations

import decimal
import json
from typing import Any

import numpy as np
import orjson
import pyarrow
import pyarrow.compute as pc

from braze_assets.datatypes.spec import IDENTIFIER_COLUMNS, KIND_BITS
from braze_assets.json_bytes import holds_non_finite


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
    elif isinstance(value, decimal.Decimal) and value.is_finite() and value == value.to_integral_value():
        text = str(int(value))  # a NUMBER(38,0) id: its digits (quantizing past 28 digits fails)
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
    """PAYLOAD as JSON text; warehouses with typed JSON/STRUCT payloads hand over objects. A
    float NaN or Infinity in one is written as JavaScript writes it (`NaN`), not as orjson does
    (`null`, which would remove the attribute in Braze), so the row is rejected for it."""
    if not isinstance(value, (dict, list)):
        return value
    text = orjson.dumps(value)
    if b"null" in text and holds_non_finite(value):
        return json.dumps(value, allow_nan=True, default=str)
    return text.decode()


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
