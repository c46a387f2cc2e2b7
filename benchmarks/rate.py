"""Share of a rate limit used, measured from the emulator's own counters.

The emulator's window is fixed and starts at the first request (then at the first request after
each reset), like Braze's. A sampler polls `/_emulator/stats` every few milliseconds; the share is
the requests admitted (not 429) during the first whole windows after the first request, divided by
what those windows allow. A client that idles after a reset, or is slower than the limit, scores
below 100%; one that hammers gets 429s, which are counted separately.
"""

from __future__ import annotations

import math
import threading
import time


class StatsSampler(threading.Thread):
    def __init__(self, emulator, every_s: float = 0.01):
        super().__init__(daemon=True)
        self.emulator, self.every_s = emulator, every_s
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, requests, 429s)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            stats = self.emulator.stats()
            self.samples.append((time.monotonic(), stats["requests"], stats["by_status"].get("429", 0)))
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _admitted_at(samples: list[tuple[float, int, int]], when: float) -> float:
    """Requests admitted (answered other than 429) by `when`, interpolated between samples."""
    previous = samples[0]
    for sample in samples:
        if sample[0] >= when:
            span = sample[0] - previous[0]
            before, after = previous[1] - previous[2], sample[1] - sample[2]
            return before + (after - before) * ((when - previous[0]) / span if span else 1.0)
        previous = sample
    return samples[-1][1] - samples[-1][2]


def window_share(samples: list[tuple[float, int, int]], limit: int, window_s: float) -> dict:
    """{share, windows, seconds, first_request_at}: admitted / allowed over the whole windows."""
    started = next((i for i, s in enumerate(samples) if s[1] > 0), None)
    if started is None:
        return {"share": 0.0, "windows": 0, "seconds": 0.0}
    t0 = samples[started][0] if started == 0 else (samples[started - 1][0] + samples[started][0]) / 2
    final = samples[-1][1]
    t_end = next(s[0] for s in samples if s[1] == final)
    seconds = t_end - t0
    windows = math.floor(seconds / window_s)
    if windows == 0:  # shorter than one window: the average rate against the nominal one
        admitted: float = final - samples[-1][2]
        return {"share": admitted / (limit / window_s * max(seconds, 1e-6)), "windows": 0, "seconds": seconds}
    admitted = _admitted_at(samples, t0 + windows * window_s)
    return {"share": admitted / (windows * limit), "windows": windows, "seconds": seconds}
