"""The senders braze_assets is compared with, each run inside a benchmark child process.

* `raw_ceiling`: a minimal aiohttp sender, pre-built 75-object bodies, 64 connections: how fast
  the emulator itself can go on this machine (nothing a real sync could beat).
* `naive_requests`: the loop a user writes from Braze's docs: `requests.post`, 75 objects per
  request, one request at a time.
* `braze_client`: the same loop through the `braze-client` library from PyPI.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter

import duckdb
import orjson

BATCH = 75


def _attribute_objects(db: str, table: str, limit: int | None):
    """(external_id, payload) rows in table order, as a user's loop would read them."""
    con = duckdb.connect(db, read_only=True)
    sql = f"SELECT EXTERNAL_ID, PAYLOAD FROM {table}" + (f" LIMIT {int(limit)}" if limit else "")
    return con, con.execute(sql)


def raw_ceiling(
    db: str,
    table: str,
    base_url: str,
    api_key: str,
    rows: int,
    connections: int = 64,
    distinct_bodies: int = 256,
) -> dict:
    import aiohttp

    con, cursor = _attribute_objects(db, table, distinct_bodies * BATCH)
    records = cursor.fetchall()
    con.close()
    bodies = [
        orjson.dumps(
            {"attributes": [{"external_id": e, **orjson.loads(p)} for e, p in records[i : i + BATCH]]}
        )
        for i in range(0, len(records) - BATCH + 1, BATCH)
    ]
    if not bodies:
        return {"error": f"the raw sender needs at least {BATCH} rows"}
    total_requests = -(-rows // BATCH)
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    statuses: Counter[int] = Counter()

    async def main() -> float:
        counter = itertools.count()
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(base_url, connector=connector) as session:

            async def worker() -> None:
                while (n := next(counter)) < total_requests:
                    async with session.post(
                        "/users/track", data=bodies[n % len(bodies)], headers=headers
                    ) as answer:
                        await answer.read()
                        statuses[answer.status] += 1

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            return time.perf_counter() - started

    seconds = asyncio.run(main())
    return {
        "objects": statuses[201] * BATCH,
        "rows": total_requests * BATCH,
        "requests": total_requests,
        "seconds": seconds,
        "r429": statuses[429],
        "statuses": dict(statuses),
    }


def _time_boxed_loop(db: str, table: str, rows: int, time_box_s: float, send) -> dict:
    """Read 75 rows, build the objects, `send(objects)` -> HTTP status; until done or time-boxed."""
    con, cursor = _attribute_objects(db, table, rows)
    statuses: Counter[int] = Counter()
    objects = requests = read = 0
    started = time.perf_counter()
    while time.perf_counter() - started < time_box_s:
        batch = cursor.fetchmany(BATCH)
        if not batch:
            break
        read += len(batch)
        attributes = [{"external_id": external_id, **json.loads(payload)} for external_id, payload in batch]
        status = send(attributes)
        statuses[status] += 1
        requests += 1
        objects += len(attributes) if status == 201 else 0
    seconds = time.perf_counter() - started
    con.close()
    return {
        "objects": objects,
        "rows": read,
        "requests": requests,
        "seconds": seconds,
        "r429": statuses[429],
        "statuses": dict(statuses),
        "time_boxed": read < rows,
    }


def naive_requests(db: str, table: str, base_url: str, api_key: str, rows: int, time_box_s: float) -> dict:
    import requests

    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    def send(attributes: list[dict]) -> int:
        answer = requests.post(
            f"{base_url}/users/track", headers=headers, json={"attributes": attributes}, timeout=30
        )
        return answer.status_code

    return _time_boxed_loop(db, table, rows, time_box_s, send)


def braze_client(db: str, table: str, base_url: str, api_key: str, rows: int, time_box_s: float) -> dict:
    try:
        from importlib.metadata import version

        from braze.client import BrazeClient, BrazeClientError
    except ImportError as exc:  # reported in the table, never faked
        return {
            "unavailable": f"not measured: braze-client is not importable ({exc}); install it "
            "with `pip install --no-deps braze-client==2.3.3` (it pins "
            "tenacity<6 but runs with tenacity 9)"
        }
    client = BrazeClient(api_key=api_key, api_url=base_url)

    def send(attributes: list[dict]) -> int:
        try:
            return client.user_track(attributes=attributes)["status_code"]
        except BrazeClientError:
            return 0

    result = _time_boxed_loop(db, table, rows, time_box_s, send)
    result["version"] = version("braze-client")
    return result
