"""One Braze budget per workspace, measured: `python -m benchmarks.run --case shared-budget`.

Each delivery runs in a process of its own (`deliver_only`), against an emulator of its own that
enforces a rate limit, with a sampler on the emulator's counters (rate.py):

* one process, without and with the shared budget (file, share 1.0): what leasing tokens costs a
  single sender, at 300 requests / 3 s (pacing decides) and at Braze's 3,000 / 3 s (the sender's
  own speed decides);
* three processes (three syncs) started together without a shared budget: each paces alone from
  the headers, which is what happened before;
* three processes sharing the budget at `max_rate_share` 1.0 and 0.5: the share of the limit
  they use together, and their 429s.

The budget lives in files under the case's directory, or in PostgreSQL when
`BRAZE_ASSETS_STATE_URL` is set.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.child import run_children
from benchmarks.emulator import API_KEY, EmulatorProcess
from benchmarks.rate import StatsSampler, window_share
from benchmarks.report import Row, loads
from benchmarks.report import section as section_text
from braze_assets.state import STATE_URL_ENV

PACED_LIMIT, BRAZE_LIMIT, WINDOW_S = 300, 3000, 3.0
#: --quick: small limits over one-second windows, so a few thousand rows span several windows
QUICK_PACED_LIMIT, QUICK_BRAZE_LIMIT, QUICK_WINDOW_S = 30, 300, 1.0
SYNCS = 3


@dataclass(frozen=True)
class Plan:
    """One measurement: `processes` deliveries of the delta at `limit` per `window_s`."""

    name: str
    manifest: str
    limit: int
    window_s: float
    processes: int = 1
    share: float | None = None  # None: no shared budget (each process paces alone)


def tables(quick: bool) -> dict[str, int]:
    """The rows (75 per request) of each delta: three windows of the paced limit for one process
    alone, one window per sync when three share it (three windows together at share 1.0), and a
    window and a half of Braze's limit, which one sender cannot reach: its speed is the figure."""
    paced, braze, _ = _limits(quick)
    return {
        "cdi_attributes_budget_single": paced * 3 * 75,
        "cdi_attributes_budget_sync": paced * 75,
        "cdi_attributes_budget_braze": braze * 3 // 2 * 75,
    }


def _limits(quick: bool) -> tuple[int, int, float]:
    if quick:
        return QUICK_PACED_LIMIT, QUICK_BRAZE_LIMIT, QUICK_WINDOW_S
    return PACED_LIMIT, BRAZE_LIMIT, WINDOW_S


def run(db: str, workdir: Path, quick: bool, in_flight: int) -> list[Row]:
    """Every measurement of the case, in order."""
    paced, braze, window = _limits(quick)
    deltas = run_children(
        [
            {
                "case": "delta_only",
                "db": db,
                "table": table,
                "data_type": "attributes",
                "workdir": str(workdir),
            }
            for table in tables(quick)
        ]
    )
    for delta in deltas:
        if "error" in delta:
            return [Row("shared budget: delta", note=delta["error"], extra=delta)]
    single, sync, braze_delta = (delta["manifest"] for delta in deltas)
    plans = [
        Plan("1 process, paced alone", single, paced, window),
        Plan("1 process, shared budget 1.0", single, paced, window, share=1.0),
        Plan("1 process, paced alone", braze_delta, braze, window),
        Plan("1 process, shared budget 1.0", braze_delta, braze, window, share=1.0),
        Plan(f"{SYNCS} processes, paced alone", sync, paced, window, SYNCS),
        Plan(f"{SYNCS} processes, shared budget 1.0", sync, paced, window, SYNCS, 1.0),
        Plan(f"{SYNCS} processes, shared budget 0.5", sync, paced, window, SYNCS, 0.5),
    ]
    return [measure(plan, workdir / f"case-{n}", in_flight) for n, plan in enumerate(plans)]


def measure(plan: Plan, workdir: Path, in_flight: int) -> Row:
    label = f"{plan.name} @ {plan.limit}/{plan.window_s:g} s"
    print(f"- {label} ...", file=sys.stderr, flush=True)
    with EmulatorProcess(0, rate_limit=plan.limit, rate_window_s=plan.window_s) as emu:
        start_at = time.time() + 3.0  # every process imported and ready before the first request
        child = {
            "case": "deliver_only",
            "manifest": plan.manifest,
            "base_url": emu.base_url,
            "api_key": API_KEY,
            "workdir": str(workdir),
            "in_flight": in_flight,
            "start_at": start_at,
        }
        if plan.share is not None:
            child.update(max_rate_share=plan.share, state_dir=str(workdir / "state"))
        sampler = StatsSampler(emu)
        sampler.start()
        try:
            results = run_children([child] * plan.processes)
        finally:
            sampler.stop()
        stats = emu.stats()
    requests, refused = stats["requests"], stats["by_status"].get("429", 0)
    errors = [result["error"] for result in results if "error" in result]
    row = Row(
        label,
        rows=sum(result.get("rows", 0) for result in results),
        seconds=max(result.get("seconds", 0.0) for result in results),
        objects=sum(result.get("objects", 0) for result in results),
        requests=requests,
        r429=refused,
        peak_rss_mib=max(result.get("peak_rss_mib", 0.0) for result in results),
        extra={"load_1min": os.getloadavg()[0], "processes": plan.processes, "share": plan.share},
    )
    if errors:
        row.note, row.extra["error"] = errors[0], errors[0]
        return row
    used = window_share(sampler.samples, plan.limit, plan.window_s)
    allowed = plan.share or 1.0
    row.extra.update(
        used=used["share"],
        of_allowed=used["share"] / allowed,
        windows=used["windows"],
        leases=sum(result.get("leases", 0) for result in results),
        looks=sum(result.get("looks", 0) for result in results),
    )
    row.note = (
        f"{used['share']:.1%} of the limit used over {used['windows']} whole windows "
        f"({used['share'] / allowed:.1%} of the share allowed); "
        f"{refused / max(requests, 1):.2%} of requests answered 429"
    )
    if plan.share is not None:
        row.note += f"; {row.extra['leases']:,} leases, {row.extra['looks']:,} store looks"
    print(f"  {row.note}", file=sys.stderr, flush=True)
    return row


def section(rows: list[Row], load_before: tuple, load_after: tuple, minutes: float) -> str:
    """The RESULTS.md section: the table, then the targets of the shared budget."""
    backend = "PostgreSQL" if os.environ.get(STATE_URL_ENV) else "a locked file"
    setup = (
        f"`python -m benchmarks.run --case shared-budget` — {minutes:.1f} min; the budget in "
        f"{backend}; each delivery (75 attributes per request) in a process of its own against "
        "an emulator of its own (0 ms); the share is measured over the emulator's whole windows; "
        f"load average (1/5/15 min) {loads(load_before, load_after)}."
    )
    return section_text("One Braze budget per workspace", setup, rows, targets(rows))


def targets(rows: list[Row]):
    for row in rows:
        if row.extra.get("processes", 1) > 1 and row.extra.get("share") and "used" in row.extra:
            share, refused = row.extra["share"], (row.r429 or 0) / max(row.requests or 0, 1)
            yield (
                f"{row.case}: ≥ 90% of the share allowed, ≤ {share:.0%} of the limit, ≤ 1% 429s",
                f"{row.extra['of_allowed']:.1%} of the share, {row.extra['used']:.1%} of the limit, "
                f"{refused:.2%} 429s",
                row.extra["of_allowed"] >= 0.9 and row.extra["used"] <= share + 0.005 and refused <= 0.01,
            )
