"""Statuses Braze does not document still get the safe treatment: an unknown 5xx (a proxy's 520, a
501) may have been processed, so it is ambiguous and retried only where a second copy is harmless;
a 408 means the request never arrived whole, so it is retried. Served by a real loopback HTTP server."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator

import pytest

from braze_assets.braze.client import BrazeClient


class _Scripted(http.server.BaseHTTPRequestHandler):
    statuses: list[int] = []
    seen: list[int] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        status = self.statuses.pop(0) if self.statuses else 201
        self.seen.append(status)
        body = b'{"message": "success"}' if status < 300 else b'{"message": "upstream"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Scripted]]]:
    handler = type("Handler", (_Scripted,), {"statuses": [], "seen": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()


def _post(url: str, retry_ambiguous: bool):
    async def go():
        async with BrazeClient(
            url, "k", backoff_initial_s=0.01, backoff_max_s=0.02, max_attempts=3
        ) as client:
            return await client.post("/users/track", b'{"events": []}', retry_ambiguous=retry_ambiguous)

    return asyncio.run(go())


@pytest.mark.parametrize("status", [501, 505, 520, 599])
def test_an_undocumented_5xx_is_ambiguous_not_a_permanent_failure(server, status):
    url, handler = server
    handler.statuses = [status]
    outcome = _post(url, retry_ambiguous=False)
    assert outcome.kind == "ambiguous" and handler.seen == [status]
    handler.statuses, handler.seen = [status], []
    outcome = _post(url, retry_ambiguous=True)  # resend policy: retried, then answered
    assert outcome.kind == "answered" and handler.seen == [status, 201]


def test_a_408_is_retried_as_never_processed(server):
    url, handler = server
    handler.statuses = [408]
    outcome = _post(url, retry_ambiguous=False)
    assert outcome.kind == "answered" and handler.seen == [408, 201]


def test_a_400_is_still_a_permanent_rejection(server):
    url, handler = server
    handler.statuses = [400]
    outcome = _post(url, retry_ambiguous=True)
    assert outcome.kind == "rejected" and handler.seen == [400]


def _journaled(url: str, retry_ambiguous: bool) -> tuple[object, list[str]]:
    """Post once with journal callbacks; the outcome and what they were told, in order."""
    told: list[str] = []

    async def go():
        async with BrazeClient(
            url, "k", backoff_initial_s=0.01, backoff_max_s=0.02, max_attempts=4
        ) as client:

            async def sent() -> None:
                told.append("S")

            return await client.post(
                "/users/track",
                b'{"events": []}',
                retry_ambiguous=retry_ambiguous,
                on_send=sent,
                on_refused=lambda: told.append("R"),
            )

    return asyncio.run(go()), told


def test_a_refusal_braze_documents_as_unprocessed_is_told_before_the_request_goes_again(server):
    """Each 429, 502 or 503 is told to `on_refused` (nothing of the request is on the wire while
    it waits), and the attempt that follows is journaled as sent again."""
    url, handler = server
    handler.statuses = [429, 503, 502]
    outcome, told = _journaled(url, retry_ambiguous=False)
    assert outcome.kind == "answered" and handler.seen == [429, 503, 502, 201]
    assert told == ["S", "R", "S", "R", "S", "R", "S"]


def test_no_refusal_is_told_once_an_attempt_may_have_been_processed(server):
    """Resend policy: a 500 may have been processed, so a 429 after it does not make the request
    unsent; the request stays journaled as sent."""
    url, handler = server
    handler.statuses = [500, 429]
    outcome, told = _journaled(url, retry_ambiguous=True)
    assert outcome.kind == "answered" and handler.seen == [500, 429, 201]
    assert told == ["S"]
