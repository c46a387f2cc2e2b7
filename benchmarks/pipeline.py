"""braze_assets itself, driven without Dagster exactly as its assets drive it: `compute_delta` from
the DuckDB table, then `Delivery.run()` to the emulator (see braze_assets/assets.py)."""

from __future__ import annotations

import cProfile
import datetime as dt
import io
import pstats
import sys
import time
import uuid
from pathlib import Path

import orjson

from benchmarks.child import peak_rss_mib
from braze_assets.attribute_diff import AttributeDiff
from braze_assets.braze.budget_stores import budget_store_from_environment
from braze_assets.braze.client import BrazeClient
from braze_assets.datatypes import DATA_TYPES
from braze_assets.delivery import Delivery
from braze_assets.delta import DeltaManifest, compute_delta
from braze_assets.delta_batch import BatchJob, prepare_batch
from braze_assets.delta_workers import PreparePool
from braze_assets.sources.duckdb_source import DuckDBSource
from braze_assets.state import EmbeddedStateStore, StateStore, open_state_store

UTC = dt.UTC


def _own_schema(state_url: str | None, run_id: str) -> str | None:
    """The URL with a schema of this case's own, so every case starts with an empty ledger."""
    return f"{state_url}{'&' if '?' in state_url else '?'}schema=bench_{run_id[:12]}" if state_url else None


class _Throttled:
    """Progress lines to stderr, at most one every `every_s` seconds."""

    def __init__(self, label: str, every_s: float = 5.0):
        self.label, self.every_s, self.last = label, every_s, 0.0

    def __call__(self, message: str) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            print(f"    [{self.label}] {message}", file=sys.stderr, flush=True)


def end_to_end(
    db: str,
    table: str,
    data_type: str,
    base_url: str,
    api_key: str,
    workdir: str,
    in_flight: int,
    profile: bool = False,
    state_url: str | None = None,
    diff: bool = False,
) -> dict:
    """Delta then delivery of `table`, with a fresh state (embedded, or PostgreSQL at `state_url`
    in a schema of its own). `diff`: an attributes sync sending only what changed, the default
    of a real sync (on a first sync every attribute is new, so everything goes)."""
    spec = DATA_TYPES[data_type]
    run_id = uuid.uuid4().hex
    run_dir = Path(workdir) / run_id
    store = open_state_store(
        run_dir / "state", f"bench_{data_type}", state_url=_own_schema(state_url, run_id)
    )
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started, cpu_started = time.perf_counter(), time.process_time()
    manifest = _compute_delta(db, table, data_type, run_dir, run_id, store, diff=diff)
    delta_s, delta_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    rss_after_delta = peak_rss_mib()
    client = BrazeClient(base_url, api_key, max_connections=in_flight)
    delivery = Delivery(
        spec=spec,
        store=store,
        manifest=manifest,
        client=client,
        policy="resend" if data_type == "attributes" else "hold",
        max_in_flight=in_flight,
        run_id=run_id,
        log=_Throttled(f"{data_type} delivery", every_s=0),
    )
    outcome = delivery.run()
    total_s = time.perf_counter() - started
    delivery_cpu_s = time.process_time() - cpu_started - delta_cpu_s
    (run_dir / "manifest.json").write_bytes(orjson.dumps(manifest.to_dict()))
    result = {
        "objects": outcome.accepted,
        "rows": manifest.rows_read,
        "seconds": total_s,
        "requests": outcome.requests,
        "r429": outcome.rate_limited,
        "delta_s": delta_s,
        "delivery_s": total_s - delta_s,
        # this process's CPU, every thread (the delta's worker processes are not counted)
        "delta_cpu_s": delta_cpu_s,
        "delivery_cpu_s": delivery_cpu_s,
        "peak_rss_delta_mib": rss_after_delta,
        "valid": manifest.valid,
        "rejected": manifest.rejected,
        "failed": outcome.failed,
        "ambiguous": outcome.ambiguous,
        "not_sent": outcome.not_sent,
        "attempts": outcome.attempts,
        "manifest": str(run_dir / "manifest.json"),
    }
    if profiler:
        profiler.disable()
        result["profile"] = _top(profiler)
    return result


def _compute_delta(
    db: str, table: str, data_type: str, run_dir: Path, run_id: str, store: StateStore, diff: bool = False
) -> DeltaManifest:
    """`compute_delta` of the whole table (the last 60 days, up to a day ahead) into `run_dir`."""
    now = dt.datetime.now(UTC)
    manifest = DeltaManifest(
        sync=store.sync,
        data_type=data_type,
        run_id=run_id,
        window_start=None,
        window_end=(now + dt.timedelta(days=1)).isoformat(),
        reaches_now=True,
        valid_path=str(run_dir / "valid.parquet"),
        rejected_path=str(run_dir / "rejected.parquet"),
        unchanged_path=str(run_dir / "unchanged.parquet") if diff else None,
    )
    compute_delta(
        source=DuckDBSource(db, table),
        spec=DATA_TYPES[data_type],
        store=store,
        manifest=manifest,
        window_start=None,
        window_end=now + dt.timedelta(days=1),
        now=now,
        partitions_start=now - dt.timedelta(days=60),
        update_existing_only=False,
        diff=AttributeDiff() if diff else None,
        progress=_Throttled(f"{data_type} delta"),
    )
    return manifest


