"""The emulator's `POST /users/export/ids`, over real HTTP on loopback, as Braze documents it."""

from __future__ import annotations

import time

import httpx
import pytest

from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig
from braze_assets.braze.emulator_validation import MSG_MAX_IDS
from braze_assets_tests.conftest import API_KEY

KEY = API_KEY  # the key `server` (conftest) accepts
AUTH = {"Authorization": f"Bearer {KEY}"}
ALIAS = {"alias_name": "anon-1", "alias_label": "crm"}


@pytest.fixture
def client(braze):
    with httpx.Client(base_url=braze.base_url, headers=AUTH, timeout=5) as http:
        yield http


def track(client, **arrays):
    response = client.post("/users/track", json=arrays)
    assert response.status_code == 201, response.text


def export(client, **body):
    response = client.post("/users/export/ids", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def _seed(client):
    track(
        client,
        attributes=[
            {"external_id": "u1", "first_name": "Ana", "plan": "pro", "email": "ana@example.com"},
            {"user_alias": ALIAS, "_update_existing_only": False, "tier": 2},
        ],
        events=[
            {"external_id": "u1", "name": "login", "time": "2024-05-01T12:00:00Z"},
            {"external_id": "u1", "name": "login", "time": "2024-04-30T08:00:00.250+02:00"},
            {"external_id": "u1", "name": "login", "time": "2024-05-02"},
            {"external_id": "u1", "name": "logout", "time": "2024-05-01T13:00:00:500-0100"},
            {"user_alias": ALIAS, "name": "visit", "time": "2024-05-01T09:00:00Z"},
        ],
        purchases=[
            {
                "external_id": "u1",
                "product_id": "sku-1",
                "currency": "USD",
                "price": 5,
                "quantity": 3,
                "time": "2024-05-01T10:00:00Z",
            },
            {
                "external_id": "u1",
                "product_id": "sku-1",
                "currency": "USD",
                "price": 5,
                "time": "2024-05-03T10:00:00Z",
            },
        ],
    )


def test_wrong_key_is_401(braze):
    response = httpx.post(
        f"{braze.base_url}/users/export/ids",
        json={"external_ids": ["u1"]},
        headers={"Authorization": "Bearer nope"},
    )
    assert response.status_code == 401 and response.json() == {"message": "Invalid API Key"}


def test_events_and_purchases_aggregate_first_last_and_count(client):
    _seed(client)
    answer = export(
        client, external_ids=["u1", "ghost"], fields_to_export=["external_id", "custom_events", "purchases"]
    )
    assert answer["message"] == "success" and answer["invalid_user_ids"] == ["ghost"]
    [user] = answer["users"]
    assert user == {
        "external_id": "u1",
        "custom_events": [
            # times in any accepted form, compared in UTC: 06:00:00.250Z is the first login
            {
                "name": "login",
                "first": "2024-04-30T06:00:00.250Z",
                "last": "2024-05-02T00:00:00.000Z",
                "count": 3,
            },
            {
                "name": "logout",
                "first": "2024-05-01T14:00:00.500Z",
                "last": "2024-05-01T14:00:00.500Z",
                "count": 1,
            },
        ],
        # a purchase with quantity 3 is one stored purchase
        "purchases": [
            {
                "name": "sku-1",
                "first": "2024-05-01T10:00:00.000Z",
                "last": "2024-05-03T10:00:00.000Z",
                "count": 2,
            }
        ],
    }


def test_fields_to_export_chooses_the_fields_and_absent_means_all(client, braze):
    _seed(client)
    fields = ["first_name", "custom_attributes"]
    [user] = export(client, external_ids=["u1"], fields_to_export=fields)["users"]
    assert user == {"first_name": "Ana", "custom_attributes": {"plan": "pro"}}
    [everything] = export(client, external_ids=["u1"])["users"]
    assert everything["braze_id"] == next(
        p["braze_id"] for p in braze.store.profiles() if p.get("external_id") == "u1"
    )
    assert {"external_id", "email", "first_name", "custom_attributes", "custom_events", "purchases"} <= set(
        everything
    )
    assert "user_aliases" not in everything, "a field the user has nothing for is left out"


def test_aliases_braze_id_email_and_phone_find_their_users(client, braze):
    _seed(client)
    track(client, attributes=[{"email": "ana@example.com", "phone": "+14155550100"}])  # updates u1
    track(client, attributes=[{"phone": "+1 415 555 0199"}])  # a phone-only profile
    fields = ["user_aliases", "custom_events"]
    [aliased] = export(client, user_aliases=[ALIAS], fields_to_export=fields)["users"]
    visit = "2024-05-01T09:00:00.000Z"
    assert aliased == {
        "user_aliases": [ALIAS],
        "custom_events": [{"name": "visit", "first": visit, "last": visit, "count": 1}],
    }
    braze_id = next(p["braze_id"] for p in braze.store.profiles() if p.get("external_id") == "u1")
    by_id = export(client, braze_id=braze_id, fields_to_export=["external_id"])
    assert by_id["users"] == [{"external_id": "u1"}]
    by_email = export(client, email_address="ANA@example.com", fields_to_export=["external_id", "phone"])
    assert by_email["users"] == [{"external_id": "u1", "phone": "+14155550100"}]
    by_phone = export(client, phone="+14155550199", fields_to_export=["phone"])
    assert by_phone["users"] == [{"phone": "+1 415 555 0199"}]
    assert export(client, email_address="nobody@example.com")["users"] == []


def test_a_deleted_user_is_no_longer_exported(client):
    _seed(client)
    assert client.post("/users/delete", json={"external_ids": ["u1"]}).status_code == 201
    answer = export(client, external_ids=["u1"], fields_to_export=["custom_events"])
    assert answer == {"users": [], "invalid_user_ids": ["u1"], "message": "success"}
    track(client, events=[{"external_id": "u1", "name": "login", "time": "2024-06-01T00:00:00Z"}])
    [again] = export(client, external_ids=["u1"], fields_to_export=["custom_events"])["users"]
    assert again["custom_events"][0]["count"] == 1, "a new profile starts from nothing"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"external_ids": [f"u{i}" for i in range(51)]}, MSG_MAX_IDS),
        ({"external_ids": [f"u{i}" for i in range(30)], "user_aliases": [ALIAS] * 21}, MSG_MAX_IDS),
        ({"external_ids": ["u1"], "email_address": "a@example.com"}, "only identifier"),
        ({"email_address": "a@example.com", "phone": "+14155550100"}, "only identifier"),
        ({"fields_to_export": ["custom_events"]}, "Provide"),
        ({"external_ids": "u1"}, "external_ids"),
        ({"external_ids": [""]}, "external_ids"),
        ({"user_aliases": [{"alias_name": "a"}]}, "user_alias"),
        ({"braze_id": 7}, "braze_id"),
        ({"external_ids": ["u1"], "fields_to_export": "custom_events"}, "fields_to_export"),
        ({"external_ids": ["u1"], "fields_to_export": ["custom_event"]}, "unknown fields: custom_event"),
    ],
)
def test_request_rules(client, body, fragment):
    response = client.post("/users/export/ids", json=body)
    assert response.status_code == 400
    assert fragment in response.json()["message"]


