"""One Braze budget per workspace, shared by processes: the store's rule, both stores (a locked
file and PostgreSQL), and real sender processes against the emulator enforcing 300 requests per
3 seconds, which together must stay within the shared limit in every window."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from braze_assets.braze.budget import (
    BudgetState,
    LeaseRequest,
    SharedBudget,
    allowed_per_window,
    grant,
    pause,
    workspace_id,
)
from braze_assets.braze.budget_stores import (
    BudgetStoreError,
    FileBudgetStore,
    PostgresBudgetStore,
    budget_store_from_environment,
)
from braze_assets.braze.client import BrazeClient
from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
from braze_assets.resources import BrazeResource
from braze_assets.state import STATE_URL_ENV
from braze_assets.state.postgres_schema import masked_url

ROOT = Path(__file__).resolve().parents[1]
KEY = "budget-test-key-4b1d"
LIMIT, WINDOW_S = 300, 3.0
TRACK = "/users/track"


def lease(want: int, share: float = 1.0, limit: int | None = LIMIT, **extra) -> LeaseRequest:
    return LeaseRequest(want=want, share=share, limit=limit, window_s=WINDOW_S, **extra)


# ------------------------------------------------------------------------------- the store's rule
def test_grants_never_exceed_the_share_within_a_window_and_lease():
    state, now = BudgetState(), 1000.0
    first = grant(state, lease(200, share=0.5), now)
    assert first.tokens == allowed_per_window(LIMIT, 0.5) == 150
    refused = grant(state, lease(20, share=0.5), now + 1.0)
    assert refused.tokens == 0
    # free again once the grant has left the window plus the lease and the guard
    assert WINDOW_S < refused.wait_s + 1.0 <= WINDOW_S + 0.2
    again = grant(state, lease(20, share=0.5), now + 1.0 + refused.wait_s + 1e-6)
    assert again.tokens == 20


def test_unused_tokens_come_back_and_a_pause_stops_everyone():
    state, now = BudgetState(), 1000.0
    first = grant(state, lease(300), now)
    assert grant(state, lease(10), now).tokens == 0
    back = grant(state, lease(10, returned=(first.grant_id, 100)), now + 0.1)
    assert back.tokens == 10  # 100 came back unused
    pause(state, 2.0, now + 0.2)
    paused = grant(state, lease(1), now + 0.3)
    assert paused.tokens == 0 and paused.wait_s == pytest.approx(1.9)


def test_before_any_limit_is_known_requests_go_and_are_counted_later():
    state = BudgetState()
    unknown = grant(state, lease(1, limit=None), 1000.0)
    assert unknown.tokens == 1 and not unknown.metered
    after = grant(state, lease(299, sent_unmetered=1), 1000.1)
    assert after.tokens == 299  # the unmetered request counts against the window
    assert grant(state, lease(1, limit=None), 1000.2).tokens == 0  # now the store knows the limit


def test_share_is_a_floor_of_the_announced_limit():
    assert allowed_per_window(100, 0.29) == 29
    assert allowed_per_window(3000, 0.8) == 2400
    assert allowed_per_window(1, 0.1) == 1


def test_max_rate_share_is_validated_naming_the_field():
    for bad in (0, -0.5, 1.01, float("nan")):
        with pytest.raises(Exception, match="max_rate_share must be above 0 and at most 1"):
            BrazeResource(rest_endpoint="http://127.0.0.1:4545", api_key=KEY, max_rate_share=bad)
    assert BrazeResource(rest_endpoint="http://127.0.0.1:4545", api_key=KEY).max_rate_share == 0.8
    with pytest.raises(ValueError, match="max_rate_share"):
        BrazeClient("http://127.0.0.1:4545", KEY, max_rate_share=1.5)


@pytest.mark.parametrize("value", ["abc", "0", "-0.5", "1.5", "nan", "inf"])
def test_a_bad_max_rate_share_in_the_environment_names_the_variable(monkeypatch, value):
    from braze_assets.config import ConfigError
    from braze_assets.resources import rate_share_from_environment

    monkeypatch.setenv("BRAZE_MAX_RATE_SHARE", value)
    with pytest.raises(ConfigError) as caught:
        rate_share_from_environment()
    assert str(caught.value) == (
        "BRAZE_MAX_RATE_SHARE must be a number above 0 and at most 1 (the share of Braze's rate "
        f"limit the syncs may use), got {value!r}"
    )


def test_max_rate_share_from_the_environment(monkeypatch):
    from braze_assets.resources import rate_share_from_environment

    monkeypatch.delenv("BRAZE_MAX_RATE_SHARE", raising=False)
    assert rate_share_from_environment() == {}
    monkeypatch.setenv("BRAZE_MAX_RATE_SHARE", " 1 ")
    assert rate_share_from_environment() == {"max_rate_share": 1.0}
    monkeypatch.setenv("BRAZE_MAX_RATE_SHARE", "0.5")
    assert BrazeResource(rest_endpoint="http://127.0.0.1:4545", api_key=KEY, **rate_share_from_environment())


# ------------------------------------------------------------------------------------ the stores
def test_the_key_never_reaches_the_store_or_its_messages(tmp_path, monkeypatch):
    workspace = workspace_id("http://127.0.0.1:4545/", KEY)
    assert KEY not in workspace and workspace.startswith("http://127.0.0.1:4545#key-")
    assert workspace != workspace_id("http://127.0.0.1:4545", KEY + "x")
    assert "pw" not in workspace_id("https://user:pw@rest.iad-01.braze.com", KEY)
    store = FileBudgetStore(tmp_path)
    store.exchange(workspace, TRACK, lambda state, now: grant(state, lease(5), now))
    (budget_file,) = tmp_path.iterdir()
    assert KEY not in budget_file.name and KEY not in budget_file.read_text()
    assert json.loads(budget_file.read_text())["grants"][0][1] == 5

    url = "postgresql://braze:s3cret-pw@127.0.0.1:1/db?password=s3cret-pw&sslmode=disable"
    assert "s3cret" not in masked_url(url) and "braze@127.0.0.1:1" in masked_url(url)
    with pytest.raises(BudgetStoreError) as refused:
        PostgresBudgetStore(url).exchange(workspace, TRACK, lambda state, now: None)
    assert "s3cret" not in str(refused.value) and "PostgreSQL" in str(refused.value)
    monkeypatch.setenv(STATE_URL_ENV, "mysql://u:s3cret-pw@host/db")
    with pytest.raises(BudgetStoreError, match=STATE_URL_ENV) as wrong:
        budget_store_from_environment(tmp_path / "state")
    assert "s3cret" not in str(wrong.value)


def test_a_429_pauses_the_other_processes_through_the_store(tmp_path):
    """Two stores on one directory stand for two processes: a 429 met by one holds the other."""
    workspace = workspace_id("http://127.0.0.1:4545", KEY)
    one = SharedBudget(FileBudgetStore(tmp_path), workspace, TRACK, 1.0)
    other = SharedBudget(FileBudgetStore(tmp_path), workspace, TRACK, 1.0)

    async def scenario() -> float:
        await one.take(LIMIT, WINDOW_S)
        await one.pause(1.0)
        started = time.monotonic()
        await other.take(LIMIT, WINDOW_S)
        return time.monotonic() - started

    assert 0.9 <= asyncio.run(scenario()) <= 1.5


def test_a_429_answered_to_one_client_reaches_the_store(tmp_path):
    faults = FaultConfig(rate_429=1.0, retry_after_s=2)
    config = EmulatorConfig(api_key=KEY, rate_limit=LIMIT, rate_window_s=WINDOW_S, faults=faults)
    with BrazeEmulator(config) as emu:

        async def refused() -> str:
            client = BrazeClient(emu.base_url, KEY, max_attempts=1, budget_store=FileBudgetStore(tmp_path))
            async with client:
                outcome = await client.post(TRACK, b'{"attributes": []}', retry_ambiguous=True)
            return outcome.kind

        assert asyncio.run(refused()) == "refused"
        state = FileBudgetStore(tmp_path).exchange(
            workspace_id(emu.base_url, KEY), TRACK, lambda state, now: (state, now)
        )
    paused_for = state[0].paused_until - state[1]
    assert 1.0 < paused_for <= 2.0  # Retry-After: every process sharing the budget waits it out


def test_without_an_announced_limit_nothing_is_paced(tmp_path):
    with BrazeEmulator(EmulatorConfig(api_key=KEY)) as emu:  # no rate limit: no X-RateLimit-*

        async def send() -> BrazeClient:
            client = BrazeClient(emu.base_url, KEY, budget_store=FileBudgetStore(tmp_path))
            body = b'{"attributes": [{"external_id": "u", "n": 1}]}'
            async with client:
                outcomes = await asyncio.gather(
                    *(client.post(TRACK, body, retry_ambiguous=True) for _ in range(50))
                )
            assert {o.kind for o in outcomes} == {"answered"}
            return client

        client = asyncio.run(send())
    shared = client.shared_budget(TRACK)
    assert shared is not None and shared.leases <= 1 and shared.waited_s == 0  # the first answer told


# ------------------------------------------------------------- several processes, one workspace
def run_senders(emulator: BrazeEmulator, env: dict, share: float, requests: int, procs: int = 3) -> dict:
    """`procs` sender processes, started together; every attempt's departure and status."""
    start_at = time.time() + 2.5
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "braze_assets_tests.budget_sender",
                json.dumps(
                    {
                        "home": env["BRAZE_ASSETS_HOME"],
                        "base_url": emulator.base_url,
                        "api_key": KEY,
                        "share": share,
                        "requests": requests,
                        "in_flight": 16,
                        "start_at": start_at,
                        "name": f"sender{n}",
                    }
                ),
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(procs)
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    attempts = sorted((at, status) for result in results for at, status in result["attempts"])
    admitted = [at for at, status in attempts if status != 429]
    busiest = max(
        sum(1 for other in admitted if at <= other < at + WINDOW_S) for at in admitted
    )  # the most our processes sent together in any stretch of one window
    whole = int((attempts[-1][0] - attempts[0][0]) // WINDOW_S)
    used = sum(1 for at in admitted if at < admitted[0] + whole * WINDOW_S)
    return {
        "answered": sum(result["answered"] for result in results),
        "attempts": len(attempts),
        "r429": len(attempts) - len(admitted),
        "busiest_window": busiest,
        "whole_windows": whole,
        "share_used": used / (whole * LIMIT) if whole else 0.0,
        "leases": sum(result["leases"] for result in results),
        "looks": sum(result["looks"] for result in results),
        "seconds": attempts[-1][0] - attempts[0][0],
        "processes": procs,
    }


def check(result: dict, share: float, requests: int) -> None:
    allowed = allowed_per_window(LIMIT, share)
    assert result["answered"] == requests, result
    assert result["busiest_window"] <= allowed, result
    assert result["r429"] <= 0.01 * result["attempts"], result
    assert result["whole_windows"] >= 1
    # the processes together use most of their share (the store gives up ~3% of each window)
    assert share * 0.8 <= result["share_used"] <= share + 0.01, result
    assert result["leases"] < result["attempts"] / 3, result  # tokens are granted in blocks
    # while the budget is used up a process looks again about every MAX_WAIT_S (sooner when the
    # store says capacity frees up sooner): a handful of store exchanges per process and second,
    # bounded by time, not by the requests sent
    per_process_second = result["looks"] / (result["processes"] * max(result["seconds"], WINDOW_S))
    assert per_process_second <= 3 / SharedBudget.MAX_WAIT_S, result


@pytest.fixture
def limited_emulator():
    with BrazeEmulator(EmulatorConfig(api_key=KEY, rate_limit=LIMIT, rate_window_s=WINDOW_S)) as emu:
        yield emu


@pytest.mark.parametrize("share, per_process", [(1.0, 250), (0.5, 120)])
def test_processes_share_one_file_budget(tmp_path, limited_emulator, share, per_process):
    env = {"BRAZE_ASSETS_HOME": str(tmp_path), STATE_URL_ENV: ""}
    result = run_senders(limited_emulator, env, share, per_process)
    check(result, share, 3 * per_process)
    assert list((tmp_path / "state" / "budgets").glob("*_users_track.json"))


@pytest.mark.parametrize("share, per_process", [(1.0, 250), (0.5, 120)])
def test_processes_share_one_postgres_budget(tmp_path, limited_emulator, postgres, share, per_process):
    url = f"postgresql://{postgres['user']}@{postgres['host']}:{postgres['port']}/{postgres['database']}"
    env = {"BRAZE_ASSETS_HOME": str(tmp_path), STATE_URL_ENV: url}
    result = run_senders(limited_emulator, env, share, per_process)
    check(result, share, 3 * per_process)
    assert not (tmp_path / "state" / "budgets").exists()  # the budget lived in PostgreSQL
    import psycopg2

    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT workspace, endpoint, rate_limit FROM braze_assets.rate_budget")
        rows = cursor.fetchall()
    assert (workspace_id(limited_emulator.base_url, KEY), TRACK, LIMIT) in rows
    assert not any(KEY in str(row) for row in rows)
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("DELETE FROM braze_assets.rate_budget")  # an operator starts over
    store = PostgresBudgetStore(url)
    workspace = workspace_id(limited_emulator.base_url, KEY)
    assert store.exchange(workspace, TRACK, lambda state, now: grant(state, lease(5), now)).tokens == 5
    store.close()


def test_the_share_leaves_headroom_for_the_customers_own_calls(tmp_path, limited_emulator):
    """The customer's backend spends a third of the limit, evenly, while three processes sync at
    a 0.6 share: between them the window is never overspent, so neither side sees 429s."""
    statuses: list[int] = []
    stop = threading.Event()

    def customers_backend() -> None:
        body = b'{"attributes": [{"external_id": "customer", "n": 1}]}'
        while not stop.is_set():
            request = urllib.request.Request(
                f"{limited_emulator.base_url}{TRACK}",
                data=body,
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as answer:
                    statuses.append(answer.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
            time.sleep(WINDOW_S / (LIMIT / 3))

    backend = threading.Thread(target=customers_backend, daemon=True)
    backend.start()
    try:
        result = run_senders(
            limited_emulator, {"BRAZE_ASSETS_HOME": str(tmp_path), STATE_URL_ENV: ""}, 0.6, 150
        )
    finally:
        stop.set()
        backend.join()
    assert result["answered"] == 450
    assert result["busiest_window"] <= allowed_per_window(LIMIT, 0.6)
    assert result["r429"] <= 0.01 * result["attempts"], result
    assert statuses.count(429) <= 0.01 * len(statuses), statuses.count(429)