def delta_only(db: str, table: str, data_type: str, workdir: str) -> dict:
    """`compute_delta` alone (nothing is sent): the manifest later cases deliver."""
    run_id = uuid.uuid4().hex
    run_dir = Path(workdir) / run_id
    started = time.perf_counter()
    store = EmbeddedStateStore(run_dir / "state", f"bench_{data_type}")
    manifest = _compute_delta(db, table, data_type, run_dir, run_id, store)
    (run_dir / "manifest.json").write_bytes(orjson.dumps(manifest.to_dict()))
    return {
        "objects": 0,
        "rows": manifest.rows_read,
        "seconds": time.perf_counter() - started,
        "manifest": str(run_dir / "manifest.json"),
    }


def deliver_only(
    manifest: str,
    base_url: str,
    api_key: str,
    workdir: str,
    in_flight: int,
    start_at: float | None = None,
    max_rate_share: float | None = None,
    state_dir: str | None = None,
    state_url: str | None = None,
) -> dict:
    """`Delivery.run()` of a delta another case computed, with a fresh ledger (nothing settled;
    embedded, or PostgreSQL at `state_url` in a schema of its own).
    With `max_rate_share`, through the budget shared by processes (in `state_dir`, or PostgreSQL
    when BRAZE_ASSETS_STATE_URL is set); `start_at` (epoch seconds) lines up several processes."""
    delta = DeltaManifest(**orjson.loads(Path(manifest).read_bytes()))
    run_id = uuid.uuid4().hex
    store = open_state_store(
        Path(workdir) / run_id / "state", f"bench_{delta.data_type}", state_url=_own_schema(state_url, run_id)
    )
    client = BrazeClient(
        base_url,
        api_key,
        max_connections=in_flight,
        budget_store=(
            None if max_rate_share is None else budget_store_from_environment(Path(state_dir or workdir))
        ),
        max_rate_share=max_rate_share or 1.0,
    )
    delivery = Delivery(
        spec=DATA_TYPES[delta.data_type],
        store=store,
        manifest=delta,
        client=client,
        policy="resend" if delta.data_type == "attributes" else "hold",
        max_in_flight=in_flight,
        run_id=run_id,
        log=_Throttled(f"{delta.data_type} delivery", every_s=0),
    )
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    started, cpu_started = time.perf_counter(), time.process_time()
    outcome = delivery.run()
    budget = client.shared_budget(DATA_TYPES[delta.data_type].endpoint)
    return {
        "objects": outcome.accepted,
        "rows": delta.valid,
        "requests": outcome.requests,
        "seconds": time.perf_counter() - started,
        "delivery_cpu_s": time.process_time() - cpu_started,
        "r429": outcome.rate_limited,
        "attempts": outcome.attempts,
        "not_sent": outcome.not_sent,
        "leases": budget.leases if budget else 0,
        "looks": budget.looks if budget else 0,
        "lease_store_s": budget.store_s if budget else 0.0,
    }


def _top(profiler: cProfile.Profile, lines: int = 30) -> str:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)
    return text.getvalue()


def validation_only(
    db: str, table: str, data_type: str, rows: int, workers: int = 0, profile: bool = False
) -> dict:
    """Batch preparation over Arrow batches already in memory, without row hashes and Parquet.

    The product's own path, `prepare_batch`: row facts + pandera (`validate_batch`), the objects
    (`build_objects`, orjson), masking and lookup hashes, with Python's cycle collector paused
    per batch as the product pauses it (left on, it took a quarter of the time). `workers=0`: in
    this process, as a small delta does; otherwise on a `PreparePool` of that many worker
    processes, started and warmed up before the clock starts, as it is by the time a large delta
    needs it. `profile` (one process only):
    cProfile the timed loop, for the functions each row's time goes to (and a slower run)."""
    spec = DATA_TYPES[data_type]
    source = DuckDBSource(db, table)
    batches, loaded = [], 0
    for batch in source.scan(None, None, False, 20_000, columns=source.check_shape(spec)):
        batches.append(batch)
        loaded += batch.num_rows
        if loaded >= rows:
            break
    valid = 0
    job = BatchJob(spec, update_existing_only=False)
    hashes = [[f"{n}-{i}" for i in range(batch.num_rows)] for n, batch in enumerate(batches)]
    if workers:
        pool = PreparePool(job, workers)
        try:
            for _ in range(workers):  # every worker forked and its imports warm
                list(pool.submit(batches[0], hashes[0]))
            list(pool.drain())
            started = time.perf_counter()
            for batch, names in zip(batches, hashes, strict=True):
                valid += sum(p.valid.num_rows for p in pool.submit(batch, names) if p.valid is not None)
            valid += sum(p.valid.num_rows for p in pool.drain() if p.valid is not None)
            seconds = time.perf_counter() - started
        finally:
            pool.close()
        return {"objects": valid, "rows": loaded, "seconds": seconds, "workers": workers}
    prepare_batch(job, batches[0], hashes[0])  # warm, as the pool is
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started = time.perf_counter()
    for batch, names in zip(batches, hashes, strict=True):
        valid += sum(p.valid.num_rows for p in prepare_batch(job, batch, names) if p.valid is not None)
    seconds = time.perf_counter() - started
    result: dict[str, object] = {"objects": valid, "rows": loaded, "seconds": seconds, "workers": 0}
    if profiler:
        profiler.disable()
        result["profile"] = _top(profiler, lines=15)
    return result
