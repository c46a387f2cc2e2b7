"""The local Braze emulator over real HTTP on loopback (contract sections B1-B3 of braze-contract.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
from braze_assets.braze.emulator_validation import (
    MSG_ALL_INVALID,
    MSG_BAD_ALIAS,
    MSG_BAD_EMAIL,
    MSG_BAD_QUANTITY,
    MSG_IDENTIFIER_REQUIRED,
    MSG_TWO_PRIMARIES,
)
from braze_assets_tests.conftest import API_KEY

KEY = API_KEY  # the key `server` (conftest) accepts
AUTH = {"Authorization": f"Bearer {KEY}"}
T = "2024-05-01T12:00:00Z"


@pytest.fixture
def client(braze):
    with httpx.Client(base_url=braze.base_url, headers=AUTH, timeout=5) as http:
        yield http


def event(external_id="u1", **fields):
    return {"external_id": external_id, "name": "login", "time": T, **fields}


def purchase(external_id="u1", **fields):
    return {
        "external_id": external_id,
        "product_id": "sku-1",
        "currency": "USD",
        "price": 9.5,
        "time": T,
        **fields,
    }


def only_error(response):
    """The single error entry of a response whose one object was invalid."""
    assert response.status_code == 400, response.text
    assert response.json()["message"] == MSG_ALL_INVALID
    [error] = response.json()["errors"]
    return error["type"]


# --- auth, success, partial success -------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(braze, headers):
    response = httpx.post(
        f"{braze.base_url}/users/track", json={"attributes": [{"external_id": "u1"}]}, headers=headers
    )
    assert response.status_code == 401
    assert response.json() == {"message": "Invalid API Key"}
    assert braze.store.profiles() == []


def test_success_counts_only_the_arrays_sent(client, braze):
    body = {"attributes": [{"external_id": "u1", "plan": "pro"}, {"external_id": "u2"}], "events": [event()]}
    response = client.post("/users/track", json=body)
    assert response.status_code == 201
    assert response.json() == {"message": "success", "attributes_processed": 2, "events_processed": 1}
    assert braze.store.events() == [{**event(), "_identity": "external_id:u1"}]


def test_partial_success_names_each_invalid_object(client, braze):
    body = {
        "attributes": [{"external_id": "u1"}],
        "events": [event(), event(time=None), event("u3")],
        "purchases": [purchase(currency="XYZ")],
    }
    response = client.post("/users/track", json=body)
    assert response.status_code == 201
    payload = response.json()
    counts = [payload[f"{array}_processed"] for array in ("attributes", "events", "purchases")]
    assert counts == [1, 2, 0]
    assert [(e["input_array"], e["index"]) for e in payload["errors"]] == [("events", 1), ("purchases", 0)]
    assert "time" in payload["errors"][0]["type"] and "currency" in payload["errors"][1]["type"]
    assert [e["_identity"] for e in braze.store.events()] == ["external_id:u1", "external_id:u3"]
    assert braze.store.purchases() == []
    assert braze.store.stats()["track_objects_rejected"] == 2


def test_all_invalid_or_empty_is_400(client, braze):
    response = client.post("/users/track", json={"events": [{"name": "x", "time": T}]})
    assert only_error(response) == MSG_IDENTIFIER_REQUIRED
    assert client.post("/users/track", json={}).json() == {"message": MSG_ALL_INVALID}
    assert braze.store.stats()["track_objects_accepted"] == 0


# --- request limits -------------------------------------------------------------------------------------
def test_more_than_75_objects_in_total_is_refused(client, braze):
    attributes = [{"external_id": f"u{i}"} for i in range(40)]
    response = client.post("/users/track", json={"attributes": attributes, "events": [event()] * 36})
    assert response.status_code == 400
    assert response.json() == {"message": "Max Input Length Exceeded"}
    assert braze.store.profiles() == [] and braze.store.events() == []
    response = client.post("/users/track", json={"attributes": attributes, "events": [event()] * 35})
    assert response.status_code == 201


def test_legacy_batching_allows_75_per_array():
    with BrazeEmulator(EmulatorConfig(api_key=KEY, legacy_batching=True)) as legacy:
        full = {
            "attributes": [{"external_id": "u1"}] * 75,
            "events": [event()] * 75,
            "purchases": [purchase()] * 75,
        }
        response = httpx.post(f"{legacy.base_url}/users/track", json=full, headers=AUTH)
        assert response.status_code == 201
        assert response.json()["purchases_processed"] == 75
        response = httpx.post(f"{legacy.base_url}/users/track", json={"events": [event()] * 76}, headers=AUTH)
        assert response.json() == {"message": "Max Input Length Exceeded"}


def test_body_over_4_mb_is_413_and_bad_json_is_400(client, braze):
    padding = "x" * (4 * 1024 * 1024)
    response = client.post("/users/track", json={"attributes": [{"external_id": "u1", "blob": padding}]})
    assert response.status_code == 413
    assert response.json() == {"message": "Request Entity Too Large"}
    assert client.post("/users/track", content=b"{not json").status_code == 400
    assert client.post("/users/track", json=[1, 2]).status_code == 400
    chunks = iter([b" " * (3 * 1024 * 1024)] * 2)  # chunked, no Content-Length
    assert client.post("/users/track", content=chunks).status_code == 413
    assert braze.store.profiles() == []


# --- object rules ---------------------------------------------------------------------------------------
def test_external_id_is_limited_to_987_bytes(client, braze):
    ok = client.post("/users/track", json={"attributes": [{"external_id": "a" * 987}]})
    assert ok.status_code == 201
    for too_long in ("a" * 988, "é" * 494):  # 988 bytes either way
        response = client.post("/users/track", json={"attributes": [{"external_id": too_long}]})
        assert only_error(response) == "EXTERNAL_USER_ID_TOO_LARGE"
    assert len(braze.store.profiles()) == 1


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"currency": "usd"}, "currency"),
        ({"currency": "ABC"}, "currency"),
        ({"currency": None}, "currency"),
        ({"price": "9.50"}, "price"),
        ({"price": True}, "price"),
        ({"price": None}, "price"),
        ({"quantity": 0}, MSG_BAD_QUANTITY),
        ({"quantity": 101}, MSG_BAD_QUANTITY),
        ({"quantity": 2.5}, MSG_BAD_QUANTITY),
        ({"product_id": ""}, "product_id"),
        ({"product_id": "p" * 256}, "product_id"),
        ({"time": "yesterday"}, "time"),
        ({"properties": {"$bad": 1}}, "properties"),
    ],
)
def test_invalid_purchases_are_rejected(client, fields, fragment):
    assert fragment in only_error(client.post("/users/track", json={"purchases": [purchase(**fields)]}))


def test_valid_purchase_edge_values_and_quantity_stored_once(client, braze):
    purchases = [
        purchase(quantity=100, currency="JPY", price=0),
        purchase(quantity=3, currency="EUR", price=12),
    ]
    response = client.post("/users/track", json={"purchases": purchases})
    assert response.json() == {"message": "success", "purchases_processed": 2}
    stored = braze.store.purchases()
    assert [(p["quantity"], p["_identity"]) for p in stored] == [
        (100, "external_id:u1"),
        (3, "external_id:u1"),
    ]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"name": ""}, "name"),
        ({"name": None}, "name"),
        ({"time": None}, "time"),
        ({"time": "2024-13-01T00:00:00Z"}, "time"),
        ({"time": 1714564800}, "time"),
        ({"properties": "x"}, "properties"),
        ({"properties": {"$price": 1}}, "properties"),
        ({"properties": {"time": 1}}, "properties"),
        ({"properties": {"event_name": 1}}, "properties"),
        ({"properties": {"": 1}}, "properties"),
        ({"properties": {"k" * 256: 1}}, "properties"),
    ],
)
def test_invalid_events_are_rejected(client, fields, fragment):
    assert fragment in only_error(client.post("/users/track", json={"events": [event(**fields)]}))


@pytest.mark.parametrize(
    "time_value", ["2024-05-01T12:00:00.123+02:00", "2024-05-01", "2013-02-20T20:50:01:123-0800"]
)
def test_event_time_formats_accepted(client, time_value):
    body = {"events": [event(time=time_value, properties={"k" * 255: "v"})]}
    assert client.post("/users/track", json=body).status_code == 201


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"plan": "pro"}, MSG_IDENTIFIER_REQUIRED),
        ({"external_id": "u1", "braze_id": "b1"}, MSG_TWO_PRIMARIES),
        ({"external_id": "u1", "user_alias": {"alias_name": "a", "alias_label": "l"}}, MSG_TWO_PRIMARIES),
        ({"user_alias": {"alias_name": "a"}}, MSG_BAD_ALIAS),
        ({"user_alias": {"alias_name": "a", "alias_label": ""}}, MSG_BAD_ALIAS),
        ({"email": "not-an-email"}, MSG_BAD_EMAIL),
        ({"external_id": "u1", "email": "bad@"}, MSG_BAD_EMAIL),
        ({"external_id": 42}, "external_id"),
        ({"external_id": "u1", "_update_existing_only": "yes"}, "_update_existing_only"),
    ],
)
def test_identifier_and_attribute_rules(client, obj, message):
    assert message in only_error(client.post("/users/track", json={"attributes": [obj]}))


def test_attributes_merge_remove_increment_and_edit_arrays(client, braze):
    first = {"external_id": "u1", "plan": "pro", "visits": 1, "tags": ["a"], "pet": {"name": "Rex", "age": 3}}
    second = {
        "external_id": "u1",
        "plan": None,
        "visits": {"inc": 2},
        "tags": {"add": ["b", "a"], "remove": ["x"]},
        "pet": {"age": 4},
        "_merge_objects": True,
    }
    for obj in (first, second):
        assert client.post("/users/track", json={"attributes": [obj]}).status_code == 201
    [profile] = braze.store.profiles()
    assert profile["external_id"] == "u1" and len(profile["braze_id"]) == 24
    assert profile["attributes"] == {"visits": 3, "tags": ["a", "b"], "pet": {"name": "Rex", "age": 4}}
    third = {"external_id": "u1", "tags": {"remove": ["a"]}, "pet": {"x": 1}}  # no _merge_objects: replace
    client.post("/users/track", json={"attributes": [third]})
    assert braze.store.profiles()[0]["attributes"] == {"visits": 3, "tags": ["b"], "pet": {"x": 1}}


def test_profile_creation_rules(client, braze):
    alias = {"alias_name": "anon-1", "alias_label": "crm"}
    objects = [
        {"external_id": "new", "_update_existing_only": True, "a": 1},  # update-only: not created
        {"user_alias": alias, "a": 1},  # alias defaults to update-only
        {"braze_id": "000000000000000000000abc", "a": 1},  # braze_id never creates
        {"external_id": "u1", "a": 1},  # creates
    ]
    response = client.post("/users/track", json={"attributes": objects, "events": [event("u2")]})
    assert response.json()["attributes_processed"] == 4  # processed means queued, even if nothing applied
    # the event created u2
    assert sorted(p.get("external_id") for p in braze.store.profiles()) == ["u1", "u2"]
    create_alias = {"user_alias": alias, "_update_existing_only": False, "a": 2}
    client.post("/users/track", json={"attributes": [create_alias]})
    other_alias = {**alias, "alias_name": "other"}
    client.post("/users/track", json={"events": [{"user_alias": other_alias, "name": "e", "time": T}]})
    aliased = [p for p in braze.store.profiles() if "user_alias" in p]
    assert [(p["user_alias"], p["attributes"]) for p in aliased] == [(alias, {"a": 2})]
    braze_id = aliased[0]["braze_id"]
    client.post("/users/track", json={"attributes": [{"braze_id": braze_id, "b": 3}]})
    updated = [p["attributes"] for p in braze.store.profiles() if p["braze_id"] == braze_id]
    assert updated == [{"a": 2, "b": 3}]
    assert len(braze.store.events()) == 2  # events are stored whether or not a profile exists


def test_email_identifier_updates_identified_profile_or_creates_email_only(client, braze):
    client.post("/users/track", json={"attributes": [{"external_id": "u1", "email": "Ann@Example.com"}]})
    by_email = {"email": "ann@example.com", "phone": "+15551234567", "vip": True}
    client.post("/users/track", json={"attributes": [by_email]})
    client.post("/users/track", json={"attributes": [{"phone": "+1 (555) 000-1111", "sms": True}]})
    by_key = {p.get("external_id", p.get("phone")): p for p in braze.store.profiles()}
    # email wins over phone, and matched the identified profile case-insensitively
    assert by_key["u1"]["attributes"]["vip"] is True
    assert by_key["+1 (555) 000-1111"]["attributes"] == {"phone": "+1 (555) 000-1111", "sms": True}
    assert len(by_key) == 2


# --- /users/delete --------------------------------------------------------------------------------------
def test_delete_removes_profiles_and_records_ids(client, braze):
    alias = {"alias_name": "a1", "alias_label": "crm"}
    attributes = [{"external_id": f"u{i}"} for i in range(3)]
    attributes.append({"user_alias": alias, "_update_existing_only": False})
    attributes.append({"email": "x@example.com"})
    client.post("/users/track", json={"attributes": attributes})
    response = client.post("/users/delete", json={"external_ids": ["u0", "u1", "ghost"]})
    assert response.status_code == 201
    assert response.json() == {"deleted": 3, "message": "success"}
    client.post("/users/delete", json={"user_aliases": [alias]})
    prioritized = {"email": "x@example.com", "prioritization": ["unidentified", "most_recently_updated"]}
    client.post("/users/delete", json={"email_addresses": [prioritized]})
    assert [p.get("external_id") for p in braze.store.profiles()] == ["u2"]
    assert braze.store.deletions()[3:] == [
        {"type": "user_alias", "id": alias},
        {"type": "email", "id": "x@example.com"},
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"external_ids": [f"u{i}" for i in range(51)]}, "The max number of ids per request was exceeded"),
        ({"external_ids": ["u1"], "braze_ids": ["b1"]}, "Exactly one of"),
        ({}, "Exactly one of"),
        ({"external_ids": []}, "non-empty"),
        ({"user_aliases": [{"alias_name": "a"}]}, "user_alias"),
        ({"email_addresses": [{"email": "x@example.com"}]}, "prioritization"),
    ],
)
def test_delete_request_rules(client, braze, body, fragment):
    response = client.post("/users/delete", json=body)
    assert response.status_code == 400
    assert fragment in response.json()["message"]
    assert braze.store.deletions() == []


# --- rate limits ----------------------------------------------------------------------------------------
def test_rate_limit_headers_and_429(client, braze):
    braze.set_rate_limit(5, window_s=1.0)
    remaining = []
    for _ in range(5):
        response = client.post("/users/track", json={"attributes": [{"external_id": "u1"}]})
        assert response.status_code == 201
        assert response.headers["X-RateLimit-Limit"] == "5"
        assert int(response.headers["X-RateLimit-Reset"]) >= int(time.time())
        remaining.append(response.headers["X-RateLimit-Remaining"])
    assert remaining == ["4", "3", "2", "1", "0"]
    refused = client.post("/users/track", json={"attributes": [{"external_id": "u2"}]})
    assert refused.status_code == 429
    assert refused.json() == {"message": "Rate Limit Exceeded"}
    assert refused.headers["X-Ratelimit-Retry-After"] == "1"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert httpx.post(f"{braze.base_url}/users/track", json={}).status_code == 429  # refused before auth
    time.sleep(1.05)
    assert client.post("/users/track", json={"attributes": [{"external_id": "u2"}]}).status_code == 201
    assert len(braze.store.profiles()) == 2


def test_mau_style_429_carries_only_retry_after():
    config = EmulatorConfig(api_key=KEY, rate_limit=1, rate_window_s=60, mau_style_429=True)
    with BrazeEmulator(config) as mau, httpx.Client(base_url=mau.base_url, headers=AUTH) as http:
        assert http.post("/users/track", json={"events": [event()]}).headers["X-RateLimit-Limit"] == "1"
        refused = http.post("/users/track", json={"events": [event()]})
        assert refused.status_code == 429
        assert 59 <= int(refused.headers["X-Ratelimit-Retry-After"]) <= 60
        assert "X-RateLimit-Limit" not in refused.headers and "X-RateLimit-Remaining" not in refused.headers


# --- faults ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", ["rate_429", "rate_5xx_before", "rate_drop_before"])
def test_before_faults_process_nothing(client, braze, rate):
    braze.set_faults(FaultConfig(retry_after_s=7, **{rate: 1.0}))
    try:
        response = client.post("/users/track", json={"events": [event()]})
    except httpx.TransportError:
        assert rate == "rate_drop_before"
    else:
        expected = {"rate_429": {429}, "rate_5xx_before": {502, 503}}[rate]
        assert response.status_code in expected
        assert rate != "rate_429" or response.headers["X-Ratelimit-Retry-After"] == "7"
    assert braze.store.events() == []


@pytest.mark.parametrize("rate", ["rate_5xx_after", "rate_drop_after"])
def test_after_faults_store_the_objects(client, braze, rate):
    braze.set_faults(FaultConfig(**{rate: 1.0}))
    try:
        response = client.post("/users/track", json={"events": [event()]})
    except (httpx.RemoteProtocolError, httpx.ReadError):
        assert rate == "rate_drop_after"
        assert braze.store.stats()["by_status"] == {"dropped": 1}
    else:
        assert rate == "rate_5xx_after" and response.status_code in (500, 504)
    assert len(braze.store.events()) == 1


def test_timeout_after_processing_makes_the_client_time_out(client, braze):
    braze.set_faults(FaultConfig(rate_timeout_after=1.0, timeout_s=2))
    with pytest.raises(httpx.ReadTimeout):
        client.post("/users/track", json={"purchases": [purchase()]}, timeout=0.3)
    assert len(braze.store.purchases()) == 1
    assert braze.store.stats()["by_status"] == {"timeout": 1}


def test_seeded_faults_are_reproducible_and_latency_delays_answers(client, braze):
    def statuses():
        braze.set_faults(FaultConfig(rate_5xx_before=0.5, seed=7))
        return [client.post("/users/delete", json={"braze_ids": ["b"]}).status_code for _ in range(12)]

    first = statuses()
    assert first == statuses() and {201} < set(first) <= {201, 502, 503}
    braze.set_faults(FaultConfig(latency_ms=200))
    started = time.monotonic()
    assert client.post("/users/track", json={"events": [event()]}).status_code == 201
    assert time.monotonic() - started >= 0.2


# --- admin, routing, lean -------------------------------------------------------------------------------
@pytest.fixture
def admin(braze):
    with httpx.Client(base_url=f"{braze.base_url}/_emulator") as http:
        yield http


def test_admin_endpoints(client, braze, admin):
    assert admin.get("/health").json() == {"status": "ok"}
    body = {"attributes": [{"external_id": "u1", "a": 1}], "events": [event()], "purchases": [purchase()]}
    client.post("/users/track", json=body)
    client.post("/users/delete", json={"braze_ids": ["nobody"]})
    assert admin.get("/profiles").json()[0]["attributes"] == {"a": 1}
    assert admin.get("/events").json()[0]["name"] == "login"
    assert admin.get("/purchases").json()[0]["product_id"] == "sku-1"
    assert admin.get("/deletions").json() == [{"type": "braze_id", "id": "nobody"}]
    stats = admin.get("/stats").json()
    assert stats["requests"] == 2 and stats["by_status"] == {"201": 2}  # admin calls are not counted
    assert (stats["profiles"], stats["events"], stats["purchases"], stats["deletions"]) == (1, 1, 1, 1)
    assert admin.post("/faults", json={"rate_5xx_before": 1.0}).status_code == 200
    assert client.post("/users/track", json={"events": [event()]}).status_code in (502, 503)
    assert admin.post("/faults", json={"rate_429": 3}).status_code == 400
    assert admin.post("/faults", json={"no_such_field": 1}).status_code == 400
    assert admin.post("/faults", json={}).status_code == 200
    response = admin.post("/rate_limit", json={"limit": 1, "window_s": 30})
    assert response.json() == {"limit": 1, "window_s": 30.0}
    client.post("/users/track", json={"events": [event()]})
    assert client.post("/users/track", json={"events": [event()]}).status_code == 429
    assert admin.get("/stats").status_code == 200  # never rate limited
    assert admin.post("/rate_limit", json={"limit": "many"}).status_code == 400
    assert admin.post("/reset").status_code == 200
    assert admin.get("/stats").json()["requests"] == 0 and admin.get("/events").json() == []
    assert client.post("/users/track", json={"events": [event()]}).status_code == 201  # fresh window


def test_unknown_paths_are_404(client):
    assert client.get("/users/export/segment").json() == {"message": "Not Found"}
    assert client.get("/users/track").status_code == 405
    assert client.get("/users/export/ids").status_code == 405


def test_lean_mode_counts_without_storing():
    with BrazeEmulator(EmulatorConfig(api_key=KEY, lean=True)) as lean:
        body = {
            "attributes": [{"external_id": "u1"}, {"nope": 1}],
            "events": [event("u2")],
            "purchases": [purchase()],
        }
        response = httpx.post(f"{lean.base_url}/users/track", json=body, headers=AUTH)
        assert response.json()["errors"] == [
            {"type": MSG_IDENTIFIER_REQUIRED, "input_array": "attributes", "index": 1}
        ]
        stats = lean.store.stats()
        counted = [stats[name] for name in ("profiles", "events", "purchases", "track_objects_accepted")]
        assert counted == [2, 1, 1, 3]
        assert lean.store.profiles() == [] and lean.store.events() == []


def test_state_file_keeps_the_store_across_restarts(tmp_path):
    config = EmulatorConfig(api_key=KEY, state_file=str(tmp_path / "store.json"))
    body = {"attributes": [{"external_id": "u1", "email": "a@example.com"}], "events": [event()]}
    with BrazeEmulator(config) as first:
        assert httpx.post(f"{first.base_url}/users/track", json=body, headers=AUTH).status_code == 201
        saved = (first.store.profiles(), first.store.events(), first.store.stats())
    with BrazeEmulator(config) as second:
        assert (second.store.profiles(), second.store.events(), second.store.stats()) == saved
        update = {"attributes": [{"email": "A@example.com", "plan": "pro"}, {"external_id": "u2"}]}
        httpx.post(f"{second.base_url}/users/track", json=update, headers=AUTH)  # the email index was rebuilt
        profiles = {p["external_id"]: p for p in second.store.profiles()}
        assert profiles["u1"]["attributes"]["plan"] == "pro"
        assert profiles["u2"]["braze_id"] != profiles["u1"]["braze_id"]  # ids continue after a reload


# --- command line ---------------------------------------------------------------------------------------
def test_cli_serves_until_sigterm_and_never_prints_the_key():
    secret = "cli-secret-key-123"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BRAZE_API_KEY": secret, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "braze_assets.braze.emulator", "--port", "0", "--rate-limit", "100"]
    process = subprocess.Popen(
        command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("Braze emulator listening on http://127.0.0.1:"), line
        base_url = line.rsplit(" ", 1)[1]
        assert httpx.get(f"{base_url}/_emulator/health").json() == {"status": "ok"}
        headers = {"Authorization": f"Bearer {secret}"}
        response = httpx.post(f"{base_url}/users/track", json={"events": [event()]}, headers=headers)
        assert response.status_code == 201 and response.headers["X-RateLimit-Limit"] == "100"
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert secret not in line + out + err


def test_the_emulator_thread_leaves_ctrl_c_to_the_main_thread(braze):
    """A process running the emulator in a thread (`braze-assets ui`, `run`) must see Ctrl-C in
    its main thread: a process-wide SIGINT the kernel handed to the emulator's thread instead
    sets Python's flag but never wakes a main thread blocked in a system call."""
    thread = braze._thread
    assert thread is not None and thread.native_id is not None
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    [blocked] = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigBlk:")]
    for stop in (signal.SIGINT, signal.SIGTERM):
        assert blocked & (1 << (stop - 1)), f"{stop.name} is not blocked in the emulator's thread"
