"""The emulator's catalogs over real HTTP on loopback (braze-contract.md A2.4, B2a, B3)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from braze_assets.braze.contract import CATALOG_MAX_ITEMS
from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig, main
from braze_assets.braze.emulator_catalogs import parse_catalog_option

KEY = "catalog-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FIELDS = {
    "title": "string",
    "price": "number",
    "on_sale": "boolean",
    "launched": "time",
    "meta": "object",
    "tags": "array",
}
ITEMS = "/catalogs/products/items"


@pytest.fixture(scope="module")
def server() -> Iterator[BrazeEmulator]:
    with BrazeEmulator(EmulatorConfig(api_key=KEY, catalogs={"products": FIELDS, "stores": {}})) as emulator:
        yield emulator


@pytest.fixture
def braze(server: BrazeEmulator) -> BrazeEmulator:
    """The module's emulator with its two configured catalogs, empty, and no faults or rate limits."""
    server.store.reset()
    server.set_faults(FaultConfig())
    server.set_rate_limit(None)
    server.set_catalog_rate_limit(None)
    return server


@pytest.fixture
def client(braze: BrazeEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=braze.base_url, headers=AUTH, timeout=5) as http:
        yield http


def put(client: httpx.Client, *items: dict, path: str = ITEMS) -> httpx.Response:
    return client.put(path, json={"items": list(items)})


def delete(client: httpx.Client, *ids: object, path: str = ITEMS) -> httpx.Response:
    return client.request("DELETE", path, json={"items": [{"id": item_id} for item_id in ids]})


