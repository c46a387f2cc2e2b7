"""Valid rows as the JSON objects Braze receives."""

from __future__ import annotations

from typing import Any

import pyarrow
import pyarrow.compute as pc

from braze_assets.datatypes.payload_rules import MAX_NESTING
from braze_assets.datatypes.spec import KIND_BITS, DataTypeSpec
from braze_assets.datatypes.validation import CheckedRows
from braze_assets.json_bytes import json_bytes


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


def braze_times(stamps: pyarrow.Array) -> list[str | None]:
    """Braze's ISO 8601 times (`2024-05-01T12:00:00.123Z`, milliseconds truncated) for a
    timestamp[us, UTC] array, column-wise."""
    text = stamps.cast(pyarrow.timestamp("ms"), safe=False).cast(pyarrow.string())
    text = pc.replace_substring(text, " ", "T", max_replacements=1)  # "YYYY-MM-DD HH:MM:SS.mmm"
    return pc.binary_join_element_wise(text, "Z", "").to_pylist()


def build_objects(
    checked: CheckedRows, spec: DataTypeSpec, positions: list[int], update_existing_only: bool
) -> list[bytes | None]:
    """The valid rows at `positions` as the JSON objects Braze receives: track objects, or
    `[key, id]` pairs for deletions (grouped into requests by delivery). A row whose object cannot
    be serialized (nested deeper than the serializer goes) gets None here and its reason in
    `checked.failures`."""
    batch, payloads = checked.batch, checked.payloads
    dumps = json_bytes
    objects: list[bytes | None] = []
    if spec.name == "deletions":
        for i in positions:
            kind, value = next(iter(batch.identifiers(i).items()))
            if kind == "ALIAS":
                objects.append(dumps(["user_aliases", {"alias_name": value[0], "alias_label": value[1]}]))
            else:
                objects.append(dumps([f"{kind.lower()}s", value]))
        return objects
    single = {
        KIND_BITS[k]: (k.lower(), batch.columns[k])
        for k in ("EXTERNAL_ID", "BRAZE_ID", "EMAIL", "PHONE")
        if k in batch.columns
    }
    codes = batch.codes.tolist()
    times = braze_times(batch.updated_at) if spec.name != "attributes" else None
    for i in positions:
        payload = payloads[i]
        if payload is None:  # validation rejects every row without a usable PAYLOAD
            raise ValueError(f"row {i} has no valid PAYLOAD: only valid rows become objects")
        plain = single.get(codes[i])
        if plain is not None:  # one identifier column: the usual row
            obj = {plain[0]: plain[1][i], **payload}
        else:
            obj = {**identifier_fields(batch.identifiers(i)), **payload}
        if times is None:
            # An alias-only user is created only with an explicit false [ATTR]; CDI's toggle decides.
            obj.setdefault("_update_existing_only", update_existing_only)
        else:
            obj.setdefault("time", times[i])  # CDI: no `time` -> UPDATED_AT [A2.2]
            if update_existing_only:
                obj.setdefault("_update_existing_only", True)
        try:
            objects.append(dumps(obj))
        except TypeError as exc:  # orjson.JSONEncodeError: too deep (the only way a parsed
            objects.append(None)  # payload fails to serialize again)
            checked.failures[i] = [
                f"PAYLOAD nests deeper than {MAX_NESTING} levels (too deep to send)"
                if "ecursion" in str(exc)
                else "PAYLOAD cannot be serialized for Braze"
            ]
    return objects
