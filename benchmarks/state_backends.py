"""The two state backends, measured in one run: `python -m benchmarks.run --case state-backends`.

* delivery throughput: the same events delta delivered (and, separately, computed and delivered
  end to end) with the embedded backend and with PostgreSQL, alternately, each in a process of
  its own against one emulator (0 ms, no limit), so the ratio compares like with like;
* the ledger probe: `known_hashes` of a 20,000-row batch (half settled, half not) against a ledger
  of 10M rows, as the delta asks it (the batch's UPDATED_AT span) and as delivery asks it (rows
  settled since the delta was computed), on both backends.
* the same e2e runs again with the sync and the emulator confined to one core and the server to
  another (`APART`): the server on cores of its own, as in production, so the ratio shows what
  the backend costs the sync itself; the rounds above show what it costs a machine it shares.

PostgreSQL is a throw-away local server (braze_assets_tests/postgres_server.py) with `fsync` on,
as a production server has it.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

from benchmarks.child import run_children
from benchmarks.emulator import API_KEY, EmulatorProcess, pin_process
from benchmarks.report import Row, loads
from benchmarks.report import section as section_text
from braze_assets.state import open_state_store

UTC = dt.UTC
PROBE_BATCH = 20_000
T0 = dt.datetime(2024, 1, 1, tzinfo=UTC)


def ledger_probe(ledger_rows: int, workdir: str, state_url: str | None = None, repeats: int = 7) -> dict:
    """Fill a ledger with `ledger_rows` settled rows (in SQL, seconds for millions; each settled a
    day after its UPDATED_AT, long ago, as a ledger's rows are), then time `known_hashes` of
    20,000-row batches: the median of `repeats`."""
    sync = "probe"
    store = open_state_store(Path(workdir) / uuid.uuid4().hex, sync, state_url=state_url)
    started = time.perf_counter()
    _fill(store, sync, ledger_rows)
    fill_s = time.perf_counter() - started
    rng = random.Random(7)
    timings: dict[str, list[float]] = {"delta (UPDATED_AT span)": [], "delivery (settled since)": []}
    found = []
    with store.session() as ledger:
        for _ in range(repeats):
            first = rng.randrange(0, ledger_rows - PROBE_BATCH)
            # a delta batch: consecutive rows (one UPDATED_AT span), half already settled
            present = [_hash(i) for i in range(first, first + PROBE_BATCH // 2)]
            absent = [_hash(ledger_rows + first + i) for i in range(PROBE_BATCH // 2)]
            span = (_stamp(first, ledger_rows), _stamp(first + PROBE_BATCH, ledger_rows))
            t = time.perf_counter()
            found.append(len(ledger.known_hashes(present + absent, between=span)))
            timings["delta (UPDATED_AT span)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            ledger.known_hashes(present + absent, since=dt.datetime.now(UTC) - dt.timedelta(minutes=5))
            timings["delivery (settled since)"].append(time.perf_counter() - t)
    assert set(found) == {PROBE_BATCH // 2}, f"the probe found {found}, not {PROBE_BATCH // 2} each time"
    return {
        "objects": 0,
        "rows": ledger_rows,
        "seconds": fill_s,
        "probe_ms": {k: statistics.median(v) * 1000 for k, v in timings.items()},
    }


def _hash(i: int) -> str:
    return f"{i:032x}"


def _stamp(i: int, n: int) -> dt.datetime:
    """Row i's UPDATED_AT: n rows spread over 30 days in order."""
    return T0 + dt.timedelta(microseconds=int(i * 30 * 86_400e6 / n))


def _fill(store, sync: str, n: int) -> None:
    span_us = int(30 * 86_400e6 / n)
    if hasattr(store, "connect"):  # embedded: DuckDB
        with store.connect() as con:
            con.execute(
                "INSERT INTO ledger (row_hash, updated_at, status, batch_id, identifier, message, run_id, "
                "changed_at) SELECT lpad(printf('%x', i), 32, '0'), "
                f"TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_microseconds(i * {span_us}), 'accepted', "
                "'b-' || (i // 75)::VARCHAR, 'u***', NULL, 'bench', "
                f"TIMESTAMPTZ '2024-01-02 00:00:00+00' + to_microseconds(i * {span_us}) FROM range(?) t(i)",
                [n],
            )
        return
    with store._cursor() as cursor:
        cursor.execute(
            "INSERT INTO ledger (sync, row_hash, updated_at, status, batch_id, identifier, message, "
            "run_id, changed_at) SELECT %s, lpad(to_hex(i), 32, '0'), "
            "timestamptz '2024-01-01 00:00:00+00' + make_interval(secs => i::bigint * %s / 1e6), 'accepted', "
            "'b-' || (i / 75)::text, 'u***', NULL, 'bench', "
            "timestamptz '2024-01-02 00:00:00+00' + make_interval(secs => i::bigint * %s / 1e6) "
            "FROM generate_series(0, %s - 1) i",
            (sync, span_us, span_us, n),
        )
        cursor.execute("ANALYZE ledger")


def _server_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (the benchmark's server is the only one),
    by the executable's name, not the command line: `benchmarks.run --state postgresql` has it
    too, and its CPU includes every finished case's (children's) CPU."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "postgres":
                pids.append(int(pid))
        except OSError:
            continue  # ended meanwhile
    return pids


def server_cpu_s() -> float:
    """CPU seconds used so far by the PostgreSQL server: what the state backend costs the machine
    beside the sync itself."""
    total = 0
    for pid in _server_pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def _pin_server(cpus: set[int]) -> None:
    """Confine the server to `cpus`: the postmaster, whose new backends inherit it, and every
    process it already runs."""
    for pid in _server_pids():
        pin_process(pid, cpus)


def run(db: str, table_name: str, workdir: Path, quick: bool, in_flight: int) -> list[Row]:
    """Both cases, both backends, one server and one emulator."""
    from braze_assets_tests.postgres_server import throwaway_postgres

    rows: list[Row] = []
    ledger_rows = 200_000 if quick else 10_000_000
    with throwaway_postgres(fsync=True) as pg, EmulatorProcess(latency_ms=0) as emu:
        url = f"postgresql://{pg['user']}@{pg['host']}:{pg['port']}/{pg['database']}"
        case = {"db": db, "table": table_name, "workdir": str(workdir), "in_flight": in_flight}
        rounds = 1 if quick else 2
        rows += _e2e_rounds(emu, case, url, rounds)
        rows += _server_apart(case, url, rounds)
        for backend, state_url in (("embedded", None), ("postgresql", url)):
            print(f"  filling a {ledger_rows:,}-row ledger ({backend}) ...", file=sys.stderr, flush=True)
            result = run_children(
                [
                    {
                        "case": "ledger_probe",
                        "ledger_rows": ledger_rows,
                        "workdir": str(workdir),
                        "state_url": state_url,
                    }
                ]
            )[0]
            row = Row(
                f"ledger probe, state {backend}",
                rows=ledger_rows,
                seconds=result.get("seconds", 0.0),
                peak_rss_mib=result.get("peak_rss_mib"),
                note="; ".join(f"{k}: {v:.1f} ms" for k, v in result.get("probe_ms", {}).items())
                or result.get("error", ""),
                extra={**result, "backend": backend},
            )
            rows.append(row)
    return rows


#: The e2e rows measured with the server on a core the sync does not use.
APART = "sync on one core, server on another"


def _e2e_rounds(
    emu: EmulatorProcess, case: dict, url: str, rounds: int, cpus: list[int] | None = None
) -> list[Row]:
    """The e2e events case on each backend, alternated `rounds` times so a load change hits both
    alike; `cpus`: the cores the sync is confined to (None: every core)."""
    rows: list[Row] = []
    for n in range(rounds):
        for backend, state_url in (("embedded", None), ("postgresql", url)):
            params = {**case, "case": "end_to_end", "data_type": "events", "state_url": state_url}
            params.update(base_url=emu.base_url, api_key=API_KEY)
            if cpus is not None:
                params["cpus"] = cpus
            cpu = server_cpu_s()
            result = run_children([params])[0]
            result["server_cpu_s"] = server_cpu_s() - cpu
            layout = "" if cpus is None else f", {APART}"
            rows.append(
                _row(f"e2e events, state {backend}{layout} #{n + 1}", result, backend, cpus is not None)
            )
            emu.reset()
    return rows


def _server_apart(case: dict, url: str, rounds: int) -> list[Row]:
    """The same e2e runs with the sync and the emulator confined to one core and the server to
    another, as production has it: the server on a machine of its own, so what the backend costs
    the sync is its round trips and waits, not the server's CPU taken from the sync's cores. On
    a machine of one core there is nothing to measure."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return []
    sync_cpu, server_cpu = cores[0], cores[1]
    with EmulatorProcess(latency_ms=0) as emu:
        emu.pin({sync_cpu})
        _pin_server({server_cpu})
        try:
            return _e2e_rounds(emu, case, url, rounds, cpus=[sync_cpu])
        finally:
            _pin_server(set(cores))


def _row(name: str, result: dict, backend: str, apart: bool = False) -> Row:
    return Row(
        name,
        data_type="events",
        rows=result.get("rows", 0),
        seconds=result.get("seconds", 0.0),
        objects=result.get("objects", 0),
        requests=result.get("requests"),
        peak_rss_mib=result.get("peak_rss_mib"),
        note=result.get(
            "error",
            f"delta {result.get('delta_s', 0):.1f} s, delivery {result.get('delivery_s', 0):.1f} s; "
            f"PostgreSQL server CPU {result.get('server_cpu_s', 0):.1f} s",
        ),
        extra={**result, "backend": backend, "apart": apart},
    )


def section(rows: list[Row], load_before: tuple, load_after: tuple, minutes: float) -> str:
    setup = (
        f"`python -m benchmarks.run --case state-backends` — {minutes:.1f} min; PostgreSQL: a local "
        "server with fsync on; emulator at 0 ms, no rate limit; each case in a process of its own; "
        f"load average {loads(load_before, load_after)}. The ledger probe is the median of 7 batches "
        f"of {PROBE_BATCH:,} hashes, half of them settled; the fill is the row's seconds."
    )
    return section_text("State backends: embedded and PostgreSQL", setup, rows, targets(rows))


def targets(rows: list[Row]):
    def best(backend: str, apart: bool) -> float:
        return max(
            (
                r.objects_per_s
                for r in rows
                if r.case.startswith("e2e")
                and r.extra.get("backend") == backend
                and r.extra.get("apart", False) == apart
            ),
            default=0.0,
        )

    for apart, where in ((False, "every process on the same 2 cores"), (True, APART)):
        embedded, postgres = best("embedded", apart), best("postgresql", apart)
        if embedded and postgres:
            ratio = postgres / embedded
            yield (
                f"PostgreSQL end-to-end throughput ≥ 90% of the embedded backend's ({where})",
                f"{postgres:,.0f} vs {embedded:,.0f} objects/s: {ratio:.0%}",
                ratio >= 0.9,
            )
    for row in rows:
        if row.case == "ledger probe, state postgresql" and "probe_ms" in row.extra:
            worst = max(row.extra["probe_ms"].values())
            yield (
                f"ledger probe per {PROBE_BATCH:,}-row batch ≤ 50 ms at {row.rows:,} rows (PostgreSQL)",
                f"{worst:.1f} ms (the slower of the two probes)",
                worst <= 50 and row.rows >= 10_000_000,
            )
