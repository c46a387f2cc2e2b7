"""Braze's documented REST contract: the limits and vocabularies both the client and the emulator obey.

Every number here comes from `docs/braze-contract.md` (section in brackets), so the sender and the
local emulator can never disagree about them.
"""

from __future__ import annotations

#: [B1.2] objects per `/users/track` request, combined across the three arrays (current default).
TRACK_MAX_OBJECTS = 75
#: [B1.2] legacy rate-limit customers: 75 per array, so up to 225 per request.
TRACK_LEGACY_MAX_PER_ARRAY = 75
#: [B1.2] most endpoints accept bodies up to 4 MB; larger ones get 413.
MAX_BODY_BYTES = 4 * 1024 * 1024
#: The sender stays at or under 4,000,000 bytes, within either reading of "4 MB".
SEND_BODY_MAX_BYTES = 4_000_000
#: [B2] ids per `/users/delete` request.
DELETE_MAX_IDS = 50
#: [B1.3] `external_id` longer than this returns EXTERNAL_USER_ID_TOO_LARGE.
EXTERNAL_ID_MAX_BYTES = 987
#: [A2.2] a CDI row whose PAYLOAD is larger than this is rejected ("Payload was greater than 1MB").
PAYLOAD_MAX_BYTES = 1024 * 1024
#: [A2.2] attributes per row (each top-level key counts once).
MAX_ATTRIBUTES_PER_ROW = 250
#: [B1.1] purchase quantity range.
PURCHASE_QUANTITY_MIN, PURCHASE_QUANTITY_MAX = 1, 100
#: [B1.1] product_id, event property names and string values.
MAX_NAME_CHARS = 255

#: [B1.3] identifier keys an API object may carry. Primary ones are exclusive.
PRIMARY_IDENTIFIERS = ("external_id", "user_alias", "braze_id")
SECONDARY_IDENTIFIERS = ("email", "phone")
API_IDENTIFIER_KEYS = frozenset(PRIMARY_IDENTIFIERS + SECONDARY_IDENTIFIERS)

#: [B2] `/users/delete` body keys; CDI deletes use only the first three [A2.3].
DELETE_ID_KEYS = ("external_ids", "user_aliases", "braze_ids", "email_addresses", "phone_numbers")

#: [B4] Braze REST hosts; any other non-loopback endpoint must be allowed explicitly.
BRAZE_REST_HOSTS = frozenset(
    {
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
    }
)

#: [B1.1] purchases take an ISO 4217 alphabetic currency code: list A.1 in force (as shipped by
#: pycountry 26.2.16 / Debian iso-codes), currencies, funds and precious-metal/test codes.
ISO_4217_CURRENCIES = frozenset(
    """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD
    CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP
    GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
    KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN
    MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD
    SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX
    USD USN UYI UYU UYW UZS VED VES VND VUV WST XAD XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD
    XPF XPT XSU XTS XUA XXX YER ZAR ZMW ZWG
    """.split()
)

#: [LIMITS] Burst windows of the rate limits, by endpoint: `/users/track` allows 3,000 requests per
#: 3 seconds ("per 3 seconds, not per second"); the client checks it against what it observes.
RATE_WINDOWS_S = {"/users/track": 3.0}

#: [B2a] items per request to the asynchronous catalog item endpoints (`/catalogs/{name}/items`).
CATALOG_MAX_ITEMS = 50
#: [B2a] an item id: 1 to 250 characters, only letters, digits, `-` and `_`.
CATALOG_ID_MAX_CHARS = 250
CATALOG_ID_CHARS = r"[A-Za-z0-9_-]+"
#: [B2a] no value of an item may be longer than this many characters.
CATALOG_VALUE_MAX_CHARS = 5000
#: [B2a] object values nest at most this deep, and their keys contain neither `.` nor `$`.
CATALOG_MAX_NESTING = 50
#: [B2a] `array` fields hold strings only, at most this many.
CATALOG_ARRAY_MAX_ITEMS = 100
#: [B2a] the field types a catalog's schema may declare; the first field is always `id` (`string`).
CATALOG_FIELD_TYPES = frozenset({"string", "number", "boolean", "time", "object", "array"})
#: [B2a] catalog names, field names and descriptions: at most 250 characters; at most 500 fields.
CATALOG_NAME_MAX_CHARS = 250
CATALOG_MAX_FIELDS = 500
#: [B3] every asynchronous catalog item endpoint of a workspace shares one limit: 16,000 requests
#: per minute, whatever the catalog. The client keys its budgets by path, so a catalog sender must
#: pace all `/catalogs/{name}/items` paths as one.
CATALOG_ITEMS_RATE_LIMIT = 16_000
CATALOG_ITEMS_RATE_WINDOW_S = 60.0
