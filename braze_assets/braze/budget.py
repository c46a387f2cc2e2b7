"""One Braze rate budget per workspace, shared by every process and pod that sends with its key.

Braze limits each REST endpoint per workspace, and the customer's own backend spends the same
limit. `RateBudget` (client.py) paces one process from the `X-RateLimit-*` headers, but it cannot
see what other processes send, so syncs running in separate processes or pods together overshoot,
and nothing keeps headroom for the customer's own calls. So before it sends, every process takes a
token from one budget per (workspace, endpoint) kept in a shared store (`budget_stores.py`: a
locked file by default, PostgreSQL with `BRAZE_ASSETS_STATE_URL`).

The rule the store enforces: the tokens granted in any stretch of `window + lease + guard` seconds
never exceed `floor(X-RateLimit-Limit * max_rate_share)`. A token is spent within `lease` seconds
of its grant, and a request reaches Braze within `guard` of being sent, so every stretch of one
window at Braze, wherever Braze starts its fixed windows, holds at most that many of our requests.
A sliding window needs no agreement on when Braze's windows start (each process only learns that
from its own answers), which is what makes it safe to share. It costs `(lease + guard) / window`
of the rate: about 3% of `/users/track`'s 3-second window.

Taking a token must stay cheap, so tokens are leased in blocks sized to what the process spends
in one lease period (its recent rate, or the requests waiting for a token): one store round trip
per lease, a few dozen a second at most, not one per request. Tokens a lease leaves unused are
given back with the next lease. A 429 writes a pause into the store, which every process sees at
its next lease.

The workspace is named by its REST endpoint and a hash of the API key; the key itself is never
stored, shown or logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

#: Window length assumed when neither this process, the store, nor the contract knows it: the
#: longest window of the user-data endpoints (per minute), so the budget errs on the slow side.
DEFAULT_WINDOW_S = 60.0
#: How long a leased token may wait before it is sent: longer leases mean fewer store round
#: trips but a larger share of each window given up (see the module docstring).
LEASE_S = 0.05
#: Allowance for the time between taking a token and the request reaching Braze.
GUARD_S = 0.05

T = TypeVar("T")


class BudgetStoreError(RuntimeError):
    """The shared budget's store cannot be reached or read; nothing was sent for this request."""


def workspace_id(rest_endpoint: str, api_key: str) -> str:
    """The workspace's name in the shared store: endpoint + a hash of the key, never the key.

    Braze limits per workspace; the key is what tells workspaces apart on one endpoint. Keys of
    one workspace that differ get separate budgets (Braze cannot be asked which workspace a key
    belongs to)."""
    digest = hashlib.blake2b(api_key.encode(), digest_size=8, person=b"braze-workspace").hexdigest()
    parsed = urllib.parse.urlsplit(rest_endpoint.rstrip("/"))
    endpoint = parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]).geturl()  # no user:password@
    return f"{endpoint}#key-{digest}"


@dataclass
class BudgetState:
    """What the store keeps per (workspace, endpoint)."""

    #: (granted_at on the store's clock, tokens, grant id), oldest first, within the last span
    grants: list[tuple[float, int, int]] = field(default_factory=list)
    next_grant_id: int = 1
    #: nobody sends before this (store clock): set by a 429
    paused_until: float = 0.0
    #: X-RateLimit-Limit as last announced to any process
    limit: int | None = None
    #: the window's length as last measured by a process (from the answers to its requests)
    window_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "grants": [list(grant) for grant in self.grants],
            "next_grant_id": self.next_grant_id,
            "paused_until": self.paused_until,
            "limit": self.limit,
            "window_s": self.window_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BudgetState:
        return cls(
            grants=[(float(at), int(tokens), int(gid)) for at, tokens, gid in data.get("grants", [])],
            next_grant_id=int(data.get("next_grant_id", 1)),
            paused_until=float(data.get("paused_until", 0.0)),
            limit=data.get("limit"),
            window_s=data.get("window_s"),
        )


@dataclass(frozen=True)
class LeaseRequest:
    want: int
    share: float
    #: X-RateLimit-Limit as this process heard it; None before its first answer
    limit: int | None
    #: the window's length as this process measured it (None: it has not)
    window_s: float | None
    #: the documented length, used while no process has measured it
    window_hint_s: float | None = None
    lease_s: float = LEASE_S
    #: (grant id, tokens) the previous lease left unused
    returned: tuple[int, int] | None = None
    #: requests this process sent before any limit was known, to be counted now
    sent_unmetered: int = 0


@dataclass(frozen=True)
class Lease:
    tokens: int
    grant_id: int = 0
    #: with no tokens: ask again after this long (capacity frees up, or a pause ends)
    wait_s: float = 0.0
    #: False when no limit is known anywhere yet: the request goes out and is counted later
    metered: bool = True


