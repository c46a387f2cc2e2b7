"""The async Braze REST client: one request at a time per call, many calls in flight.

Each POST ends in one `RequestOutcome` whose kind tells the caller exactly what Braze knows:

* ``answered``  - Braze answered 2xx; `body` holds its JSON (with any per-object `errors`).
* ``rejected``  - Braze refused the request for good (400/404/413/...): nothing was processed.
* ``refused``   - Braze did not process it (408, 429, 502/503, connect failure) and retries ran out;
  safe to send again later.
* ``ambiguous`` - the request may have been processed but the answer was lost (timeout after the
  body was sent, dropped connection, 500/504 or any other 5xx). Retried only when the caller
  allows it.

401/403 raise `BrazeAuthError` at once: a global error, the key or its permissions are wrong.
Retries use tenacity with exponential backoff and jitter, and never wait less than Braze asked
(`X-Ratelimit-Retry-After` / `X-RateLimit-Reset`). A shared `RateBudget` paces requests from the
`X-RateLimit-*` headers before Braze has to say 429.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import httpx
import orjson
import tenacity
from httpx_aiohttp import AiohttpTransport

from braze_assets.braze import contract

OutcomeKind = Literal["answered", "rejected", "refused", "ambiguous"]
#: Refused before processing: 408 (the body never arrived whole), 429, 502 and 503 [ERR].
_BEFORE_PROCESSING_STATUSES = {408, 429, 502, 503}
#: Any other 5xx (500, 504, and undocumented ones such as a proxy's 520) may have been processed.


class BrazeAuthError(RuntimeError):
    """Braze refused the API key (401) or its permissions (403): stop the sync, change nothing."""


class BrazeEndpointError(ValueError):
    """The configured REST endpoint is not acceptable (not HTTPS, or not a known Braze host)."""


@dataclass
class RequestOutcome:
    kind: OutcomeKind
    status: int | None = None
    body: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    attempts: int = 0
    #: attempts whose outcome was unknown (each one may have been processed by Braze)
    ambiguous_attempts: int = 0
    rate_limited: int = 0


def check_endpoint(url: str, allow_custom_host: bool = False) -> str:
    """Loopback may be plain HTTP (the emulator); anything else must be HTTPS on a Braze host [B4]."""
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname or ""
    if parsed.scheme not in ("http", "https") or not host:
        raise BrazeEndpointError(f"Braze REST endpoint {url!r} is not an http(s) URL")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return url.rstrip("/")
    if parsed.scheme != "https":
        raise BrazeEndpointError(f"Braze REST endpoint {url!r} must use https")
    if host not in contract.BRAZE_REST_HOSTS and not allow_custom_host:
        raise BrazeEndpointError(
            f"{host!r} is not a known Braze REST host (see Settings > APIs and Identifiers); "
            "set allow_custom_host to use it anyway"
        )
    return url.rstrip("/")


class RateBudget:
    """Paces requests from Braze's `X-RateLimit-*` headers; one per workspace and endpoint, shared
    by all syncs in this process (Braze limits each endpoint per workspace).

    Within a window it spends the `Remaining` Braze reported, less the requests still in flight.
    When the window is used up it waits for the window's end, then lets one request through (a
    probe) whose answer tells the new window's budget while the others wait: a new window never
    starts with a burst of 429s. `Reset` comes in whole seconds, so the end is known only to
    within a second. When this process sent the first request of a window (its answer says
    `Remaining = Limit - 1`), that request reached Braze between its sending and its answer, which
    bounds the window's length from both sides; the documented length (`window_hint_s`) is used
    when it lies within those bounds, the upper bound otherwise. The window then ends no later than
    that answer's arrival plus the length: never early, seldom long.
    """

    _shared: dict[str, RateBudget] = {}
    #: how often requests waiting for a probe's answer look again
    PROBE_POLL_S = 0.005

    def __init__(self, safety_margin: int = 0, window_hint_s: float | None = None) -> None:
        self.limit: int | None = None
        self.heard = False  # no answer yet: the first request finds out whether there is a limit
        self.remaining: int | None = None
        self.reset_at: float = 0.0
        self.safety_margin = safety_margin
        self.window_hint_s = window_hint_s
        self.waited_s = 0.0
        self.in_flight = 0
        self.probing = False
        self.window_low, self.window_high = 0.0, float("inf")  # bounds on the window's length
        self.window_end: float | None = None  # the current window ends no later than this

    @classmethod
    def for_workspace(cls, key: str, window_hint_s: float | None = None) -> RateBudget:
        return cls._shared.setdefault(key, cls(window_hint_s=window_hint_s))

    async def acquire(self) -> bool:
        """Wait for the right to send; True when this request probes a new window. Call
        `release` once the attempt is over (after `observe`)."""
        while True:
            if self.remaining is None and (self.limit is not None or not self.heard):
                if self.probing:
                    await asyncio.sleep(self.PROBE_POLL_S)
                    continue
                self.probing = True
                self.in_flight += 1
                return True
            if self.remaining is None or self.remaining > self.safety_margin:
                if self.remaining is not None:
                    self.remaining -= 1
                self.in_flight += 1
                return False  # within the budget (or no limit announced yet)
            ends = self.reset_at if self.window_end is None else min(self.reset_at, self.window_end)
            delay = ends - time.time()
            if delay <= 0:
                self.remaining = None  # a new window: a probe finds out its budget
                self.window_end = None
                continue
            self.waited_s += delay
            await asyncio.sleep(delay)

    def release(self, probe: bool) -> None:
        self.in_flight -= 1
        if probe:
            self.probing = False

    def observe(self, headers: httpx.Headers, sent_at: float | None = None, status: int = 200) -> None:
        """Take in an answer's rate-limit headers (`sent_at`: when its request left)."""
        self.heard = True
        remaining, reset = headers.get("x-ratelimit-remaining"), headers.get("x-ratelimit-reset")
        if remaining is None or reset is None:
            if 200 <= status < 300 and self.remaining is None:
                self.limit = None  # a success without a limit announced: nothing to pace
            return
        try:
            reset_value = float(reset)
            # The docs disagree: epoch seconds [LIMITS] or seconds remaining [TRACK-new].
            now = time.time()
            reset_at = reset_value if reset_value > 1e9 else now + reset_value
            remaining_value = int(remaining)
            limit = int(headers.get("x-ratelimit-limit") or 0) or None
        except ValueError:
            return
        self.limit = limit or self.limit or remaining_value + 1
        if reset_at > self.reset_at + 0.5 or self.remaining is None:
            # A new window: what Braze reports, less what is still on its way.
            self.reset_at = reset_at
            self.remaining = max(0, remaining_value - self.in_flight)
            self.window_end = None
        else:
            self.remaining = min(self.remaining, remaining_value)
        if sent_at is not None and limit and remaining_value == limit - 1 and reset_value > 1e9:
            # This request opened the window: it reached Braze between sent_at and now, and
            # Reset is that moment plus the window's length, rounded up to a whole second.
            self.window_low = max(self.window_low, reset_at - 1 - now)
            self.window_high = min(self.window_high, reset_at - sent_at)
            hint = self.window_hint_s
            length = (
                hint if hint is not None and self.window_low <= hint <= self.window_high else self.window_high
            )
            self.window_end = now + length

    def pause_until(self, when: float) -> None:
        """After a 429: nobody sends before `when`."""
        self.reset_at = max(self.reset_at, when)
        self.remaining = 0
        self.window_end = None


