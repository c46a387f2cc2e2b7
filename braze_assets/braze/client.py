"""The async Braze REST client: one request at a time per call, many calls in flight.

Each POST ends in one `RequestOutcome` whose kind tells the caller exactly what Braze knows:

* ``answered``  - Braze answered 2xx; `body` holds its JSON (with any per-object `errors`).
* ``rejected``  - Braze refused the request for good (400/404/413/...): nothing was processed.
* ``refused``   - Braze did not process it (429, 502/503, connect failure) and retries ran out;
  safe to send again later.
* ``ambiguous`` - the request may have been processed but the answer was lost (timeout after the
  body was sent, dropped connection, 500/504). Retried only when the caller allows it.

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
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import httpx
import orjson
import tenacity
from httpx_aiohttp import AiohttpTransport

from braze_assets.braze import contract

OutcomeKind = Literal["answered", "rejected", "refused", "ambiguous"]
_BEFORE_PROCESSING_STATUSES = {429, 502, 503}
_AMBIGUOUS_STATUSES = {500, 504}


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
    """Paces requests from Braze's `X-RateLimit-*` headers; one per workspace, shared by all syncs
    in this process (Braze limits per workspace, not per integration)."""

    _shared: dict[str, RateBudget] = {}

    def __init__(self, safety_margin: int = 0) -> None:
        self.remaining: int | None = None
        self.reset_at: float = 0.0
        self.safety_margin = safety_margin
        self.waited_s = 0.0

    @classmethod
    def for_workspace(cls, key: str) -> RateBudget:
        return cls._shared.setdefault(key, cls())

    async def acquire(self) -> None:
        while self.remaining is not None and self.remaining <= self.safety_margin:
            delay = self.reset_at - time.time()
            if delay <= 0:
                self.remaining = None  # a new window: the next answer tells us its budget
                break
            self.waited_s += delay
            await asyncio.sleep(delay)
        if self.remaining is not None:
            self.remaining -= 1

    def observe(self, headers: httpx.Headers) -> None:
        remaining, reset = headers.get("x-ratelimit-remaining"), headers.get("x-ratelimit-reset")
        if remaining is None or reset is None:
            return
        try:
            reset_value = float(reset)
            # The docs disagree: epoch seconds [LIMITS] or seconds remaining [TRACK-new].
            reset_at = reset_value if reset_value > 1e9 else time.time() + reset_value
            remaining_value = int(remaining)
        except ValueError:
            return
        if reset_at > self.reset_at + 0.5 or self.remaining is None:
            self.reset_at, self.remaining = reset_at, remaining_value
        else:
            self.remaining = min(self.remaining, remaining_value)

    def pause_until(self, when: float) -> None:
        """After a 429: nobody sends before `when`."""
        self.reset_at = max(self.reset_at, when)
        self.remaining = 0


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
    if isinstance(origin, aiohttp.ClientError) or isinstance(origin, asyncio.TimeoutError):
        return not isinstance(origin, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
    return not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout,
                                httpx.UnsupportedProtocol, httpx.ProxyError))


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
        self._headers = httpx.Headers({"Authorization": f"Bearer {api_key}",
                                       "Content-Type": "application/json",
                                       "User-Agent": "braze-assets"})
        self._limits = httpx.Limits(max_connections=max_connections,
                                    max_keepalive_connections=max_connections)
        self._timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)).as_dict()
        self._urls: dict[str, httpx.URL] = {}
        self.max_attempts = max_attempts
        self._wait = tenacity.wait_exponential_jitter(
            multiplier=backoff_initial_s, max=backoff_max_s, jitter=backoff_initial_s)
        self.budget = budget or RateBudget.for_workspace(self.base_url)
        self._transport: AiohttpTransport | None = None

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
        request = httpx.Request("POST", url, headers=self._headers, content=body,
                                extensions={"timeout": self._timeout})
        response = await self._transport.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return response.status_code, response.headers, content

    def _wait_for(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = exc.wait_s if isinstance(exc, _Retry) else 0.0
        return max(hinted, self._wait(state))

    async def post(self, path: str, body: bytes, *, retry_ambiguous: bool) -> RequestOutcome:
        """POST `body` (JSON bytes) and classify the result; see the module docstring."""
        assert self._transport is not None, "use `async with BrazeClient(...)`"
        outcome = RequestOutcome(kind="refused")

        async def attempt() -> RequestOutcome:
            outcome.attempts += 1
            await self.budget.acquire()
            try:
                status, headers, content = await self._send(path, body)
            except httpx.TransportError as exc:
                ambiguous = _transport_failure_is_ambiguous(exc)
                outcome.ambiguous_attempts += ambiguous
                kind = "no answer (request may have been processed)" if ambiguous else "not sent"
                raise _Retry(ambiguous, f"{kind}: {type(exc).__name__}") from None
            self.budget.observe(headers)
            if status in (401, 403):
                raise BrazeAuthError(
                    f"Braze answered {status} for {path}: the REST API key is invalid, for another "
                    "instance, or lacks the permission (users.track / users.delete)"
                )
            if status == 429:
                outcome.rate_limited += 1
                wait_s = _retry_after(headers)
                self.budget.pause_until(time.time() + wait_s)
                raise _Retry(False, "429 rate limited", status, wait_s)
            if status in _BEFORE_PROCESSING_STATUSES:
                raise _Retry(False, f"{status} from Braze (not processed)", status)
            if status in _AMBIGUOUS_STATUSES:
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
            async for try_ in tenacity.AsyncRetrying(
                retry=tenacity.retry_if_exception(retryable),
                stop=tenacity.stop_after_attempt(self.max_attempts),
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
