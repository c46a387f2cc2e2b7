"""PII masking (`braze_assets/masking.py`) and the REST endpoint guard
(`braze_assets.braze.client.check_endpoint`, `BrazeClient.__repr__`)."""

from __future__ import annotations

import re

import pytest

from braze_assets.braze.client import BrazeClient, BrazeEndpointError, check_endpoint
from braze_assets.masking import mask, mask_identifiers

# ----------------------------------------------------------------------------- masking
EMAILS = [
    "jane.doe@example.com",
    "j@example.com",
    "x@y.z",
    "first.last+tag@mail.example.co.uk",
    "ÉLODIE@exemple.fr",
    "jane@localhost",
    "a@b",
]
PHONES = ["+14155550123", "+1 (415) 555-0123", "0044 20 7946 0958", "4155550123", "+33.1.23.45.67.89"]
IDS = ["user-12345", "abcdefg", "5f0c1b2a9d3e4f5a6b7c8d9e", "x" * 987, "ünïcödé-user", "u-42"]


@pytest.mark.parametrize(
    "value, shown",
    [
        ("jane.doe@example.com", "j***@e***.com"),
        ("first.last+tag@mail.example.co.uk", "f***@m***.uk"),
        ("jane@localhost", "j***@l***"),
        ("+14155550123", "***23"),
        ("+1 (415) 555-0123", "***23"),
        ("user-12345", "use***"),
        ("abcdefg", "abc***"),
        ("abcdef", "***"),
        ("u1", "***"),
        (12345678, "***78"),
        (None, ""),
    ],
)
def test_mask_examples(value, shown):
    assert mask(value) == shown


@pytest.mark.parametrize("value", EMAILS + PHONES + IDS)
def test_masked_value_never_contains_the_whole_value(value):
    shown = mask(value)
    assert value not in shown
    assert "***" in shown


@pytest.mark.parametrize("email", EMAILS)
def test_email_shows_at_most_one_character_of_local_part_and_domain(email):
    local, _, domain = email.partition("@")
    shown = mask(email)
    shown_local, _, shown_domain = shown.partition("@")
    assert shown_local == local[:1] + "***"
    assert shown_domain.startswith(domain[:1] + "***")
    if len(local) > 1:
        assert local not in shown


@pytest.mark.parametrize("phone", PHONES)
def test_phone_shows_only_its_last_two_digits(phone):
    shown = mask(phone)
    assert shown == "***" + re.sub(r"\D", "", phone)[-2:]


@pytest.mark.parametrize("external_id", IDS)
def test_id_shows_at_most_three_leading_characters(external_id):
    shown = mask(external_id)
    visible = shown.replace("***", "")
    assert len(visible) <= 3 and external_id.startswith(visible)


def test_mask_identifiers_masks_every_kind():
    identifiers = {
        "EXTERNAL_ID": "user-12345",
        "EMAIL": "jane.doe@example.com",
        "PHONE": "+14155550123",
        "BRAZE_ID": "5f0c1b2a9d3e4f5a",
        "ALIAS": ("alias-98765", "crm"),
    }
    shown = mask_identifiers(identifiers)
    assert shown == (
        "EXTERNAL_ID=use***, EMAIL=j***@e***.com, PHONE=***23, BRAZE_ID=5f0***, ALIAS=ali***/crm"
    )
    for value in (
        "user-12345",
        "jane.doe@example.com",
        "+14155550123",
        "4155550123",
        "5f0c1b2a9d3e4f5a",
        "alias-98765",
    ):
        assert value not in shown


def test_mask_identifiers_of_an_incomplete_alias_and_of_nothing():
    assert mask_identifiers({"ALIAS": ("alias-98765", None)}) == "ALIAS=ali***/"
    assert mask_identifiers({"ALIAS": (None, "crm")}) == "ALIAS=/crm"
    assert mask_identifiers({}) == "(none)"


