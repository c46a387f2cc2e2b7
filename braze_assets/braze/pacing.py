"""Pacing one process from Braze's rate-limit headers (`X-RateLimit-Limit/-Remaining/-Reset`).

Braze announces, on each answer, the limit of the endpoint's window, what is left of it and when
it resets. `RateBudget` spends what is left and waits for the reset, so requests are paced before
Braze has to answer 429. It sees only this process's requests: `budget.py` shares one budget
between processes.
"""

from __future__ import annotations

import asyncio
import time

import httpx


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

    def measured_window_s(self) -> float | None:
        """The window's length as this process's answers prove it: the documented one when they
        agree with it, else the upper bound they set; None until this process opened a window."""
        if self.window_high == float("inf"):
            return None
        hint = self.window_hint_s
        return hint if hint is not None and self.window_low <= hint <= self.window_high else self.window_high

    @property
    def paces(self) -> bool:
        """Whether requests are paced: before the first answer (which may announce a limit) or
        under an announced limit; never once Braze answered without one."""
        return self.limit is not None or not self.heard

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
            self.window_end = now + (self.measured_window_s() or self.window_high)

    def pause_until(self, when: float) -> None:
        """After a 429: nobody sends before `when`."""
        self.reset_at = max(self.reset_at, when)
        self.remaining = 0
        self.window_end = None