def invalid(response: httpx.Response) -> dict[str, list]:
    """A refused request's errors: error id -> parameter_values (and the shape Braze documents)."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["message"] == "Invalid Request"
    assert all(set(error) == {"id", "message", "parameters", "parameter_values"} for error in body["errors"])
    return {error["id"]: error["parameter_values"] for error in body["errors"]}


# --- upsert and delete ----------------------------------------------------------------------------------
def test_put_creates_then_replaces_whole_items(client, braze):
    first = {"id": "p1", "title": "Mug", "price": 9.5, "tags": ["kitchen"]}
    response = put(client, first, {"id": "p2", "title": "Cup"})
    assert (response.status_code, response.json()) == (202, {"message": "success"})
    assert braze.store.catalog_items("products") == {"p1": first, "p2": {"id": "p2", "title": "Cup"}}
    assert put(client, {"id": "p1", "title": "Big mug", "on_sale": True}).status_code == 202
    items = braze.store.catalog_items("products")
    assert items["p1"] == {"id": "p1", "title": "Big mug", "on_sale": True}  # price and tags are gone
    assert items["p2"] == {"id": "p2", "title": "Cup"}
    [products] = [c for c in client.get("/catalogs").json()["catalogs"] if c["name"] == "products"]
    assert products["num_items"] == 2
    assert braze.store.stats()["catalog_items_upserted"] == 3


def test_delete_removes_items_and_ignores_unknown_ids(client, braze):
    put(client, {"id": "p1"}, {"id": "p2"}, {"id": "p3"})
    response = delete(client, "p1", "p3", "never-there")
    assert (response.status_code, response.json()) == (202, {"message": "success"})
    assert list(braze.store.catalog_items("products")) == ["p2"]
    assert braze.store.stats()["catalog_items_deleted"] == 3


def test_catalogs_keep_their_items_apart(client, braze):
    assert put(client, {"id": "s1"}, path="/catalogs/stores/items").status_code == 202
    assert put(client, {"id": "s1", "title": "x"}).status_code == 202
    assert delete(client, "s1", path="/catalogs/stores/items").status_code == 202
    assert braze.store.catalog_items("stores") == {}
    assert braze.store.catalog_items("products") == {"s1": {"id": "s1", "title": "x"}}


def test_values_at_the_limits_are_accepted(client, braze):
    deep: dict = {"leaf": "x"}
    for _ in range(49):  # 50 levels of objects in all
        deep = {"k": deep}
    edge = {
        "id": "a" * 250,
        "title": "t" * 5000,
        "price": -3,
        "on_sale": False,
        "launched": "2024-05-01T12:00:00.000+00:00",
        "meta": deep,
        "tags": ["t"] * 100,
    }
    nulls = {"id": "Only-letters_digits-9", **dict.fromkeys(FIELDS)}  # null fits every field
    many = [{"id": f"bulk-{n}"} for n in range(CATALOG_MAX_ITEMS - 2)]
    assert put(client, edge, nulls, *many).status_code == 202
    assert len(braze.store.catalog_items("products")) == CATALOG_MAX_ITEMS


# --- validation: one bad item refuses the request, naming the items --------------------------------
GOOD = {"id": "good", "title": "fine"}


def _nested(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels - 1):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    ("items", "error_id", "named"),
    [
        ([{"title": "no id"}, {"title": "nor this"}], "items-missing-ids", []),
        ([{"id": 7}], "ids-not-string", [7]),
        ([{"id": None}], "ids-not-string", [None]),
        ([{"id": "x" * 251}], "ids-too-large", ["x" * 251]),
        ([{"id": "has space"}, {"id": "dot.ted"}, {"id": ""}], "invalid-ids", ["has space", "dot.ted", ""]),
        ([{"id": "dup"}, {"id": "dup", "title": "again"}], "ids-not-unique", ["dup"]),
        ([{"id": "long", "title": "t" * 5001}], "items-too-large", ["long"]),
        ([{"id": "long", "meta": {"note": "n" * 5001}}], "items-too-large", ["long"]),
        ([{"id": "odd", "colour": "red"}], "invalid-fields", ["odd"]),
        ([{"id": "dots", "meta": {"a.b": 1}}], "invalid-keys-in-value-object", ["dots"]),
        ([{"id": "dollar", "meta": {"x": [{"$y": 1}]}}], "invalid-keys-in-value-object", ["dollar"]),
        ([{"id": "deep", "meta": _nested(51)}], "too-deep-nesting-in-value-object", ["deep"]),
        ([{"id": "n", "price": "12"}], "unable-to-coerce-value", ["n"]),
        ([{"id": "b", "on_sale": "true"}], "unable-to-coerce-value", ["b"]),
        ([{"id": "t", "launched": "yesterday"}], "unable-to-coerce-value", ["t"]),
        ([{"id": "o", "meta": ["not", "an", "object"]}], "unable-to-coerce-value", ["o"]),
        ([{"id": "s", "title": 5}], "unable-to-coerce-value", ["s"]),
        ([{"id": "a", "tags": ["ok", 1]}], "unable-to-coerce-value", ["a"]),
        ([{"id": "a", "tags": ["t"] * 101}], "unable-to-coerce-value", ["a"]),
        ([{"id": "p", "price": True}], "unable-to-coerce-value", ["p"]),
    ],
)
def test_each_item_error_names_its_items_and_stores_nothing(client, braze, items, error_id, named):
    put(client, {"id": "kept", "title": "before"})
    errors = invalid(put(client, GOOD, *items))
    assert errors == {error_id: named}
    assert braze.store.catalog_items("products") == {"kept": {"id": "kept", "title": "before"}}


def test_items_missing_ids_counts_them():
    """The message counts items without an id, as Braze's does (nothing can name them)."""
    with BrazeEmulator(EmulatorConfig(api_key=KEY, catalogs={"products": FIELDS})) as braze:
        response = httpx.put(f"{braze.base_url}{ITEMS}", json={"items": [{}, {}, GOOD]}, headers=AUTH)
    [error] = response.json()["errors"]
    assert error == {
        "id": "items-missing-ids",
        "message": "There are 2 item(s) that do not have ids",
        "parameters": [],
        "parameter_values": [],
    }


@pytest.mark.parametrize("body", [{}, {"items": "p1"}, {"items": []}, {"items": [GOOD, "p2"]}, [GOOD]])
def test_items_must_be_an_array_of_objects(client, braze, body):
    assert invalid(client.put(ITEMS, json=body)) == {"item-array-invalid": []}
    assert invalid(client.request("DELETE", ITEMS, json=body)) == {"item-array-invalid": []}
    assert braze.store.catalog_items("products") == {}


def test_more_than_50_items_are_refused(client, braze):
    items = [{"id": f"p{n}"} for n in range(CATALOG_MAX_ITEMS + 1)]
    assert invalid(put(client, *items)) == {"request-includes-too-many-items": [51]}
    assert invalid(delete(client, *(item["id"] for item in items))) == {
        "request-includes-too-many-items": [51]
    }
    assert put(client, *items[:CATALOG_MAX_ITEMS]).status_code == 202
    assert len(braze.store.catalog_items("products")) == CATALOG_MAX_ITEMS


def test_delete_checks_ids_only_and_names_non_strings_its_own_way(client, braze):
    put(client, {"id": "p1"})
    errors = invalid(
        client.request("DELETE", ITEMS, json={"items": [{"id": "p1"}, {"id": 3}, {"id": "x$"}, {"id": "x$"}]})
    )
    assert errors == {"ids-not-strings": [3], "invalid-ids": ["x$"], "ids-not-unique": ["x$"]}
    assert list(braze.store.catalog_items("products")) == ["p1"]
    # a delete item's other keys are not checked against the schema
    assert client.request("DELETE", ITEMS, json={"items": [{"id": "p1", "colour": 1}]}).status_code == 202
    assert braze.store.catalog_items("products") == {}


