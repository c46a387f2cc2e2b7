"""Validation of a batch: its facts (identifiers column-wise, each PAYLOAD parsed once) judged by
the data type's pandera schema, each failing rule one specific reason on its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

from braze_assets.braze import contract
from braze_assets.datatypes.payload_rules import PROBLEM_SEPARATOR, payload_facts, payload_points
from braze_assets.datatypes.rows import RowBatch
from braze_assets.datatypes.spec import DATA_TYPES, DataTypeSpec, allowed_kind_codes, kinds_of

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
                _reason(column, value, spec, note).split(PROBLEM_SEPARATOR)
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
        notes["identifier_problem"][i] = PROBLEM_SEPARATOR.join(sentences)
    payloads: list[dict | None] = [None] * n
    if spec.has_payload:
        payloads = payload_facts(batch, spec, facts, notes)
    frame = pd.DataFrame(
        {"updated_at": batch.updated_at.to_pandas().astype("datetime64[us, UTC]"), **facts}, copy=False
    )
    failures = validate_facts(frame, spec, notes) if n else {}
    if spec.name == "attributes":
        points = _attribute_points(batch, payloads, facts["attribute_count"])
    else:
        points = np.full(n, 1 if spec.name in ("events", "purchases") else 0, dtype=np.int64)
    return CheckedRows(batch, failures, payloads, points)


def _attribute_points(batch: RowBatch, payloads: list[dict | None], attributes: np.ndarray) -> np.ndarray:
    """Data points of each attributes row sent whole: one per attribute, except that arrays of
    objects and operators on them cost more (`payload_points`). Only a PAYLOAD with an object
    inside it (two `{`) can: the others keep their attribute count without a second look."""
    points = attributes
    for i, raw in enumerate(batch.payload or ()):
        payload = payloads[i]
        if payload is None or raw is None or raw.count("{" if type(raw) is str else b"{") < 2:
            continue
        billed = payload_points(payload)
        if billed != points[i]:
            if points is attributes:
                points = attributes.copy()  # the attribute count itself is a validated fact
            points[i] = billed
    return points


def validate_rows(rows: list[dict[str, Any]], spec: DataTypeSpec) -> CheckedRows:
    """Validate source rows given as dicts (upper-case column names), e.g. a preview sample."""
    return validate_batch(RowBatch.from_rows(rows), spec)