def test_fifty_ids_are_accepted(client):
    answer = export(client, external_ids=[f"u{i}" for i in range(25)], user_aliases=[ALIAS] * 25)
    assert answer["users"] == [] and len(answer["invalid_user_ids"]) == 50


def test_export_has_its_own_rate_limit_window(client, braze):
    braze.set_rate_limit(100, window_s=60)
    braze.set_export_rate_limit(2, window_s=1.0)
    for remaining in ("1", "0"):
        response = client.post("/users/export/ids", json={"external_ids": ["u1"]})
        assert response.status_code == 201
        assert response.headers["X-RateLimit-Limit"] == "2"
        assert response.headers["X-RateLimit-Remaining"] == remaining
    refused = client.post("/users/export/ids", json={"external_ids": ["u1"]})
    assert refused.status_code == 429 and refused.headers["X-Ratelimit-Retry-After"] == "1"
    tracked = client.post("/users/track", json={"attributes": [{"external_id": "u1"}]})
    assert tracked.status_code == 201 and tracked.headers["X-RateLimit-Remaining"] == "99"
    time.sleep(1.05)
    assert client.post("/users/export/ids", json={"external_ids": ["u1"]}).status_code == 201


def test_state_file_keeps_what_export_reports(tmp_path):
    config = EmulatorConfig(api_key=KEY, state_file=str(tmp_path / "store.json"))
    with BrazeEmulator(config) as first, httpx.Client(base_url=first.base_url, headers=AUTH) as http:
        _seed(http)
        before = export(http, external_ids=["u1"], fields_to_export=["custom_events", "purchases"])
    with BrazeEmulator(config) as second, httpx.Client(base_url=second.base_url, headers=AUTH) as http:
        assert export(http, external_ids=["u1"], fields_to_export=["custom_events", "purchases"]) == before


def test_cli_flags_set_the_export_rate_limit():
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BRAZE_API_KEY": KEY, "PYTHONPATH": str(root)}
    command = [
        sys.executable,
        "-m",
        "braze_assets.braze.emulator",
        "--port",
        "0",
        "--export-rate-limit",
        "250",
        "--export-rate-window",
        "60",
    ]
    process = subprocess.Popen(command, env=env, cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        base_url = process.stdout.readline().strip().rsplit(" ", 1)[1]
        response = httpx.post(f"{base_url}/users/export/ids", json={"external_ids": ["u1"]}, headers=AUTH)
        assert response.status_code == 201 and response.headers["X-RateLimit-Limit"] == "250"
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
