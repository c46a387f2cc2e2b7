"""A key Braze refuses in the middle of a run stops the run, and nothing is sent twice.

Requests already on the wire when the refusal comes may have been processed (a key revoked while
they travelled, or a refusal of one request only): they are answered or held as usual, never
dropped as "not sent", or the next run would send their events again. Served by a real loopback
HTTP server that answers one request with 401 while others are still being processed.
"""

from __future__ import annotations

import collections
import datetime as dt
import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest

from braze_assets_tests.conftest import Harness, earlier_today, events_rows, sync_config

HOUR_AGO = earlier_today(dt.timedelta(hours=1))


class _RevokingBraze(http.server.BaseHTTPRequestHandler):
    """The third request gets 401 at once; every other one is stored, and answered late while
    `slow`, so the requests around the refusal are still on the wire when it comes."""

    lock = threading.Lock()
    arrived = 0
    slow = True
    stored: collections.Counter[int] = collections.Counter()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.arrived += 1
            number = cls.arrived
        if cls.slow and number == 3:
            self._answer(401, {"message": "Invalid API Key"})
            return
        with cls.lock:
            cls.stored.update(e["properties"]["seq"] for e in body.get("events", []))
        if cls.slow and number > 1:
            time.sleep(1.5)
        self._answer(201, {"message": "success"})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def revoking() -> Iterator[tuple[str, type[_RevokingBraze]]]:
    handler = type(
        "Handler", (_RevokingBraze,), {"stored": collections.Counter(), "arrived": 0, "slow": True}
    )
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()


def test_requests_on_the_wire_when_the_key_is_refused_are_never_sent_again(tmp_path, emulator, revoking):
    url, braze = revoking
    harness = Harness(tmp_path, emulator, braze_overrides={"rest_endpoint": url})
    harness.syncs = [sync_config("ev", "events", "main.ev", max_in_flight=4)]
    harness.table("ev", events_rows(600, HOUR_AGO))  # 8 requests of 75 events

    stopped = harness.run("ev")
    assert not stopped.result.success
    braze.slow = False  # the key is fixed
    again = harness.run("ev")
    assert again.result.success, again.result
    twice = sorted(seq for seq, copies in braze.stored.items() if copies > 1)
    assert twice == [], f"{len(twice)} events sent twice"
    ledger = harness.ledger("ev")
    assert sorted(braze.stored) == list(range(600)) or ledger.get("held"), ledger
    assert ledger.get("accepted", 0) + ledger.get("held", 0) == 600, ledger