def test_a_sender_can_drop_the_named_items_and_resend_the_rest(client, braze):
    items = [
        {"id": "ok1", "title": "a"},
        {"id": "bad.id", "title": "b"},
        {"id": "ok2", "price": 2},
        {"id": "wrong", "price": "two"},
        {"id": "extra", "size": "L"},
        {"id": "ok3", "tags": []},
    ]
    errors = invalid(put(client, *items))
    assert errors == {
        "invalid-ids": ["bad.id"],
        "invalid-fields": ["extra"],
        "unable-to-coerce-value": ["wrong"],
    }
    named = {item_id for values in errors.values() for item_id in values}
    assert put(client, *(item for item in items if item["id"] not in named)).status_code == 202
    assert list(braze.store.catalog_items("products")) == ["ok1", "ok2", "ok3"]
    stats = braze.store.stats()
    assert (stats["catalog_requests"], stats["catalog_requests_invalid"]) == (2, 1)


def test_unknown_catalog_is_404(client, braze):
    expected = {
        "message": "Invalid Request",
        "errors": [
            {
                "id": "catalog-not-found",
                "message": "Could not find catalog",
                "parameters": ["catalog_name"],
                "parameter_values": ["nope"],
            }
        ],
    }
    for response in (
        put(client, GOOD, path="/catalogs/nope/items"),
        delete(client, "g", path="/catalogs/nope/items"),
    ):
        assert (response.status_code, response.json()) == (404, expected)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(braze, headers):
    url = braze.base_url
    new = {"catalogs": [{"name": "c", "description": "", "fields": [{"name": "id", "type": "string"}]}]}
    responses = [
        httpx.put(f"{url}{ITEMS}", json={"items": [GOOD]}, headers=headers),
        httpx.request("DELETE", f"{url}{ITEMS}", json={"items": [GOOD]}, headers=headers),
        httpx.post(f"{url}/catalogs", json=new, headers=headers),
        httpx.get(f"{url}/catalogs", headers=headers),
    ]
    assert [(r.status_code, r.json()) for r in responses] == [(401, {"message": "Invalid API Key"})] * 4
    assert braze.store.catalog_items("products") == {}
    assert [c["name"] for c in braze.store.catalogs()] == ["products", "stores"]


def test_other_methods_on_catalog_paths_are_405(client, braze):
    assert client.patch(ITEMS, json={"items": [GOOD]}).status_code == 405
    assert client.post(ITEMS, json={"items": [GOOD]}).status_code == 405
    assert client.delete("/catalogs").status_code == 405
    assert client.get("/catalogs/products/things").status_code == 404
    assert braze.store.catalog_items("products") == {}


# --- creating and listing catalogs ----------------------------------------------------------------------
def catalog_body(name="restaurants", fields=None, **extra) -> dict:
    fields = (
        fields
        if fields is not None
        else [{"name": "id", "type": "string"}, {"name": "Rating", "type": "number"}]
    )
    return {"catalogs": [{"name": name, "description": "My restaurants", "fields": fields, **extra}]}


def test_post_catalogs_creates_a_catalog_items_can_go_to(client, braze):
    response = client.post("/catalogs", json=catalog_body())
    assert response.status_code == 201
    [created] = response.json()["catalogs"]
    assert response.json()["message"] == "success"
    assert {k: created[k] for k in ("name", "description", "fields", "num_items")} == {
        "name": "restaurants",
        "description": "My restaurants",
        "fields": [{"name": "id", "type": "string"}, {"name": "Rating", "type": "number"}],
        "num_items": 0,
    }
    assert created["updated_at"].endswith("+00:00")
    path = "/catalogs/restaurants/items"
    assert put(client, {"id": "r1", "Rating": 4}, path=path).status_code == 202
    assert invalid(put(client, {"id": "r2", "Rating": "high"}, path=path)) == {
        "unable-to-coerce-value": ["r2"]
    }
    listed = client.get("/catalogs").json()
    assert [(c["name"], c["num_items"]) for c in listed["catalogs"]] == [
        ("products", 0),
        ("stores", 0),
        ("restaurants", 1),
    ]
    taken = client.post("/catalogs", json=catalog_body())
    assert invalid(taken) == {"catalog-name-already-exists": ["restaurants"]}
    assert taken.json()["errors"][0]["message"] == "A catalog with that name already exists"


