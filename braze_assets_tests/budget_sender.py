"""One sender process of the shared-budget tests: `python -m braze_assets_tests.budget_sender '<json>'`.

Posts `requests` small `/users/track` bodies through `BrazeClient` with the shared budget picked
from the environment (`BRAZE_ASSETS_HOME`, `BRAZE_ASSETS_STATE_URL`), `in_flight` at a time, from
`start_at` (epoch seconds, so the processes begin together), and prints one JSON line: when each
attempt left this process and Braze's status for it, and the budget's own counters.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from braze_assets.braze.budget_stores import budget_store_from_environment
from braze_assets.braze.client import BrazeClient


class RecordingClient(BrazeClient):
    """The real client; each attempt's departure time and status are written down."""

    attempts: list[tuple[float, int]]

    async def _send(self, path: str, body: bytes, method: str = "POST") -> tuple[int, httpx.Headers, bytes]:
        sent_at = time.time()
        status, headers, content = await super()._send(path, body, method)
        self.attempts.append((sent_at, status))
        return status, headers, content


async def send_all(params: dict[str, Any]) -> dict[str, Any]:
    store = budget_store_from_environment(Path(params["home"]) / "state")
    client = RecordingClient(
        params["base_url"],
        params["api_key"],
        max_connections=params["in_flight"],
        backoff_initial_s=0.05,
        backoff_max_s=1.0,
        budget_store=store,
        max_rate_share=params["share"],
    )
    client.attempts = []
    window = asyncio.Semaphore(params["in_flight"])
    name = params["name"]

    async def one(n: int) -> str:
        body = json.dumps({"attributes": [{"external_id": f"{name}-{n}", "n": n}]}).encode()
        async with window:
            outcome = await client.post("/users/track", body, retry_ambiguous=True)
        return outcome.kind

    await asyncio.sleep(max(0.0, params["start_at"] - time.time()))
    async with client:
        kinds = await asyncio.gather(*(one(n) for n in range(params["requests"])))
    shared = client.shared_budget("/users/track")
    assert shared is not None
    return {
        "attempts": client.attempts,
        "answered": kinds.count("answered"),
        "leases": shared.leases,
        "looks": shared.looks,
        "store_s": shared.store_s,
    }


def main() -> None:
    print(json.dumps(asyncio.run(send_all(json.loads(sys.argv[1])))), flush=True)


if __name__ == "__main__":
    main()
