"""Sending only what changed, measured in one run: `python -m benchmarks.run --case attribute-diff`.

* a snapshot attributes table (every user, four attributes), synced once, then restamped whole
  with 1% of its attribute values changed and synced again against the same state: data points
  and wall time of the second run against the first's;
* the diff's own cost: the delta phase of a table with no unchanged rows, with the diff and
  without it (`send: full_payload`), alternately, each on a fresh state.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import duckdb

from benchmarks.child import run_children
from benchmarks.emulator import API_KEY, EmulatorProcess
from benchmarks.report import Row, loads
from benchmarks.report import section as section_text
from braze_assets.attribute_diff import AttributeDiff
from braze_assets.braze.client import BrazeClient
from braze_assets.datatypes import DATA_TYPES
from braze_assets.delivery import Delivery
from braze_assets.delta import DeltaManifest, compute_delta
from braze_assets.sources.duckdb_source import DuckDBSource
from braze_assets.state import EmbeddedStateStore, StateStore

UTC = dt.UTC
TABLE = "cdi_snapshot"
CHANGED_SHARE = 0.01  # of attribute values, per restamp
ATTRIBUTES = 4


def write_snapshot(db: str, users: int, stamp: dt.datetime, changed: int = 0) -> None:
    """The snapshot: `users` rows stamped `stamp`; `changed` > 0 bumps the points of that many
    users (one attribute each) before restamping, as a day of a CRM does."""
    with duckdb.connect(db) as con:
        if not changed:
            con.execute(f"DROP TABLE IF EXISTS {TABLE}")
            con.execute(
                f"CREATE TABLE {TABLE} AS SELECT TIMESTAMP '2000-01-01' AS UPDATED_AT, "
                "'member-' || i AS EXTERNAL_ID, NULL::VARCHAR AS ALIAS_NAME, NULL::VARCHAR AS ALIAS_LABEL, "
                "NULL::VARCHAR AS BRAZE_ID, NULL::VARCHAR AS EMAIL, NULL::VARCHAR AS PHONE, "
                "i % 5000 AS points, ['free', 'pro', 'team'][1 + i % 3] AS plan, "
                "['Oslo', 'Lyon', 'Osaka', 'Lima'][1 + i % 4] AS city, i % 2 = 0 AS vip "
                f"FROM range({users}) t(i)"
            )
        else:
            step = max(1, users // changed)
            con.execute(f"UPDATE {TABLE} SET points = points + 10 WHERE hash(EXTERNAL_ID) % {step} = 0")
        con.execute(f"UPDATE {TABLE} SET UPDATED_AT = ?", [stamp.replace(tzinfo=None)])
        con.execute(
            f"CREATE OR REPLACE VIEW {TABLE}_cdi AS SELECT UPDATED_AT, EXTERNAL_ID, ALIAS_NAME, ALIAS_LABEL, "
            "BRAZE_ID, EMAIL, PHONE, json_object('points', points, 'plan', plan, 'city', city, "
            f"'vip', vip)::VARCHAR AS PAYLOAD FROM {TABLE}"
        )


def _delta(db: str, store: StateStore, run_dir: Path, diff: bool) -> tuple[DeltaManifest, float]:
    now = dt.datetime.now(UTC)
    run_id = uuid.uuid4().hex
    manifest = DeltaManifest(
        sync=store.sync,
        data_type="attributes",
        run_id=run_id,
        window_start=None,
        window_end=now.isoformat(),
        reaches_now=True,
        valid_path=str(run_dir / f"{run_id}-valid.parquet"),
        rejected_path=str(run_dir / f"{run_id}-rejected.parquet"),
        unchanged_path=str(run_dir / f"{run_id}-unchanged.parquet") if diff else None,
    )
    started = time.perf_counter()
    compute_delta(
        source=DuckDBSource(db, f"{TABLE}_cdi"),
        spec=DATA_TYPES["attributes"],
        store=store,
        manifest=manifest,
        window_start=None,
        window_end=now,
        now=now,
        partitions_start=now - dt.timedelta(days=60),
        update_existing_only=False,
        diff=AttributeDiff() if diff else None,
    )
    return manifest, time.perf_counter() - started


def snapshot_runs(db: str, base_url: str, api_key: str, workdir: str, in_flight: int, users: int) -> dict:
    """Two syncs of the snapshot against one state: first whole, then restamped with 1% changed."""
    run_dir = Path(workdir) / uuid.uuid4().hex
    store = EmbeddedStateStore(run_dir / "state", "bench_snapshot")
    now = dt.datetime.now(UTC)
    write_snapshot(db, users, now - dt.timedelta(hours=2))
    runs = []
    for n in (1, 2):
        if n == 2:
            write_snapshot(
                db, users, now - dt.timedelta(hours=1), changed=int(users * ATTRIBUTES * CHANGED_SHARE)
            )
        started = time.perf_counter()
        manifest, delta_s = _delta(db, store, run_dir, diff=True)
        outcome = Delivery(
            spec=DATA_TYPES["attributes"],
            store=store,
            manifest=manifest,
            client=BrazeClient(base_url, api_key, max_connections=in_flight),
            policy="resend",
            max_in_flight=in_flight,
            run_id=manifest.run_id,
            log=lambda _: None,
        ).run()
        runs.append(
            {
                "seconds": time.perf_counter() - started,
                "delta_s": delta_s,
                "accepted": outcome.accepted,
                "unchanged": outcome.unchanged,
                "data_points": outcome.estimated_data_points,
                "saved": outcome.data_points_saved,
                "requests": outcome.requests,
            }
        )
        print(f"    [snapshot run {n}] {runs[-1]}", file=sys.stderr, flush=True)
    first, second = runs
    return {
        "objects": first["accepted"] + second["accepted"],
        "rows": users,
        "seconds": first["seconds"],
        "first": first,
        "second": second,
    }


#: Delta phases measured with the diff and without, alternately: this host's speed varies by
#: tens of percent from minute to minute, so one pair says little.
COST_REPEATS = 5


def diff_cost(db: str, workdir: str, users: int, repeats: int = COST_REPEATS) -> dict:
    """The delta phase of a table with no unchanged rows (a fresh state), with and without the
    diff, alternately: the medians, and every timing."""
    write_snapshot(db, users, dt.datetime.now(UTC) - dt.timedelta(hours=1))
    timings: dict[str, list[float]] = {"diff": [], "full_payload": []}
    for _ in range(repeats):
        for name in ("full_payload", "diff"):
            run_dir = Path(workdir) / uuid.uuid4().hex
            _, seconds = _delta(
                db, EmbeddedStateStore(run_dir / "state", "bench_cost"), run_dir, diff=name == "diff"
            )
            timings[name].append(seconds)
    medians = {k: statistics.median(v) for k, v in timings.items()}
    return {"objects": 0, "rows": users, "seconds": medians["diff"], "medians": medians, "timings": timings}


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def run(workdir: Path, users: int, in_flight: int) -> tuple[list[Row], str]:
    """Both measurements, each in a process of its own; the RESULTS.md section."""
    workdir.mkdir(parents=True, exist_ok=True)  # `--workdir` may name a directory not made yet
    db = str(workdir / "snapshot.duckdb")
    load_before = os.getloadavg()
    with EmulatorProcess(latency_ms=0) as emu:
        [runs] = run_children(
            [
                {
                    "case": "snapshot_runs",
                    "db": db,
                    "base_url": emu.base_url,
                    "api_key": API_KEY,
                    "workdir": str(workdir),
                    "in_flight": in_flight,
                    "users": users,
                }
            ]
        )
    [cost] = run_children([{"case": "diff_cost", "db": db, "workdir": str(workdir), "users": users}])
    if "error" in runs or "error" in cost:
        return [], f"## Sending only what changed\n\nfailed: {runs.get('error') or cost.get('error')}"
    first, second = runs["first"], runs["second"]
    points = second["data_points"] / first["data_points"]
    wall = second["seconds"] / first["seconds"]
    throughput = cost["medians"]["full_payload"] / cost["medians"]["diff"]
    rows = [
        Row(
            case=name,
            rows=users,
            seconds=one["seconds"],
            objects=one["accepted"],
            requests=one["requests"],
            peak_rss_mib=runs.get("peak_rss_mib"),
        )
        for name, one in (("snapshot, first sync", first), ("snapshot, restamped (1% changed)", second))
    ]
    setup = (
        f"{users:,} users x {ATTRIBUTES} attributes, embedded state, emulator at 0 ms, no limit; then every "
        f"row restamped with {CHANGED_SHARE:.0%} of the attribute values changed. First run: "
        f"{first['data_points']:,} data points in {first['seconds']:.1f} s (delta {first['delta_s']:.1f} s). "
        f"Second: {second['data_points']:,} sent, {second['saved']:,} saved, {second['unchanged']:,} rows "
        f"unchanged, in {second['seconds']:.1f} s (delta {second['delta_s']:.1f} s). Delta phase, no "
        f"unchanged rows: {cost['medians']['full_payload']:.2f} s without the diff, "
        f"{cost['medians']['diff']:.2f} s with it (medians of {len(cost['timings']['diff'])}; each run, "
        f"without: {_seconds(cost['timings']['full_payload'])}; "
        f"with: {_seconds(cost['timings']['diff'])}). Load: "
        f"{loads(load_before, os.getloadavg())}."
    )
    targets = [
        ("second run's data points <= 1.5% of the first's", f"{points:.2%}", points <= 0.015),
        ("second run's wall time <= 20% of the first's", f"{wall:.1%}", wall <= 0.20),
        ("delta throughput with the diff >= 85% of without", f"{throughput:.1%}", throughput >= 0.85),
    ]
    return rows, section_text("Sending only what changed (attribute diff)", setup, rows, targets)
