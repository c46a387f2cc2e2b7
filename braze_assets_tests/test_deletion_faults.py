"""Faults on every endpoint, and a deletions sync under them (the cases `/users/track` has).

Deletions default to the `resend` policy (deleting twice is harmless): whatever the fault, every
deletion must reach the emulator at least once and the ledger end with every row accepted.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

import httpx
import pytest

from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
from braze_assets_tests.conftest import API_KEY, Harness, cdi_row, sync_config

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
T = "2024-05-01T12:00:00Z"
N_DELETES = 230  # 5 external_id requests of up to 50, one alias request


# --- the emulator: every fault kind on every endpoint -----------------------------------------
def _seed_profile(braze: BrazeEmulator) -> None:
    body = {
        "attributes": [{"external_id": "u1", "plan": "pro"}],
        "events": [{"external_id": "u1", "name": "login", "time": T}],
    }
    assert httpx.post(f"{braze.base_url}/users/track", json=body, headers=AUTH).status_code == 201


ENDPOINTS = {
    "/users/track": {"events": [{"external_id": "u1", "name": "login", "time": T}]},
    "/users/delete": {"external_ids": ["u1"]},
    "/users/export/ids": {"external_ids": ["u1"], "fields_to_export": ["custom_events"]},
}


def _effect(braze: BrazeEmulator, path: str):
    """What processing the request of ENDPOINTS[path] changed in the store."""
    if path == "/users/track":
        return len(braze.store.events())
    if path == "/users/delete":
        return [d["id"] for d in braze.store.deletions()]
    return None  # a read: nothing stored either way


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize("rate", ["rate_429", "rate_5xx_before", "rate_drop_before"])
def test_before_faults_process_nothing_on_every_endpoint(braze, path, rate):
    _seed_profile(braze)
    braze.set_faults(FaultConfig(retry_after_s=7, **{rate: 1.0}))
    try:
        response = httpx.post(f"{braze.base_url}{path}", json=ENDPOINTS[path], headers=AUTH)
    except httpx.TransportError:
        assert rate == "rate_drop_before"
    else:
        assert response.status_code in {"rate_429": {429}, "rate_5xx_before": {502, 503}}[rate]
    assert _effect(braze, path) in (1, [], None), "nothing processed"
    assert [p["external_id"] for p in braze.store.profiles()] == ["u1"]


@pytest.mark.parametrize("path", list(ENDPOINTS))
@pytest.mark.parametrize("rate", ["rate_5xx_after", "rate_drop_after", "rate_timeout_after"])
def test_after_faults_process_then_lose_the_answer_on_every_endpoint(braze, path, rate):
    _seed_profile(braze)
    braze.set_faults(FaultConfig(timeout_s=2, **{rate: 1.0}))
    try:
        response = httpx.post(f"{braze.base_url}{path}", json=ENDPOINTS[path], headers=AUTH, timeout=0.5)
    except httpx.ReadTimeout:
        assert rate == "rate_timeout_after"
        assert braze.store.stats()["by_status"].get("timeout") == 1
    except (httpx.RemoteProtocolError, httpx.ReadError):
        assert rate == "rate_drop_after"
        assert braze.store.stats()["by_status"].get("dropped") == 1
    else:
        assert rate == "rate_5xx_after" and response.status_code in (500, 504)
    expected = {"/users/track": 2, "/users/delete": ["u1"], "/users/export/ids": None}[path]
    assert _effect(braze, path) == expected, "processed before the answer was lost"
    if path == "/users/delete":
        assert braze.store.profiles() == []


# --- a deletions sync under faults --------------------------------------------------------------
def _delete_rows() -> list[dict]:
    ts = (NOW - dt.timedelta(hours=1)).replace(tzinfo=None)
    rows = [cdi_row(ts - dt.timedelta(seconds=i), external_id=f"del-{i:04d}") for i in range(N_DELETES - 20)]
    rows += [cdi_row(ts, alias_name=f"anon-{i}", alias_label="web") for i in range(20)]
    return rows


def _profiles_to_delete(emulator: BrazeEmulator) -> None:
    """Every user the deletions name exists first (created straight through the API)."""
    attributes = [{"external_id": f"del-{i:04d}", "plan": "pro"} for i in range(N_DELETES - 20)]
    attributes += [
        {"user_alias": {"alias_name": f"anon-{i}", "alias_label": "web"}, "_update_existing_only": False}
        for i in range(20)
    ]
    attributes.append({"external_id": "keeper", "plan": "free"})
    with httpx.Client(base_url=emulator.base_url, headers=AUTH) as http:
        for start in range(0, len(attributes), 75):
            chunk = attributes[start : start + 75]
            assert http.post("/users/track", json={"attributes": chunk}).status_code == 201


def _deletions_harness(tmp_path, emulator, **overrides) -> Harness:
    harness = Harness(tmp_path, emulator, braze_overrides=overrides)
    harness.table("deletes", _delete_rows(), payload=False)
    harness.syncs = [sync_config("deletes", "deletions", "main.deletes", max_in_flight=4)]
    return harness


def _deleted_ids(emulator: BrazeEmulator) -> Counter:
    return Counter(
        d["id"] if d["type"] != "user_alias" else d["id"]["alias_name"] for d in emulator.store.deletions()
    )


EXPECTED_IDS = {f"del-{i:04d}" for i in range(N_DELETES - 20)} | {f"anon-{i}" for i in range(20)}


def _run_until_settled(harness: Harness, runs: int = 4):
    run = harness.run("deletes")
    for _ in range(runs):
        if run.outcome is not None and not run.outcome.not_sent:
            break
        run = harness.run("deletes")
    return run


def test_deletions_with_twenty_percent_transient_faults_end_in_the_clean_state(tmp_path):
    faults = FaultConfig(
        rate_429=0.04,
        rate_5xx_before=0.04,
        rate_drop_before=0.02,
        rate_5xx_after=0.04,
        rate_drop_after=0.03,
        rate_timeout_after=0.03,
        timeout_s=2.0,
        retry_after_s=0,
        seed=3,
    )
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emu:
        _profiles_to_delete(emu)
        emu.set_faults(faults)
        harness = _deletions_harness(tmp_path, emu, timeout_s=0.5)
        run = _run_until_settled(harness)
        assert run.result.success
        stats = emu.store.stats()["by_status"]
        assert sum(v for k, v in stats.items() if k != "201") > 0, "faults were injected"
        assert set(_deleted_ids(emu)) == EXPECTED_IDS, "every deletion reached Braze"
        assert [p.get("external_id") for p in emu.store.profiles()] == ["keeper"]
        assert harness.ledger("deletes") == {"accepted": N_DELETES}
        assert harness.watermark("deletes") is not None


@pytest.mark.parametrize(
    "rate",
    [
        "rate_429",
        "rate_5xx_before",
        "rate_drop_before",
        "rate_5xx_after",
        "rate_drop_after",
        "rate_timeout_after",
    ],
)
def test_every_fault_kind_on_deletions_loses_nothing(tmp_path, rate):
    """Every request of the first run meets the fault (retries too); the resend policy then
    sends each deletion again, so each reaches Braze, at least once, and nothing is held."""
    faults = FaultConfig(timeout_s=1.0, retry_after_s=0, **{rate: 1.0})
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emu:
        _profiles_to_delete(emu)
        emu.set_faults(faults)
        harness = _deletions_harness(tmp_path, emu, timeout_s=0.3, max_attempts=2)
        harness.run("deletes")  # nothing reached Braze for sure: the run may report an error
        processed = rate.endswith("_after")
        assert bool(emu.store.deletions()) == processed
        assert harness.ledger("deletes") == {}, "unknown or refused: nothing settled, nor held"
        assert harness.watermark("deletes") is None, "the watermark waits for unsent rows"

        emu.set_faults(FaultConfig())
        second = harness.run("deletes")
        assert second.result.success and second.outcome.accepted == N_DELETES
        deleted = _deleted_ids(emu)
        assert set(deleted) == EXPECTED_IDS, "nothing lost"
        assert min(deleted.values()) >= 1
        if not processed:
            assert max(deleted.values()) == 1, "refused before processing: sent once"
        assert [p.get("external_id") for p in emu.store.profiles()] == ["keeper"]
        assert harness.ledger("deletes") == {"accepted": N_DELETES}
        assert harness.run("deletes").outcome.requests == 0, "settled: never sent again"