def grant(state: BudgetState, request: LeaseRequest, now: float) -> Lease:
    """The store's rule (see the module docstring), applied under the store's lock at `now`."""
    if request.returned is not None:
        _give_back(state, *request.returned)
    if request.window_s:
        state.window_s = request.window_s
    if request.limit:
        state.limit = request.limit
    # A measurement (any process's, the latest) beats the documentation, which beats a guess.
    window_s = state.window_s or request.window_hint_s or DEFAULT_WINDOW_S
    span = window_s + request.lease_s + GUARD_S
    state.grants = [entry for entry in state.grants if entry[0] > now - span]
    if request.sent_unmetered:
        _record(state, now, request.sent_unmetered)
    if state.limit is None:
        return Lease(tokens=request.want, metered=False)
    if now < state.paused_until:
        return Lease(tokens=0, wait_s=state.paused_until - now)
    allowed = allowed_per_window(state.limit, request.share)
    free = allowed - sum(entry[1] for entry in state.grants)
    # No crumbs: a grant smaller than the asker's need (up to a tenth of the window) would come
    # back as an equally small free slot one span later, and the leases would only shrink.
    block = min(request.want, max(1, allowed // 10))
    if free < block:
        return Lease(tokens=0, wait_s=_until_free(state.grants, block - free, span, now))
    tokens = min(request.want, free)
    return Lease(tokens=tokens, grant_id=_record(state, now, tokens))


def pause(state: BudgetState, wait_s: float, now: float) -> None:
    """After a 429: nobody sends for `wait_s` (relative, so the sender's clock never matters)."""
    state.paused_until = max(state.paused_until, now + wait_s)


def give_back(
    state: BudgetState, returned: tuple[int, int] | None, now: float, report: LeaseRequest | None = None
) -> None:
    """Unused tokens back; with `report`, what the process learned (limit, window) and the
    requests it sent unmetered, as a lease request would say them."""
    if returned is not None:
        _give_back(state, *returned)
    if report is not None:
        if report.window_s:
            state.window_s = report.window_s
        if report.limit:
            state.limit = report.limit
        if report.sent_unmetered:
            _record(state, now, report.sent_unmetered)


def allowed_per_window(limit: int, share: float) -> int:
    """Our requests per window: the share of Braze's announced limit, at least one."""
    return max(1, math.floor(limit * share + 1e-9))


def _record(state: BudgetState, now: float, tokens: int) -> int:
    grant_id = state.next_grant_id
    state.next_grant_id += 1
    state.grants.append((now, tokens, grant_id))
    return grant_id


def _give_back(state: BudgetState, grant_id: int, tokens: int) -> None:
    for index, (at, granted, gid) in enumerate(state.grants):
        if gid == grant_id:
            left = granted - min(granted, tokens)
            if left:
                state.grants[index] = (at, left, gid)
            else:
                del state.grants[index]
            return


def _until_free(grants: list[tuple[float, int, int]], needed: int, span: float, now: float) -> float:
    """Seconds until `needed` granted tokens have left the span."""
    freed = 0
    for at, tokens, _ in grants:
        freed += tokens
        if freed >= needed:
            return max(0.001, at + span - now)
    return span


class BudgetStore(ABC):
    """Where the budgets live. The one thing a backend does: run a change on one budget under an
    exclusive lock, with the store's own clock (so every process measures the window alike), and
    keep what the change left."""

    #: how errors name the store (never a secret)
    description: str = ""

    @abstractmethod
    def exchange(self, workspace: str, path: str, change: Callable[[BudgetState, float], T]) -> T:
        """Run `change(state, now)` on the budget of (`workspace`, `path`) and persist the state."""

    @abstractmethod
    def peek(self, workspace: str, path: str) -> BudgetState | None:
        """The budget of (`workspace`, `path`) as kept, changing nothing (None: none is kept)."""

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release connections or file handles."""


class SharedBudget:
    """This process's side of one shared budget: a lease of tokens spent by its requests.

    One per (store, workspace, endpoint, share) in a process, shared by every client in it, like
    `RateBudget`. Only one coroutine at a time renews the lease; the others wait for it."""

    _shared: ClassVar[dict[tuple[int, str, str, float], SharedBudget]] = {}
    #: the longest sleep between two looks at the store while capacity is used up, so tokens
    #: another process gives back early are found soon
    MAX_WAIT_S = 0.25

    def __init__(self, store: BudgetStore, workspace: str, path: str, share: float) -> None:
        self.store, self.workspace, self.path, self.share = store, workspace, path, share
        self.lease_s = LEASE_S
        self.tokens = 0
        self.grant_id = 0
        self.expires = 0.0  # time.monotonic() after which the leased tokens may no longer be spent
        self.unmetered = 0  # sent before any limit was known; counted with the next lease
        self.waiting = 0
        self.rate = 0.0  # tokens per second this process spends (moving average)
        self.taken_since_lease = 0
        self.leased_at = time.monotonic()
        self._renewal: asyncio.Future[None] | None = None
        self._next_look = 0.0  # time.monotonic() before which the store has nothing for us
        # what the benchmarks and tests report
        self.leases = 0  # store exchanges that granted tokens
        self.looks = 0  # every store exchange for a lease, granted or not
        self.store_s = 0.0
        self.waited_s = 0.0

    @classmethod
    def for_workspace(cls, store: BudgetStore, workspace: str, path: str, share: float) -> SharedBudget:
        key = (id(store), workspace, path, share)
        return cls._shared.setdefault(key, cls(store, workspace, path, share))

    async def take(
        self, limit: int | None, window_s: float | None, window_hint_s: float | None = None
    ) -> None:
        """Wait for a token of the shared budget (`limit`: X-RateLimit-Limit as this process
        heard it, None before its first answer; `window_s`: the window's length as it measured
        it, if it did; `window_hint_s`: the documented length)."""
        self.waiting += 1
        try:
            while True:
                if self.tokens > 0 and time.monotonic() < self.expires:
                    self.tokens -= 1
                    self.taken_since_lease += 1
                    return
                if self._renewal is not None:
                    await asyncio.wait({self._renewal})
                    continue
                now = time.monotonic()
                if now < self._next_look:  # the store said when to look again
                    await asyncio.sleep(self._next_look - now)
                    continue
                lease = await self._renew(limit, window_s, window_hint_s)
                if not lease.metered:
                    self.unmetered += 1
                    return
                if not lease.tokens:
                    delay = min(lease.wait_s, self.MAX_WAIT_S)
                    self._next_look = time.monotonic() + delay
                    self.waited_s += delay
        finally:
            self.waiting -= 1

    async def _renew(self, limit: int | None, window_s: float | None, window_hint_s: float | None) -> Lease:
        renewal = self._renewal = asyncio.get_running_loop().create_future()
        started = time.monotonic()
        returned = (self.grant_id, self.tokens) if self.tokens else None
        request = LeaseRequest(
            want=self._want(limit, started),
            share=self.share,
            limit=limit,
            window_s=window_s,
            window_hint_s=window_hint_s,
            lease_s=self.lease_s,
            returned=returned,
            sent_unmetered=self.unmetered,
        )
        self.tokens = 0
        try:
            lease = await asyncio.to_thread(self.store.exchange, self.workspace, self.path, _granter(request))
        finally:
            self._renewal = None
            renewal.set_result(None)
            self.store_s += time.monotonic() - started
        self.looks += 1
        if lease.tokens and lease.metered:
            self.leases += 1
        if request.sent_unmetered:
            self.unmetered = 0
        self.tokens, self.grant_id = (lease.tokens, lease.grant_id) if lease.metered else (0, 0)
        self.expires = started + self.lease_s
        return lease

    def _want(self, limit: int | None, now: float) -> int:
        """Tokens to ask for: what this process spends in one lease period at its recent rate,
        and at least one per request already waiting; never more than a quarter of the window's
        budget, so one process cannot hold the others back for long."""
        elapsed = now - self.leased_at
        if elapsed > 0 and self.taken_since_lease:
            sample = self.taken_since_lease / max(elapsed, self.lease_s)
            self.rate = sample if not self.rate else (self.rate + sample) / 2
        self.leased_at, self.taken_since_lease = now, 0
        want = max(1, self.waiting, math.ceil(self.rate * self.lease_s * 1.5))
        if limit:
            want = min(want, max(1, allowed_per_window(limit, self.share) // 4))
        return want

    async def pause(self, wait_s: float) -> None:
        """A 429: every process sharing the budget waits `wait_s`; this one drops its lease."""
        self.tokens = 0
        await asyncio.to_thread(self.store.exchange, self.workspace, self.path, _pauser(wait_s))

    async def give_back(self, limit: int | None = None, window_s: float | None = None) -> None:
        """Return the tokens of the current lease (this process is done sending for now), and
        tell the store the limit and window this process heard (`take`'s arguments) and the
        requests it sent before any limit was known: a client whose only request went out
        unmetered would otherwise leave the store, and every bill, without Braze's limit."""
        if self._renewal is not None:
            return
        returned = (self.grant_id, self.tokens) if self.tokens else None
        if returned is None and not self.unmetered and not limit:
            return
        self.tokens = 0
        report = LeaseRequest(
            want=0, share=self.share, limit=limit, window_s=window_s, sent_unmetered=self.unmetered
        )
        await asyncio.to_thread(self.store.exchange, self.workspace, self.path, _returner(returned, report))
        self.unmetered = 0


def _granter(request: LeaseRequest) -> Callable[[BudgetState, float], Lease]:
    return lambda state, now: grant(state, request, now)


def _pauser(wait_s: float) -> Callable[[BudgetState, float], None]:
    return lambda state, now: pause(state, wait_s, now)


def _returner(returned: tuple[int, int] | None, report: LeaseRequest) -> Callable[[BudgetState, float], None]:
    return lambda state, now: give_back(state, returned, now, report)
