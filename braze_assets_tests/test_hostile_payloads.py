"""PAYLOADs that a JSON library would pass on changed, and keys that hold personal data.

A value Braze would get other than as the table holds it (NaN or Infinity written as `null`,
which removes an attribute; the first of two duplicate keys dropped; a whole number beyond 64
bits rounded) is rejected with its own reason, for user data types and catalogs alike, whatever
form the PAYLOAD comes in (JSON text, or a typed object from a warehouse). Keys are shown in
reasons and excerpts, except where they hold what looks like an email or a phone number.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pytest

from braze_assets.attribute_diff import AttributeDiff
from braze_assets.catalog_items import check_catalog_rows
from braze_assets.masking import mask_key, mask_payload
from braze_assets_tests.test_hostile_rows import T0, _delta, _rejected, _row, _valid

NON_FINITE = [math.nan, math.inf, -math.inf]


def _typed(score: float, user: str) -> dict[str, Any]:
    return {
        "UPDATED_AT": T0.replace(tzinfo=None),
        "EXTERNAL_ID": user,
        "PAYLOAD": {"score": score, "name": "n"},
    }


@pytest.mark.parametrize("diff", [None, AttributeDiff()], ids=["whole", "diff"])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_nan_or_infinity_in_a_typed_payload_is_rejected_not_sent_as_null(tmp_path, value, diff):
    manifest = _delta(
        tmp_path,
        "attributes",
        [_typed(value, "user-bad"), _typed(1.5, "user-ok")],
        types={"PAYLOAD": "STRUCT(score DOUBLE, name VARCHAR)"},
        diff=diff,
    )
    [sent] = _valid(manifest)
    assert (sent["external_id"], sent["score"]) == ("user-ok", 1.5)
    [rejected] = _rejected(manifest)
    assert rejected["reasons"] == (
        "PAYLOAD holds NaN or Infinity, which JSON cannot carry (Braze would get null, which "
        "removes the attribute); send a number or null"
    )


@pytest.mark.parametrize("raw", ['{"score": NaN}', '{"score": Infinity}', '{"a": [1, -Infinity]}'])
def test_nan_or_infinity_in_json_text_gets_the_same_reason(tmp_path, raw):
    manifest = _delta(tmp_path, "attributes", [_row(raw, external_id="u1"), _row({"a": 1}, external_id="u2")])
    assert [v["external_id"] for v in _valid(manifest)] == ["u2"]
    [rejected] = _rejected(manifest)
    assert rejected["reasons"].startswith("PAYLOAD holds NaN or Infinity")


@pytest.mark.parametrize("raw", ['{"a": 1e400}', '{"a": -2.5E+999}'])
def test_a_number_beyond_a_double_is_not_called_a_whole_number(tmp_path, raw):
    manifest = _delta(tmp_path, "attributes", [_row(raw, external_id="u1")])
    [rejected] = _rejected(manifest)
    assert rejected["reasons"] == (
        "PAYLOAD has a number too large for a double (beyond 1.8e308), which Braze cannot take"
    )


def test_a_whole_number_of_hundreds_of_digits_keeps_its_reason(tmp_path):
    manifest = _delta(tmp_path, "attributes", [_row('{"a": ' + "9" * 400 + "}", external_id="u1")])
    [rejected] = _rejected(manifest)
    assert "whole number beyond 64 bits" in rejected["reasons"]


@pytest.mark.parametrize("raw", ['{"a": 1, "\\u0061": 2}', '{"p": {"k\\u00e9": 1, "kÃ©": 0, "k\\u00E9": 2}}'])
def test_duplicate_keys_written_with_escapes_are_rejected(tmp_path, raw):
    manifest = _delta(tmp_path, "attributes", [_row(raw, external_id="u1")])
    assert _valid(manifest) == []
    [rejected] = _rejected(manifest)
    assert rejected["reasons"].startswith("PAYLOAD has duplicate keys")


@pytest.mark.parametrize("depth", [300, 1_000])
def test_a_payload_nested_too_deep_gets_its_reason_with_the_diff(tmp_path, depth):
    nested = '{"a":' * depth + "1" + "}" * depth
    manifest = _delta(
        tmp_path,
        "attributes",
        [_row(f'{{"deep": {nested}}}', external_id="user-deep"), _row({"tier": "gold"}, external_id="u1")],
        diff=AttributeDiff(),
    )
    assert [v["external_id"] for v in _valid(manifest)] == ["u1"]
    [rejected] = _rejected(manifest)
    assert rejected["reasons"] == "PAYLOAD nests deeper than 254 levels (too deep to send)"
    assert rejected["identifier"] == "EXTERNAL_ID=use***"  # findable in the log, not "(not shown)"


def _catalog(payloads: list[Any]) -> pa.Table:
    return pa.table(
        {
            "UPDATED_AT": pa.array([T0] * len(payloads), pa.timestamp("us", tz="UTC")),
            "ID": pa.array([f"sku-{i}" for i in range(len(payloads))]),
            "PAYLOAD": pa.array(payloads),
        }
    )


@pytest.mark.parametrize(
    "raw, reason",
    [
        ('{"title": "a", "title": "b"}', "PAYLOAD has duplicate keys"),
        ('{"price": 123456789012345678901234567890}', "PAYLOAD has a whole number beyond 64 bits"),
        ('{"price": NaN}', "PAYLOAD holds NaN or Infinity"),
    ],
)
def test_catalog_rows_a_json_library_would_change_are_rejected(raw, reason):
    checked = check_catalog_rows(_catalog([raw, '{"title": "ok"}']))
    assert list(checked.objects) == [1]
    [reasons] = checked.failures.values()
    assert any(r.startswith(reason) for r in reasons), reasons


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_nan_or_infinity_in_a_typed_catalog_payload_is_rejected(value):
    rows = _catalog([{"price": value, "title": "a"}, {"price": 2.0, "title": "b"}])
    checked = check_catalog_rows(rows)
    assert list(checked.objects) == [1]
    assert any(r.startswith("PAYLOAD holds NaN or Infinity") for r in checked.failures[0])


@pytest.mark.parametrize(
    "key, shown",
    [
        ("jane.doe@example.com", "j***@e***.com"),
        ("$carol.private@example.com", "$c***@e***.com"),
        ("$+14155550199", "$***99"),
        ("score_14155550199", "sco***"),
        ("favourite_colour", "favourite_colour"),
        ("x" * 50, "x" * 40),
    ],
)
def test_keys_are_shown_unless_they_look_like_personal_data(key, shown):
    assert mask_key(key) == shown


def test_reasons_and_excerpts_mask_keys_that_look_like_personal_data(tmp_path):
    rows = [
        _row({"name": "x", "dave.private@example.com": 1}, external_id="u1"),
        _row({"name": "x", "properties": {"$+14155550199": 1}}, external_id="u2"),
        _row(
            '{"name": "x", "properties": {"hank.private@example.com": 1, "hank.private@example.com": 2}}',
            external_id="u3",
        ),
        _row({"name": "ok"}, external_id="u4"),
    ]
    manifest = _delta(tmp_path, "events", rows)
    assert [v["external_id"] for v in _valid(manifest)] == ["u4"]
    rejected = _rejected(manifest)
    text = repr(rejected)
    for secret in ("dave.private", "hank.private", "14155550199", "example.com"):
        assert secret not in text
    reasons = [r["reasons"] for r in rejected]
    assert "event PAYLOAD has keys Braze does not take: d***@e***.com" in reasons[0]
    assert "$***99" in reasons[1]
    assert "'h***@e***.com'" in reasons[2]
    assert "d***@e***.com" in mask_payload('{"dave.private@example.com": 1}')
