"""Benchmark braze_assets against the local Braze emulator and the alternatives, in one command.

    .venv/bin/python -m benchmarks.run [--rows 1000000] [--quick] [--profile]

Generates CDI tables in a DuckDB file, starts the emulator (its CLI, `--lean`) in its own process,
runs every case in a child process of its own (so each peak RSS is that case's), prints a table and
writes `benchmarks/RESULTS.md`. Cases (ratios are always taken within one run):

* raw ceiling - minimal aiohttp sender, pre-built bodies: the emulator's own limit;
* braze_assets e2e - `compute_delta` + `Delivery.run()` from DuckDB to the emulator;
* naive sequential `requests` loop, and `braze-client` from PyPI, time-boxed (install it with
  `pip install --no-deps braze-client==2.3.3`: it pins tenacity<6 yet runs with 9; without it
  that row says so);
* rate-limited - Braze's real limit (3,000 requests / 3 s): share of it used, share of 429s;
  and a pacing check at a limit below the sender's speed, so the share measures the pacing;
* validation + payload building alone; memory at 1x, 5x and 20x rows (`--case throughput`: 5x);
* one Braze budget per workspace (shared_budget.py): one process with and without the budget
  shared by processes, and three syncs in three processes sharing it (`--case shared-budget`
  runs only this one);
* the state backends (state_backends.py, `--case state-backends` only): embedded against
  PostgreSQL, delivery throughput and the ledger probe at 10M rows;
* sending only what changed (attribute_diff.py, `--case attribute-diff` only): a restamped
  snapshot's second sync against its first, and the diff's cost in the delta phase;
* memory (`--case memory` only): peak RSS of one run at 5x and 20x rows (attributes).
`--state postgresql` keeps every run's state in a local PostgreSQL server instead.
Each at 0 ms and at 50 ms of emulator latency where it makes sense (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import attribute_diff, data, report, shared_budget, state_backends
from benchmarks.child import run_children
from benchmarks.emulator import API_KEY, EmulatorProcess
from benchmarks.rate import StatsSampler, window_share
from benchmarks.report import Row
from benchmarks.summary import summary, targets_table
from braze_assets.delta_workers import configured_workers

HERE = Path(__file__).resolve().parent
BRAZE_LIMIT, BRAZE_WINDOW_S = 3000, 3.0
PACING_LIMIT = 300  # per 3 s: 100 requests/s, below what braze_assets sends unlimited here
STATE_SHOWN = {"embedded": "embedded", "postgresql": "PostgreSQL (local server, fsync on)"}
MEMORY_MULTIPLES = (5, 20)  # memory cases (the whole run and `--case memory`), times --rows
SMALL_TABLE = f"{data.TABLES['attributes']}_small"  # min(rows, 200k): pacing check and profile


def sized_table(times: int) -> str:
    """The attributes table of `times` x --rows rows (the memory cases)."""
    return f"{data.TABLES['attributes']}_{times}x"


def run_child(params: dict) -> dict:
    """Run one case in a fresh interpreter; its progress goes to our stderr."""
    return run_children([params])[0]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.workdir = args, workdir
        self.db = str(workdir / "warehouse.duckdb")
        self.rows: list[Row] = []
        self.manifest: str | None = None  # the 0 ms attributes delta, re-delivered rate-limited
        self.profile = ""
        self.validation_profiles: dict[str, str] = {}
        self.budget_rows: list[Row] = []
        self.state_rows: list[Row] = []
        self.state_section = ""
        self.budget_section = ""
        #: `--state postgresql`: the PostgreSQL URL every run's state goes to (None: embedded)
        self.state_url: str | None = None

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        shown = (
            "skipped"
            if row.extra.get("skipped")
            else row.extra.get("error") or f"{row.objects_per_s:,.0f} objects/s in {row.seconds:,.1f} s"
        )
        print(f"  {row.case} [{row.data_type}, {row.latency_ms:g} ms]: {shown}", file=sys.stderr, flush=True)
        return row

    def case(
        self,
        emu: EmulatorProcess | None,
        name: str,
        params: dict,
        *,
        data_type="attributes",
        rows: int = 0,
        note: str = "",
    ) -> Row:
        print(f"- {name} [{data_type}, {emu.latency_ms if emu else 0:g} ms] ...", file=sys.stderr, flush=True)
        if emu is not None:
            emu.reset()
            params = {**params, "base_url": emu.base_url, "api_key": API_KEY}
        if self.state_url and params["case"] in ("end_to_end", "deliver_only"):
            params = {**params, "state_url": self.state_url}
        emulator_cpu = emu.cpu_s() if emu is not None else 0.0
        server_cpu = state_backends.server_cpu_s() if self.state_url else 0.0
        result = run_child(params)
        if emu is not None:
            result["emulator_cpu_s"] = emu.cpu_s() - emulator_cpu
        if self.state_url:  # the state's server shares the cores too
            result["state_server_cpu_s"] = state_backends.server_cpu_s() - server_cpu
        row = Row(
            name,
            data_type,
            emu.latency_ms if emu else 0.0,
            result.get("rows", rows),
            result.get("seconds", 0.0),
            result.get("objects", 0),
            peak_rss_mib=result.get("peak_rss_mib"),
            note=note,
            extra=result,
        )
        if emu is not None:
            stats = emu.stats()
            row.requests, row.r429 = stats["requests"], stats["by_status"].get("429", 0)
        if "error" in result:
            row.note = result["error"]
        elif "unavailable" in result:
            row.note, row.extra["skipped"] = result["unavailable"], True
        row.extra["load_1min"] = os.getloadavg()[0]
        return self.add(row)

    # ----------------------------------------------------------------------------- the cases
    def raw_ceiling(self, emu: EmulatorProcess) -> Row:
        return self.case(
            emu,
            "raw ceiling",
            {
                "case": "raw_ceiling",
                "db": self.db,
                "table": data.TABLES["attributes"],
                "rows": self.args.rows,
            },
            rows=self.args.rows,
            note="aiohttp, 64 connections, pre-built 75-object bodies",
        )

    def e2e(
        self,
        emu: EmulatorProcess,
        data_type: str,
        table: str | None = None,
        name: str = "braze_assets e2e",
        profile: bool = False,
    ) -> Row:
        row = self.case(
            emu,
            name,
            {
                "case": "end_to_end",
                "db": self.db,
                "table": table or data.TABLES[data_type],
                "data_type": data_type,
                "workdir": str(self.workdir / "runs"),
                "in_flight": self.args.in_flight,
                "profile": profile,
            },
            data_type=data_type,
        )
        extra = row.extra
        if "delta_s" in extra:
            row.note = (
                f"delta {extra['rows'] / extra['delta_s']:,.0f} rows/s (peak RSS "
                f"{extra['peak_rss_delta_mib']:,.0f} MiB by its end) + delivery "
                f"{extra['objects'] / extra['delivery_s']:,.0f} objects/s; "
                f"{self.args.in_flight} in flight"
            )
            if extra["objects"] != extra["rows"]:
                row.note += f"; only {extra['objects']:,} of {extra['rows']:,} accepted"
        self.profile = extra.pop("profile", self.profile)
        return row

    def sequential(self, emu: EmulatorProcess, case: str, name: str) -> Row:
        row = self.case(
            emu,
            name,
            {
                "case": case,
                "db": self.db,
                "table": data.TABLES["attributes"],
                "rows": self.args.rows,
                "time_box_s": self.args.time_box,
            },
        )
        if row.extra.get("time_boxed"):
            row.note = f"time-boxed at {self.args.time_box:g} s"
        if row.extra.get("version"):
            row.case = f"{name} {row.extra['version']}"
        return row

    def rate_limited(self, latency_ms: float, limit: int, window_s: float, name: str, params: dict) -> Row:
        """Deliver under a rate limit while sampling the emulator's counters (see rate.py)."""
        with EmulatorProcess(latency_ms, rate_limit=limit, rate_window_s=window_s) as emu:
            sampler = StatsSampler(emu)
            sampler.start()
            try:
                row = self.case(
                    emu,
                    name,
                    {**params, "workdir": str(self.workdir / "runs"), "in_flight": self.args.in_flight},
                )
            finally:
                sampler.stop()
        if "error" not in row.extra:
            row.seconds = row.extra.get("delivery_s", row.seconds)  # the delivery phase only
            share = window_share(sampler.samples, limit, window_s)
            row.extra.update(share, limit_per_s=limit / window_s)
            row.note = (
                f"{share['share']:.1%} of the allowed rate over {share['windows']} whole "
                f"windows ({share['seconds']:.1f} s); {row.refused_share:.2%}"
                " of requests answered 429"
            )
        return row

    def _validation_params(self, data_type: str, **extra: object) -> dict:
        """One `validation_only` child: the data type's table, at most 200k rows in memory."""
        return {
            "case": "validation_only",
            "db": self.db,
            "table": data.TABLES[data_type],
            "data_type": data_type,
            "rows": min(self.args.rows, 200_000),
            **extra,
        }

    def validation(self) -> None:
        workers = configured_workers()
        for data_type in data.TABLES:
            for count in (0, workers) if workers else (0,):
                self.case(
                    None,
                    f"validation + payload, {count} workers" if count else "validation + payload, 1 process",
                    self._validation_params(data_type, workers=count),
                    data_type=data_type,
                    note=(
                        f"prepare_batch on a PreparePool of {count} processes (pandera, objects, masking, "
                        "lookup hashes), Arrow batches in memory, pool warm"
                        if count
                        else "prepare_batch in this process (pandera, objects, masking, lookup hashes), "
                        "Arrow batches in memory"
                    ),
                )

    def first_sync_limited(self) -> None:
        """A first sync of the 1x attributes table, delta and delivery, the diff on (the default),
        under Braze's real limit at 50 ms: how far from Braze's own floor the whole run is."""
        limit, window = (15, 1.0) if self.args.quick else (BRAZE_LIMIT, BRAZE_WINDOW_S)
        with EmulatorProcess(50, rate_limit=limit, rate_window_s=window) as emu:
            sampler = StatsSampler(emu)
            sampler.start()
            try:
                row = self.case(
                    emu,
                    f"first sync, rate-limited {limit}/{window:g} s",
                    {
                        "case": "end_to_end",
                        "db": self.db,
                        "table": data.TABLES["attributes"],
                        "data_type": "attributes",
                        "workdir": str(self.workdir / "runs"),
                        "in_flight": self.args.in_flight,
                        "diff": True,
                    },
                )
            finally:
                sampler.stop()
        extra = row.extra
        if "delta_s" in extra:
            floor = extra["rows"] / (limit / window * 75)
            share = window_share(sampler.samples, limit, window)
            extra.update(floor_s=floor, delivery_share=share["share"])
            row.note = (
                f"start to last answer {row.seconds:.1f} s = {row.seconds / floor:.2f}x Braze's floor "
                f"({floor:.1f} s at {limit / window * 75:,.0f} objects/s); delta {extra['delta_s']:.1f} s "
                f"+ delivery {extra['delivery_s']:.1f} s ({share['share']:.1%} of the allowed rate "
                f"over {share['windows']} whole windows); attribute diff on"
            )

    def shared_budget(self) -> None:
        """One budget per workspace: its own rows and section (see shared_budget.py)."""
        before, started = os.getloadavg(), time.monotonic()
        self.budget_rows = shared_budget.run(
            self.db, self.workdir / "budget", self.args.quick, self.args.in_flight
        )
        self.budget_section = shared_budget.section(
            self.budget_rows, before, os.getloadavg(), (time.monotonic() - started) / 60
        )

    def state_backends(self) -> None:
        """Embedded against PostgreSQL: its own rows and section (see state_backends.py)."""
        before, started = os.getloadavg(), time.monotonic()
        self.state_rows = state_backends.run(
            self.db, data.TABLES["events"], self.workdir / "states", self.args.quick, self.args.in_flight
        )
        self.state_section = state_backends.section(
            self.state_rows, before, os.getloadavg(), (time.monotonic() - started) / 60
        )

    def at_zero_latency(self, emu: EmulatorProcess, sizes: tuple[int, ...] = (5,)) -> None:
        """The ceiling, end to end per data type (the attributes delta is kept for the rate-limited
        cases) and memory at `sizes` times the rows, on one emulator at 0 ms."""
        self.raw_ceiling(emu)
        first = self.e2e(emu, "attributes")
        self.manifest = first.extra.get("manifest")
        self.e2e(emu, "events")
        self.e2e(emu, "purchases")
        if self.args.quick:
            self.add(
                Row(
                    "memory at 5x rows",
                    rows=5 * self.args.rows,
                    note="skipped (--quick)",
                    extra={"skipped": True},
                )
            )
        else:
            self.memory_cases(emu, sizes)

    def under_braze_limit(self) -> None:
        """Braze's real limit, on the 1x attributes delta `at_zero_latency` computed; --quick: a
        small limit so a few thousand rows still span several windows, at 50 ms only."""
        limit, window = (15, 1.0) if self.args.quick else (BRAZE_LIMIT, BRAZE_WINDOW_S)
        for latency in (50,) if self.args.quick else (0, 50):
            self.rate_limited(
                latency,
                limit,
                window,
                f"rate-limited {limit}/{window:g} s",
                {"case": "deliver_only", "manifest": self.manifest},
            )

    def memory(self) -> None:
        """Peak RSS of one run's process at 5x and 20x rows (attributes, e2e at 0 ms): how memory
        grows with the table (the 20x run takes about ten minutes here)."""
        with EmulatorProcess(latency_ms=0) as emu:
            self.memory_cases(emu, MEMORY_MULTIPLES)

    def memory_cases(self, emu: EmulatorProcess, sizes: tuple[int, ...]) -> None:
        for times in sizes:
            self.e2e(emu, "attributes", table=sized_table(times), name=f"memory at {times}x rows")

    def throughput(self) -> None:
        """The throughput cases alone: ceiling and e2e at 0 ms, delivery under Braze's limit, the
        first sync under it, validation, memory at 5x."""
        with EmulatorProcess(latency_ms=0) as emu:
            self.at_zero_latency(emu)
        self.under_braze_limit()
        self.first_sync_limited()
        self.validation()
        self.profiles()

    def run(self) -> None:
        args = self.args
        if args.case == "throughput":
            self.throughput()
            return
        with EmulatorProcess(latency_ms=0) as emu:
            self.at_zero_latency(emu, MEMORY_MULTIPLES)  # the whole run: memory at 20x too
            self.sequential(emu, "naive_requests", "naive sequential requests")
            self.sequential(emu, "braze_client", "braze-client")
        with EmulatorProcess(latency_ms=50) as emu:
            self.raw_ceiling(emu)
            self.e2e(emu, "attributes")
            self.sequential(emu, "naive_requests", "naive sequential requests")
            self.sequential(emu, "braze_client", "braze-client")
        self.under_braze_limit()
        # Pacing alone: a limit below what the sender reaches unlimited, so the share measures
        # the pacing, not the sender's speed (e2e on the small table; the delta phase sends nothing).
        limit, window = (15, 1.0) if args.quick else (PACING_LIMIT, BRAZE_WINDOW_S)
        self.rate_limited(
            50,
            limit,
            window,
            f"pacing check {limit}/{window:g} s",
            {"case": "end_to_end", "db": self.db, "table": SMALL_TABLE, "data_type": "attributes"},
        )
        self.first_sync_limited()
        self.validation()
        if not args.quick:  # a minute and a half of waiting out windows: too slow for a smoke run
            self.shared_budget()
        self.profiles()

    def profiles(self) -> None:
        """`--profile`: cProfile one e2e run and validation + payload per data type."""
        if self.args.profile:
            with EmulatorProcess(latency_ms=0) as emu:
                self.e2e(emu, "attributes", table=SMALL_TABLE, name="profiled e2e (cProfile)", profile=True)
            self.profile_validation()

    def profile_validation(self) -> None:
        """cProfile of validation + payload in one process, per data type: where each row's
        microseconds go (the run is slower under the profiler, so it adds no table row)."""
        for data_type in data.TABLES:
            print(f"- profiled validation + payload [{data_type}] ...", file=sys.stderr, flush=True)
            result = run_child(self._validation_params(data_type, profile=True))
            self.validation_profiles[data_type] = result.get("profile") or result.get("error", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, help="rows per table (default 1,000,000; --quick 100,000)")
    parser.add_argument(
        "--quick", action="store_true", help="short time boxes, no 5x or 20x memory case, a small rate limit"
    )
    parser.add_argument("--in-flight", type=int, default=64, help="braze_assets max_in_flight")
    parser.add_argument("--time-box", type=float, help="seconds per sequential sender (30; --quick 1)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile one e2e run (attributes, min(rows, 200k)) and validation + payload per data type",
    )
    parser.add_argument(
        "--case",
        choices=("all", "throughput", "shared-budget", "state-backends", "attribute-diff", "memory"),
        default="all",
        help="run every case (default), or only one; a single case prints its section and "
        "writes --results only when it is given",
    )
    parser.add_argument(
        "--state",
        choices=("embedded", "postgresql"),
        default="embedded",
        help="the state backend of every run: embedded (default), or PostgreSQL (a local throw-away "
        "server with fsync on, started for the benchmark)",
    )
    parser.add_argument("--results", type=Path, help="where to write the results (benchmarks/RESULTS.md)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where data and deltas go (default: a temporary directory, removed at the end)",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.rows = args.rows or (100_000 if args.quick else 1_000_000)
    args.time_box = args.time_box or (1.0 if args.quick else 30.0)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="braze-bench-"))
    load_before = os.getloadavg()
    started = time.monotonic()
    only_budget = args.case == "shared-budget"
    only_states = args.case == "state-backends"
    only_throughput = args.case == "throughput"
    only_memory = args.case == "memory"
    if args.case == "attribute-diff":
        try:
            diff_rows, text = attribute_diff.run(workdir, args.rows, args.in_flight)
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        print(text)
        if args.results:
            args.results.write_text(text + "\n")
        if args.json:
            args.json.write_text(json.dumps([r.to_dict() for r in diff_rows], indent=1))
        return 0 if diff_rows else 1
    try:
        budget_tables = only_budget or not (args.quick or only_states or only_throughput)
        tables = shared_budget.tables(args.quick) if budget_tables else {}
        if only_states:
            tables[data.TABLES["events"]] = args.rows
        elif only_memory:
            tables.update({sized_table(n): n * args.rows for n in MEMORY_MULTIPLES})
        elif not only_budget:
            tables.update({table: args.rows for table in data.TABLES.values()})
            if not args.quick:
                sizes = MEMORY_MULTIPLES if args.case == "all" else (5,)
                tables.update({sized_table(n): n * args.rows for n in sizes})
            tables[SMALL_TABLE] = min(args.rows, 200_000)
        print(f"generating {sum(tables.values()):,} rows in DuckDB ...", file=sys.stderr)
        data.generate(workdir / "warehouse.duckdb", tables, dt.datetime.now(dt.UTC))
        bench = Bench(args, workdir)
        with contextlib.ExitStack() as stack:
            if args.state == "postgresql":
                from braze_assets_tests.postgres_server import throwaway_postgres

                pg = stack.enter_context(throwaway_postgres(fsync=True))
                bench.state_url = f"postgresql://{pg['user']}@{pg['host']}:{pg['port']}/{pg['database']}"
            if only_budget:
                bench.shared_budget()
            elif only_states:
                bench.state_backends()
            elif only_memory:
                bench.memory()
            else:
                bench.run()
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = bench.budget_rows if only_budget else bench.rows + bench.budget_rows + bench.state_rows
    if only_budget:
        text = bench.budget_section
    elif only_states:
        text = bench.state_section
    elif only_memory:
        text = memory_section(bench, argv, load_before, os.getloadavg(), time.monotonic() - started)
    else:
        text = render(bench, args, argv, load_before, os.getloadavg(), time.monotonic() - started)
    print(text)
    single = only_budget or only_states or only_throughput or only_memory
    results = args.results or (None if single else HERE / "RESULTS.md")
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    return 0 if all("error" not in r.extra for r in rows) else 1