class _Retry(Exception):
    def __init__(self, ambiguous: bool, message: str, status: int | None = None, wait_s: float = 0):
        super().__init__(message)
        self.ambiguous, self.message, self.status, self.wait_s = ambiguous, message, status, wait_s


def _retry_after(headers: httpx.Headers) -> float:
    for name in ("x-ratelimit-retry-after", "retry-after"):
        if headers.get(name):
            try:
                return float(headers[name])
            except ValueError:
                pass
    if headers.get("x-ratelimit-reset"):
        try:
            reset = float(headers["x-ratelimit-reset"])
            return max(0.0, reset - time.time()) if reset > 1e9 else reset
        except ValueError:
            pass
    return 1.0


def _transport_failure_is_ambiguous(exc: httpx.TransportError) -> bool:
    """Could Braze have processed the request? Only failures before it got the body say no.

    httpx-aiohttp maps aiohttp's errors onto httpx's classes loosely (a dropped connection becomes
    ConnectTimeout), so judge by the original aiohttp exception where there is one.
    """
    origin = exc.__cause__
    if isinstance(origin, (aiohttp.ClientError, asyncio.TimeoutError)):
        return not isinstance(origin, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
    return not isinstance(
        exc,
        (
            httpx.ConnectError,
            httpx.ConnectTimeout,
            httpx.PoolTimeout,
            httpx.UnsupportedProtocol,
            httpx.ProxyError,
        ),
    )


#: The retry state `_retry_wait` hands tenacity's backoff belongs to no real retry loop.
_BACKOFF_ONLY = tenacity.Retrying()


class BrazeClient:
    """Async client for `/users/track` and `/users/delete`; use as `async with BrazeClient(...)`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_connections: int = 64,
        timeout_s: float = 30.0,
        max_attempts: int = 6,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        allow_custom_host: bool = False,
        budget: RateBudget | None = None,
    ) -> None:
        self.base_url = check_endpoint(base_url, allow_custom_host)
        self._headers = httpx.Headers(
            {
                "Authorization": f"Bearer {api_key}",
                "Content-Type": "application/json",
                "User-Agent": "braze-assets",
            }
        )
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)).as_dict()
        self._urls: dict[str, httpx.URL] = {}
        self.max_attempts = max_attempts
        self._wait = tenacity.wait_exponential_jitter(
            multiplier=backoff_initial_s, max=backoff_max_s, jitter=backoff_initial_s
        )
        self._budget = budget
        self._transport: AiohttpTransport | None = None

    def budget(self, path: str) -> RateBudget:
        """The rate budget of `path` in this workspace (shared by every client in the process)."""
        if self._budget is not None:
            return self._budget
        return RateBudget.for_workspace(self.base_url + path, contract.RATE_WINDOWS_S.get(path))

    def __repr__(self) -> str:  # never show the key
        return f"BrazeClient({self.base_url!r})"

    async def __aenter__(self) -> BrazeClient:
        self._transport = AiohttpTransport(limits=self._limits)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    async def _send(self, path: str, body: bytes) -> tuple[int, httpx.Headers, bytes]:
        """One POST, straight to the transport: each request is the same pre-joined URL and
        headers, so httpx.AsyncClient's per-request URL merging, auth, redirect and cookie handling
        would only cost time (measured: about a third of the sender's CPU)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        if self._transport is None:
            raise RuntimeError("use `async with BrazeClient(...)`")
        request = httpx.Request(
            "POST", url, headers=self._headers, content=body, extensions={"timeout": self._timeout}
        )
        response = await self._transport.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return response.status_code, response.headers, content

    def _retry_wait(self, failure: BaseException | None, failed_attempts: int) -> float:
        """Backoff after `failed_attempts` failures, never shorter than Braze asked."""
        hinted = failure.wait_s if isinstance(failure, _Retry) else 0.0
        state = tenacity.RetryCallState(_BACKOFF_ONLY, None, (), {})
        state.attempt_number = failed_attempts  # all that the backoff reads of the state
        return max(hinted, self._wait(state))

    def _wait_for(self, state: tenacity.RetryCallState) -> float:
        """tenacity's wait for the retries, which begin with the second attempt."""
        failure = state.outcome.exception() if state.outcome else None
        return self._retry_wait(failure, state.attempt_number + 1)

    async def post(
        self, path: str, body: bytes, *, retry_ambiguous: bool, on_send: Callable[[], None] | None = None
    ) -> RequestOutcome:
        """POST `body` (JSON bytes) and classify the result; see the module docstring.
        `on_send` runs once, after any pacing wait, just before the request first goes out."""
        assert self._transport is not None, "use `async with BrazeClient(...)`"
        outcome = RequestOutcome(kind="refused")

        async def attempt() -> RequestOutcome:
            outcome.attempts += 1
            budget = self.budget(path)
            probe = await budget.acquire()
            if on_send is not None and outcome.attempts == 1:
                on_send()
            sent_at = time.time()
            try:
                status, headers, content = await self._send(path, body)
            except httpx.TransportError as exc:
                ambiguous = _transport_failure_is_ambiguous(exc)
                outcome.ambiguous_attempts += ambiguous
                kind = "no answer (request may have been processed)" if ambiguous else "not sent"
                raise _Retry(ambiguous, f"{kind}: {type(exc).__name__}") from None
            finally:
                budget.release(probe)
            budget.observe(headers, sent_at, status)
            if status in (401, 403):
                raise BrazeAuthError(
                    f"Braze answered {status} for {path}: the REST API key is invalid, for another "
                    "instance, or lacks the permission (users.track / users.delete)"
                )
            if status == 429:
                outcome.rate_limited += 1
                wait_s = _retry_after(headers)
                budget.pause_until(time.time() + wait_s)
                raise _Retry(False, "429 rate limited", status, wait_s)
            if status in _BEFORE_PROCESSING_STATUSES:
                raise _Retry(False, f"{status} from Braze (not processed)", status)
            if status >= 500:
                outcome.ambiguous_attempts += 1
                raise _Retry(True, f"{status} from Braze (may have been processed)", status)
            payload = _json(content)
            outcome.status, outcome.body = status, payload
            if 200 <= status < 300:
                outcome.kind = "answered"
            else:
                outcome.kind = "rejected"
                outcome.message = f"{status}: {payload.get('message') or _text(content)}"
            return outcome

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, _Retry) and (retry_ambiguous or not exc.ambiguous)

        try:
            try:
                return await attempt()  # the usual request: answered at once, no retry machinery
            except _Retry as exc:
                if not retryable(exc) or self.max_attempts < 2:
                    raise
                await asyncio.sleep(self._retry_wait(exc, 1))
            async for try_ in tenacity.AsyncRetrying(
                retry=tenacity.retry_if_exception(retryable),
                stop=tenacity.stop_after_attempt(self.max_attempts - 1),
                wait=self._wait_for,
                reraise=True,
            ):
                with try_:
                    return await attempt()
        except _Retry as exc:
            outcome.kind = "ambiguous" if exc.ambiguous else "refused"
            outcome.status, outcome.message = exc.status, exc.message
        return outcome


def _text(content: bytes) -> str:
    return content[:200].decode("utf-8", "replace")


def _json(content: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {"message": _text(content)}
    return data if isinstance(data, dict) else {"message": str(data)[:200]}