ID = {"name": "id", "type": "string"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"catalogs": []}, {"catalog-array-invalid": []}),
        ({"catalogs": "restaurants"}, {"catalog-array-invalid": []}),
        ({"catalogs": [catalog_body()["catalogs"][0]] * 2}, {"too-many-catalog-atoms": []}),
        ({"catalogs": [{"name": "x", "fields": [ID]}]}, {"catalog-array-invalid": []}),
        (catalog_body(name="has space"), {"invalid-catalog-name": ["has space"]}),
        (catalog_body(name="n" * 251), {"catalog-name-too-large": ["n" * 251]}),
        (catalog_body(description="d" * 251), {"description-too-long": []}),
        (catalog_body(fields=[{"name": "Rating", "type": "number"}]), {"id-not-first-column": []}),
        (catalog_body(fields=[{"name": "id", "type": "number"}]), {"id-not-first-column": []}),
        (catalog_body(fields=[ID, {"name": "x"}]), {"invalid-fields": []}),
        (catalog_body(fields=[ID, {"name": "x", "type": "geo"}]), {"invalid-field-types": ["geo"]}),
        (catalog_body(fields=[ID, {"name": "a b", "type": "string"}]), {"invalid-field-names": ["a b"]}),
        (
            catalog_body(fields=[ID, {"name": "f" * 251, "type": "string"}]),
            {"field-names-too-large": ["f" * 251]},
        ),
        (
            catalog_body(fields=[ID, *[{"name": "a", "type": "string"}] * 2]),
            {"field-names-not-unique": ["a"]},
        ),
        (
            catalog_body(fields=[ID, *({"name": f"f{n}", "type": "string"} for n in range(500))]),
            {"too-many-fields": ["f499"]},
        ),
    ],
)
def test_post_catalogs_refuses_bad_schemas(client, braze, body, expected):
    assert invalid(client.post("/catalogs", json=body)) == expected
    assert [c["name"] for c in braze.store.catalogs()] == ["products", "stores"]


def test_reset_brings_back_the_configured_catalogs_empty(client, braze):
    assert client.post("/catalogs", json=catalog_body()).status_code == 201
    put(client, {"id": "p1"})
    assert httpx.post(f"{braze.base_url}/_emulator/reset").status_code == 200
    assert [c["name"] for c in braze.store.catalogs()] == ["products", "stores"]
    assert braze.store.catalog_items("products") == {}
    with pytest.raises(KeyError):
        braze.store.catalog_items("restaurants")


def test_configured_catalogs_are_checked_like_post_catalogs():
    with pytest.raises(ValueError, match="invalid-field-types"):
        BrazeEmulator(EmulatorConfig(catalogs={"products": {"price": "money"}}))
    with pytest.raises(ValueError, match="invalid-catalog-name"):
        BrazeEmulator(EmulatorConfig(catalogs={"my products": {}}))
    assert parse_catalog_option("products:title=string, price=number") == (
        "products",
        {"title": "string", "price": "number"},
    )
    assert parse_catalog_option("bare") == ("bare", {})
    for text in ("products:title", "products:title=text", ":title=string"):
        with pytest.raises(ValueError):
            parse_catalog_option(text)
    with pytest.raises(SystemExit):  # the command line reports it as a usage error
        main(["--catalog", "products:title=text"])


# --- faults and rate limits -----------------------------------------------------------------------------
@pytest.mark.parametrize("rate", ["rate_5xx_after", "rate_drop_after"])
def test_after_faults_store_the_change_then_lose_the_answer(client, braze, rate):
    put(client, {"id": "gone"})
    braze.set_faults(FaultConfig(**{rate: 1.0}))
    try:
        response = put(client, {"id": "p1", "title": "stored"})
    except (httpx.RemoteProtocolError, httpx.ReadError):
        assert rate == "rate_drop_after"
    else:
        assert rate == "rate_5xx_after" and response.status_code in (500, 504)
    try:
        delete(client, "gone")
    except (httpx.RemoteProtocolError, httpx.ReadError):
        assert rate == "rate_drop_after"
    assert braze.store.catalog_items("products") == {"p1": {"id": "p1", "title": "stored"}}


def test_timeout_after_processing_stores_the_items(client, braze):
    braze.set_faults(FaultConfig(rate_timeout_after=1.0, timeout_s=2))
    with pytest.raises(httpx.ReadTimeout):
        client.put(ITEMS, json={"items": [GOOD]}, timeout=0.3)
    assert braze.store.catalog_items("products") == {"good": GOOD}
    assert braze.store.stats()["by_status"] == {"timeout": 1}