def memory_section(bench: Bench, argv: list[str], load_before, load_after, seconds: float) -> str:
    command = "python -m benchmarks.run " + " ".join(argv)
    state = STATE_SHOWN[bench.args.state]
    return "\n".join(
        [
            "## Memory at 5x and 20x rows",
            "",
            f"`{command.strip()}` — {seconds / 60:.1f} min; state: {state}; peak RSS is the run's own "
            "process (VmHWM).",
            "",
            report.machine(load_before, load_after),
            "",
            report.table(bench.rows),
            "",
            *targets_table(bench.rows, "peak RSS"),
        ]
    )


def render(bench: Bench, args, argv: list[str], load_before, load_after, seconds: float) -> str:
    command = "python -m benchmarks.run " + " ".join(argv)
    parts = [
        "# braze_assets benchmarks",
        "",
        (
            f"`{command.strip()}` — {seconds / 60:.1f} min; {args.rows:,} rows per table; "
            f"state: {STATE_SHOWN[args.state]}; "
            f"braze_assets with max_in_flight={args.in_flight} (the sync default is 32); emulator "
            "in its own process, `--lean`; every case in a process of its own (peak RSS = its "
            "VmHWM); `load` = 1-minute load average when the case ended."
        ),
        "",
        "## Machine",
        "",
        report.machine(load_before, load_after),
        "",
        "## Results",
        "",
        report.table(bench.rows),
        "",
        summary(bench.rows, args),
        bench.budget_section,
    ]
    if bench.profile:
        parts += [
            "## Profile of one e2e run (cProfile, top by own time, then cumulative)",
            "",
            "```",
            bench.profile.strip(),
            "```",
        ]
    for data_type, profile in bench.validation_profiles.items():
        parts += [
            f"## Profile of validation + payload, {data_type}, one process "
            "(cProfile, top by own time, then cumulative)",
            "",
            "```",
            profile.strip(),
            "```",
        ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