@pytest.mark.parametrize(
    "values",
    [
        EMAILS + PHONES + IDS + [None, "", "1234567\n", " 12 34 567 ", "ab@", "@b", "+", "a" * 7],
        [None, "user-12345", None],
    ],
)
def test_column_masking_gives_what_mask_gives(values):
    """`mask_column` (column-wise, for whole batches) agrees with `mask` value by value."""
    import pyarrow as pa

    from braze_assets.masking import mask_column

    shown = mask_column(pa.array(values, pa.string())).to_pylist()
    assert shown == [None if v is None else mask(v) for v in values]


@pytest.mark.parametrize(
    "columns",
    [
        {"EXTERNAL_ID": ["user-12345", None, None]},
        {
            "EXTERNAL_ID": ["user-12345", None, None],
            "EMAIL": [None, "jane.doe@example.com", None],
            "PHONE": [None, "+14155550123", None],
            "BRAZE_ID": [None, None, "5f0c1b2a9d3e4f5a"],
        },
        {"ALIAS_NAME": ["alias-98765", None, "alias-98765", None], "ALIAS_LABEL": ["crm", "crm", None, None]},
        {"EXTERNAL_ID": [None, "u-1"], "ALIAS_NAME": ["alias-98765", None]},
        # a kind null in every row, text holding the separator, a phone among other ids
        {"EXTERNAL_ID": ["a, b, ", None, "user, 12345, "], "EMAIL": [None, None, None]},
        {"EXTERNAL_ID": ["x, ", "+1 415 555 0123", None], "PHONE": ["+1 (415) 555-0123", None, "12, 34"]},
    ],
)
def test_identifier_columns_mask_as_rows_do(columns):
    """`mask_identifier_columns` gives each row what `mask_identifiers` gives its identifiers."""
    from braze_assets.datatypes import RowBatch
    from braze_assets.masking import mask_identifier_columns

    n = len(next(iter(columns.values())))
    rows = [{c: v[i] for c, v in columns.items()} | {"UPDATED_AT": None} for i in range(n)]
    batch = RowBatch.from_rows(rows)
    assert mask_identifier_columns(batch.columns, n) == [
        mask_identifiers(batch.identifiers(i)) for i in range(n)
    ]


# ----------------------------------------------------------------------------- endpoint guard
BRAZE_HOSTS = [  # [B4]
    "rest.iad-01.braze.com",
    "rest.iad-02.braze.com",
    "rest.iad-03.braze.com",
    "rest.iad-04.braze.com",
    "rest.iad-05.braze.com",
    "rest.iad-06.braze.com",
    "rest.iad-07.braze.com",
    "rest.iad-08.braze.com",
    "rest.us-10.braze.com",
    "rest.fra-01.braze.eu",
    "rest.fra-02.braze.eu",
    "rest.au-01.braze.com",
    "rest.id-01.braze.com",
    "rest.jp-01.braze.com",
    "rest.kr-01.braze.com",
]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://127.0.0.1:4010", "http://127.0.0.1:4010"),
        ("http://localhost:4010/", "http://localhost:4010"),
        ("http://[::1]:4010", "http://[::1]:4010"),
        ("http://127.0.0.2", "http://127.0.0.2"),
        ("https://127.0.0.1:8443/", "https://127.0.0.1:8443"),
    ],
)
def test_loopback_may_use_plain_http(url, expected):
    assert check_endpoint(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://rest.iad-01.braze.com",
        "http://rest.fra-02.braze.eu/",
        "http://10.0.0.5:4010",
        "http://0.0.0.0:4010",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
    ],
)
def test_plain_http_off_loopback_is_refused(url):
    with pytest.raises(BrazeEndpointError, match="must use https"):
        check_endpoint(url)
    with pytest.raises(BrazeEndpointError, match="must use https"):
        check_endpoint(url, allow_custom_host=True)  # allowing a host never allows plain HTTP


