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
`X-RateLimit-*` headers before Braze has to say 429; with a `budget_store`, a `SharedBudget`
(budget.py) also keeps every process and pod sending with the same key within one budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import httpx
import orjson
import tenacity
from httpx_aiohttp import AiohttpTransport

from braze_assets.braze import contract
from braze_assets.braze.budget import BudgetStore, BudgetStoreError, SharedBudget, workspace_id
from braze_assets.braze.pacing import RateBudget

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
        budget_store: BudgetStore | None = None,
        max_rate_share: float = 1.0,
    ) -> None:
        """`budget_store`: where the budget shared with other processes lives (None: this
        process paces alone); `max_rate_share`: the share of Braze's announced limit this client
        may use through it (see `BrazeResource.max_rate_share`)."""
        self.base_url = check_endpoint(base_url, allow_custom_host)
        if not 0 < max_rate_share <= 1:
            raise ValueError(f"max_rate_share must be above 0 and at most 1, got {max_rate_share!r}")
        if budget_store is None and max_rate_share < 1:
            raise ValueError("max_rate_share below 1 needs a budget_store to share the budget through")
        self.workspace = workspace_id(self.base_url, api_key)
        self._budget_store, self.max_rate_share = budget_store, max_rate_share
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
        self._budget_keys: set[str] = set()  # the budgets this client leased from
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
        return RateBudget.for_workspace(self.workspace + path, contract.RATE_WINDOWS_S.get(path))

    def shared_budget(self, path: str) -> SharedBudget | None:
        """This process's lease on the budget of `path` shared across processes, if any."""
        if self._budget_store is None:
            return None
        return SharedBudget.for_workspace(self._budget_store, self.workspace, path, self.max_rate_share)

    def __repr__(self) -> str:  # never show the key
        return f"BrazeClient({self.base_url!r})"

    async def __aenter__(self) -> BrazeClient:
        self._transport = AiohttpTransport(limits=self._limits)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for key in self._budget_keys if self._budget_store is not None else ():
            shared = self.shared_budget(key)
            if shared is not None:
                # The others may spend what this client leaves; if the store is gone they wait a
                # window longer, which is no reason to fail a delivery that is over.
                budget = self.budget(key)
                with contextlib.suppress(BudgetStoreError):
                    await shared.give_back(budget.limit, budget.measured_window_s())
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    async def _send(self, path: str, body: bytes, method: str = "POST") -> tuple[int, httpx.Headers, bytes]:
        """One POST, straight to the transport: each request is the same pre-joined URL and
        headers, so httpx.AsyncClient's per-request URL merging, auth, redirect and cookie handling
        would only cost time (measured: about a third of the sender's CPU)."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        if self._transport is None:
            raise RuntimeError("use `async with BrazeClient(...)`")
        request = httpx.Request(
            method, url, headers=self._headers, content=body, extensions={"timeout": self._timeout}
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
        self,
        path: str,
        body: bytes,
        *,
        retry_ambiguous: bool,
        on_send: Callable[[], Awaitable[None] | None] | None = None,
        on_refused: Callable[[], Awaitable[None] | None] | None = None,
        method: str = "POST",
        budget_key: str | None = None,
    ) -> RequestOutcome:
        """Send `body` (JSON bytes; POST unless `method` says otherwise, as catalog items take PUT
        and DELETE) and classify the result; see the module docstring. `budget_key`: the rate
        budget the request is paced under, when several paths share one limit (default `path`).

        The two callbacks let a journal tell, after a crash, whether the request may be on the
        wire (each is awaited when it returns an awaitable, and the request waits for it):
        `on_send` runs after any pacing wait, just before the request first goes out, and again
        before each attempt that follows an `on_refused`; `on_refused` runs when Braze refused an
        attempt in a way that means it processed nothing (408, 429, 502, 503, or a connection that
        failed before the request left) and no earlier attempt may have been processed, before
        the wait for the next attempt: until `on_send` runs again, nothing of the request can
        reach Braze."""
        assert self._transport is not None, "use `async with BrazeClient(...)`"
        outcome = RequestOutcome(kind="refused")
        refusal_told = False  # `on_refused` ran, and no attempt went out since

        async def call(callback: Callable[[], Awaitable[None] | None]) -> None:
            written = callback()
            if written is not None:
                await written

        async def refused(message: str, status: int | None = None, wait_s: float = 0) -> _Retry:
            """A refusal Braze processed nothing of; told to `on_refused` while every attempt
            so far is known unprocessed."""
            nonlocal refusal_told
            if on_refused is not None and not outcome.ambiguous_attempts:
                await call(on_refused)
                refusal_told = True
            return _Retry(False, message, status, wait_s)

        async def attempt() -> RequestOutcome:
            nonlocal refusal_told
            outcome.attempts += 1
            key = budget_key or path
            self._budget_keys.add(key)
            budget, shared = self.budget(key), self.shared_budget(key)
            probe = await budget.acquire()
            try:
                if shared is not None and budget.paces:
                    await shared.take(budget.limit, budget.measured_window_s(), budget.window_hint_s)
                if on_send is not None and (outcome.attempts == 1 or refusal_told):
                    await call(on_send)
                    refusal_told = False
                sent_at = time.time()
                try:
                    status, headers, content = await self._send(path, body, method)
                except httpx.TransportError as exc:
                    if not _transport_failure_is_ambiguous(exc):
                        raise await refused(f"not sent: {type(exc).__name__}") from None
                    outcome.ambiguous_attempts += 1
                    raise _Retry(
                        True, f"no answer (request may have been processed): {type(exc).__name__}"
                    ) from None
            finally:
                budget.release(probe)
            budget.observe(headers, sent_at, status)
            if status in (401, 403):
                raise BrazeAuthError(
                    f"Braze answered {status} for {path}: the REST API key is invalid, for another "
                    "instance, or lacks the permission (users.track, users.delete, catalogs.replace_items, "
                    "catalogs.delete_items)"
                )
            if status == 429:
                outcome.rate_limited += 1
                wait_s = _retry_after(headers)
                budget.pause_until(time.time() + wait_s)
                if shared is not None:
                    await shared.pause(wait_s)  # every process sharing the budget waits
                raise await refused("429 rate limited", status, wait_s)
            if status in _BEFORE_PROCESSING_STATUSES:
                raise await refused(f"{status} from Braze (not processed)", status)
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