@pytest.mark.parametrize("rate", ["rate_429", "rate_5xx_before", "rate_drop_before"])
def test_before_faults_store_nothing(client, braze, rate):
    braze.set_faults(FaultConfig(retry_after_s=7, **{rate: 1.0}))
    try:
        response = put(client, GOOD)
    except httpx.TransportError:
        assert rate == "rate_drop_before"
    else:
        assert response.status_code in {"rate_429": {429}, "rate_5xx_before": {502, 503}}[rate]
        assert rate != "rate_429" or response.headers["X-Ratelimit-Retry-After"] == "7"
    assert braze.store.catalog_items("products") == {}
    assert braze.store.stats()["catalog_requests"] == 1


def test_catalog_items_share_a_rate_limit_of_their_own(client, braze):
    braze.set_rate_limit(1, window_s=60)
    braze.set_catalog_rate_limit(3, window_s=1.0)
    assert client.post("/users/track", json={"attributes": [{"external_id": "u1"}]}).status_code == 201
    assert client.post("/users/track", json={"attributes": [{"external_id": "u2"}]}).status_code == 429
    answers = [
        put(client, {"id": "p1"}),
        delete(client, "s1", path="/catalogs/stores/items"),  # another catalog, the same window
        put(client, {"id": "p2"}),
    ]
    assert [r.status_code for r in answers] == [202, 202, 202]
    assert [r.headers["X-RateLimit-Limit"] for r in answers] == ["3"] * 3
    assert [r.headers["X-RateLimit-Remaining"] for r in answers] == ["2", "1", "0"]
    assert int(answers[0].headers["X-RateLimit-Reset"]) >= int(time.time())
    refused = put(client, {"id": "p3"})
    assert (refused.status_code, refused.json()) == (429, {"message": "Rate Limit Exceeded"})
    assert refused.headers["X-Ratelimit-Retry-After"] == "1"
    listing = client.get("/catalogs")  # the synchronous catalog endpoints are not limited here
    assert listing.status_code == 200 and "X-RateLimit-Limit" not in listing.headers
    assert list(braze.store.catalog_items("products")) == ["p1", "p2"]
    time.sleep(1.05)
    assert put(client, {"id": "p3"}).status_code == 202  # a new catalog window ...
    assert (
        client.post("/users/track", json={"attributes": [{"external_id": "u3"}]}).status_code == 429
    )  # ... only
    assert braze.store.stats()["catalog_requests"] == 5


# --- inspection, persistence, lean ----------------------------------------------------------------------
def test_admin_endpoints_show_catalogs_and_items_uncounted(client, braze):
    put(client, {"id": "p1", "title": "Mug"})
    admin = f"{braze.base_url}/_emulator"
    assert httpx.get(f"{admin}/catalogs/products").json() == {"p1": {"id": "p1", "title": "Mug"}}
    assert httpx.get(f"{admin}/catalogs/nope").status_code == 404
    listed = httpx.get(f"{admin}/catalogs").json()
    assert [(c["name"], c["num_items"]) for c in listed] == [("products", 1), ("stores", 0)]
    stats = httpx.get(f"{admin}/stats").json()
    assert (stats["requests"], stats["catalogs"], stats["catalog_items"], stats["catalog_requests"]) == (
        1,
        2,
        1,
        1,
    )


def test_state_file_keeps_catalogs_and_items(tmp_path):
    config = EmulatorConfig(
        api_key=KEY, state_file=str(tmp_path / "store.json"), catalogs={"products": FIELDS}
    )
    with BrazeEmulator(config) as first, httpx.Client(base_url=first.base_url, headers=AUTH) as http:
        assert http.post("/catalogs", json=catalog_body()).status_code == 201
        assert put(http, {"id": "p1", "meta": {"a": [1]}}).status_code == 202
        saved = (first.store.catalogs(), first.store.catalog_items("products"))
    with BrazeEmulator(config) as second:
        assert (second.store.catalogs(), second.store.catalog_items("products")) == saved
        assert second.store.catalog_items("restaurants") == {}


def test_lean_mode_checks_and_counts_catalog_items_without_keeping_them():
    with BrazeEmulator(EmulatorConfig(api_key=KEY, lean=True, catalogs={"products": FIELDS})) as lean:
        url = f"{lean.base_url}{ITEMS}"
        assert httpx.put(url, json={"items": [GOOD]}, headers=AUTH).status_code == 202
        assert httpx.put(url, json={"items": [{"id": "x", "price": "1"}]}, headers=AUTH).status_code == 400
        assert lean.store.catalog_items("products") == {}
        assert lean.store.stats()["catalog_items_upserted"] == 1