@pytest.mark.parametrize(
    "url, host",
    [
        ("https://braze.example.com", "braze.example.com"),
        ("https://rest.iad-09.braze.com", "rest.iad-09.braze.com"),
        ("https://rest.iad-01.braze.com.evil.example", "rest.iad-01.braze.com.evil.example"),
        ("https://rest.iad-01.braze.com@evil.example/", "evil.example"),
        ("https://evil.example/rest.iad-01.braze.com", "evil.example"),
        ("https://braze.com", "braze.com"),
    ],
)
def test_https_to_an_unknown_host_is_refused_unless_allowed(url, host):
    with pytest.raises(BrazeEndpointError, match=re.escape(f"{host!r} is not a known Braze REST host")):
        check_endpoint(url)
    assert check_endpoint(url, allow_custom_host=True) == url.rstrip("/")


@pytest.mark.parametrize("host", BRAZE_HOSTS)
def test_known_braze_hosts_are_accepted(host):
    assert check_endpoint(f"https://{host}") == f"https://{host}"
    assert check_endpoint(f"https://{host}/") == f"https://{host}"


def test_host_names_are_case_insensitive():
    assert check_endpoint("https://REST.IAD-01.BRAZE.COM") == "https://REST.IAD-01.BRAZE.COM"


@pytest.mark.parametrize("url", ["rest.iad-01.braze.com", "", "https://", "localhost:4010"])
def test_something_that_is_not_a_url_is_refused(url):
    with pytest.raises(BrazeEndpointError, match=r"is not an http\(s\) URL"):
        check_endpoint(url)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:4010", "file://localhost/etc/passwd"])
def test_loopback_with_a_non_http_scheme_is_refused(url):
    with pytest.raises(BrazeEndpointError):
        check_endpoint(url)


# ----------------------------------------------------------------------------- the client keeps its key
KEY = "sk-live-0f3b9c2d-SECRET-7a1e"


@pytest.mark.parametrize("url", ["https://rest.iad-01.braze.com/", "http://127.0.0.1:4010"])
def test_client_repr_never_contains_the_key(url):
    client = BrazeClient(url, KEY)
    for text in (repr(client), str(client), f"{client!r}", f"{client}"):
        assert KEY not in text and "SECRET" not in text
        assert url.rstrip("/") in text  # still says which endpoint it talks to


def test_refused_endpoint_error_does_not_contain_the_key():
    with pytest.raises(BrazeEndpointError) as caught:
        BrazeClient("http://rest.iad-01.braze.com", KEY)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


@pytest.mark.parametrize(
    "columns",
    [
        {"EXTERNAL_ID": ["user-1", None, "user-3"], "EMAIL": [None, None, None]},
        {"EXTERNAL_ID": ["user-1", None, None], "EMAIL": ["a@example.com", "b@example.com", None]},
        {"ALIAS_NAME": ["anon", None, "anon"], "ALIAS_LABEL": ["web", "web", None], "PHONE": [None] * 3},
    ],
)
def test_identifier_columns_hash_as_rows_do(columns):
    """`column_lookup_hashes` (whole batches, Python lists or Arrow text, kinds null in every row
    left out) gives each row what `row_lookup_hashes` gives its identifiers."""
    import pyarrow as pa

    from braze_assets.datatypes import RowBatch
    from braze_assets.lookup import column_lookup_hashes, row_lookup_hashes

    n = len(next(iter(columns.values())))
    batch = RowBatch.from_rows(
        [{c: v[i] for c, v in columns.items()} | {"UPDATED_AT": None} for i in range(n)]
    )
    expected = [row_lookup_hashes(batch.identifiers(i), b"k") for i in range(n)]
    assert column_lookup_hashes(batch.columns, n, b"k") == expected
    arrays = {kind: pa.array(values, pa.string()) for kind, values in batch.columns.items()}
    assert column_lookup_hashes(arrays, n, b"k") == expected
