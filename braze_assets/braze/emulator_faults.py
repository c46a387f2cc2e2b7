"""Fault injection and rate limits for the local Braze emulator: what to inject, the draw that picks a
fault, the dropped connection, and the fixed rate-limit window (``docs/braze-contract.md`` B3).

Kept apart from the server so the rules a client's retries are tested against (which faults leave a
request unprocessed, which process it and lose the answer: docs/architecture.md, Delivery guarantees)
read in one place. No I/O beyond closing a transport: the API pipeline in
:mod:`braze_assets.braze.emulator_api` draws and applies them per request.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from aiohttp import web

from braze_assets.braze.emulator_validation import is_number


@dataclass
class FaultConfig:
    """Fault injection rates (0..1), drawn for every API request (``/users/track``, ``/users/delete``,
    ``/users/export/ids``, the catalog endpoints). "before" faults refuse a request unprocessed (429,
    502/503, dropped connection); "after" faults process (store) it and then lose or spoil the answer
    (500/504, dropped connection, a stall past the client's timeout), the ambiguous case of
    docs/architecture.md."""

    rate_429: float = 0.0
    rate_5xx_before: float = 0.0
    rate_drop_before: float = 0.0
    rate_5xx_after: float = 0.0
    rate_drop_after: float = 0.0
    rate_timeout_after: float = 0.0
    timeout_s: float = 30.0
    retry_after_s: int = 1
    latency_ms: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        rates = [value for name, value in vars(self).items() if name.startswith("rate_")]
        if (
            not all(is_number(rate) and 0 <= rate <= 1 for rate in rates)
            or sum(rates[:3]) > 1
            or sum(rates[3:]) > 1
        ):
            raise ValueError("fault rates must be numbers in 0..1, summing to at most 1 before and after")
        if not (
            is_number(self.timeout_s) and is_number(self.latency_ms) and isinstance(self.retry_after_s, int)
        ):
            raise ValueError("timeout_s and latency_ms must be numbers, retry_after_s an integer")


@dataclass
class RateWindow:
    """Fixed window starting at the first request (B3); every API request counts, refused ones too."""

    limit: int | None
    window_s: float
    resets_at: float = 0.0
    used: int = 0

    def take(self, now: float) -> bool:
        if now >= self.resets_at:
            self.resets_at, self.used = now + self.window_s, 0
        self.used += 1
        return self.limit is None or self.used <= self.limit

    def headers(self) -> dict[str, str]:
        """The `X-RateLimit-*` headers of a limited window (none when unlimited)."""
        if self.limit is None:
            return {}
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - self.used)),
            "X-RateLimit-Reset": str(math.ceil(self.resets_at)),  # UTC epoch seconds (B3)
        }


def draw(rng: random.Random, *rates: float) -> int:
    """One uniform draw against cumulative ``rates``; the index of the fault hit, or -1 for none."""
    if not any(rates):
        return -1
    point, edge = rng.random(), 0.0
    for index, rate in enumerate(rates):
        edge += rate
        if point < edge:
            return index
    return -1


def drop(request: web.Request) -> web.Response:
    """Close the connection without answering; aiohttp then fails to write the returned response and
    ignores that, so the client sees a disconnect."""
    if request.transport is not None:
        request.transport.close()
    return web.Response()
