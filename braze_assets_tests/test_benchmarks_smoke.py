"""A small run of the benchmark harness (`python -m benchmarks.run --quick`): every case runs and
reports numbers. It checks the harness, never performance: no figure here is compared to a target."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from braze_assets.delta_workers import configured_workers

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    ("raw ceiling", "attributes", 0.0),
    ("raw ceiling", "attributes", 50.0),
    ("braze_assets e2e", "attributes", 0.0),
    ("braze_assets e2e", "events", 0.0),
    ("braze_assets e2e", "purchases", 0.0),
    ("braze_assets e2e", "attributes", 50.0),
    ("naive sequential requests", "attributes", 0.0),
    ("naive sequential requests", "attributes", 50.0),
    ("braze-client", "attributes", 0.0),
    ("braze-client", "attributes", 50.0),
    ("rate-limited", "attributes", 50.0),
    ("pacing check", "attributes", 50.0),
    ("first sync", "attributes", 50.0),
    ("validation + payload, 1 process", "attributes", 0.0),
    ("validation + payload, 1 process", "events", 0.0),
    ("validation + payload, 1 process", "purchases", 0.0),
}
#: On more than one core, validation is measured on the delta's worker processes too.
ON_WORKERS = {
    ("validation + payload, on workers", data_type, 0.0)
    for data_type in ("attributes", "events", "purchases")
}


def _benchmark(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str, list[dict]]:
    """Run `python -m benchmarks.run *args` into tmp_path: (the process, the results text, rows)."""
    results, rows_json = tmp_path / "RESULTS.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args, "--results", str(results), "--json", str(rows_json)]
        + ["--workdir", str(tmp_path / "work")],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, results.read_text(), json.loads(rows_json.read_text())


def test_quick_benchmark_run_reports_every_case(tmp_path):
    proc, text, rows = _benchmark(tmp_path, "--quick", "--rows", "3000", "--profile")

    def key(row):  # "braze-client 2.3.3" -> "braze-client"; "..., 2 workers" -> "..., on workers"
        case = row["case"]
        if case.startswith("validation") and case.endswith(" workers"):
            case = "validation + payload, on workers"
        name = next((c for c, _, _ in EXPECTED if case.startswith(c)), case)
        return name, row["data_type"], row["latency_ms"]

    measured = {key(r): r for r in rows if not r["extra"].get("skipped")}
    expected = set(EXPECTED) | (ON_WORKERS if configured_workers() else set())
    if importlib.util.find_spec("braze") is None:  # optional: the table says it was not measured
        expected = {e for e in expected if e[0] != "braze-client"}
        assert any(r["case"] == "braze-client" and "not measured" in r["note"] for r in rows)
    assert expected <= measured.keys(), f"missing cases: {expected - measured.keys()}"
    for name, row in measured.items():
        assert "error" not in row["extra"], (name, row["extra"]["error"])
        assert row["rows"] > 0 and row["seconds"] > 0 and row["objects_per_s"] > 0, (name, row)
        if not name[0].startswith("validation"):
            assert row["requests"] > 0 and row["requests_per_s"] > 0, (name, row)
        assert row["peak_rss_mib"] > 0, name
    assert any(r["case"] == "memory at 5x rows" and r["extra"].get("skipped") for r in rows)
    for case in ("rate-limited", "pacing check"):
        rate = measured[(case, "attributes", 50.0)]["extra"]
        assert rate["windows"] >= 1 and rate["share"] > 0, case

    for heading in ("## Machine", "## Results", "## Ratios (same run)", "## Phase split", "## Targets"):
        assert heading in text
    assert "| raw ceiling |" in text and "| braze_assets e2e |" in text
    assert proc.stdout.strip().endswith(text.strip().splitlines()[-1])  # the table was printed
    # every unmet target says why from this run's own figures (the CPU per request where sending
    # decides), not a blank
    targets = text.split("## Targets", 1)[1]
    unmet = [line for line in targets.splitlines() if line.startswith("| ") and "| no |" in line]
    assert unmet, "a --quick run meets no throughput target at these sizes"
    for line in unmet:
        assert line.split("|")[4].strip(), f"an unmet target without its why: {line}"
    assert "ms in the run's process" in targets and "ms in the emulator" in targets
    for row in measured.values():
        if row["case"].startswith(("braze_assets e2e", "rate-limited")):
            assert row["extra"]["delivery_cpu_s"] > 0 and row["extra"]["emulator_cpu_s"] > 0, row["case"]
    # --profile: where one e2e run's and each data type's validation time goes, function by function
    assert (
        "## Profile of one e2e run" in text and "delivery.py" in text.split("## Profile of one e2e run", 1)[1]
    )
    for data_type in ("attributes", "events", "purchases"):
        heading = f"## Profile of validation + payload, {data_type}, one process"
        assert heading in text, heading
        profile = text.split(heading, 1)[1].split("## ", 1)[0]
        assert "function calls" in profile and "validate_batch" in profile, profile[:500]


def test_throughput_case_profiles_when_asked(tmp_path):
    """`--case throughput --profile` profiles one e2e run and validation per data type, as the
    whole run does (it once ignored the flag)."""
    _, text, _ = _benchmark(tmp_path, "--case", "throughput", "--quick", "--rows", "3000", "--profile")
    assert "## Profile of one e2e run" in text
    for data_type in ("attributes", "events", "purchases"):
        assert f"## Profile of validation + payload, {data_type}, one process" in text


def test_memory_cases_run_with_the_state_in_postgresql(tmp_path):
    """`--case memory --state postgresql`: the runs keep their state in a local PostgreSQL server
    the benchmark starts (each run in a schema of its own), and the section says so."""
    _, text, rows = _benchmark(tmp_path, "--case", "memory", "--rows", "1000", "--state", "postgresql")
    assert [r["case"] for r in rows] == ["memory at 5x rows", "memory at 20x rows"]
    for row in rows:
        assert "error" not in row["extra"], row["extra"]
        assert row["objects"] == row["rows"] and row["peak_rss_mib"] > 0, row
        # the delta ran before delivery; its phase and the CPU of both are recorded
        assert row["extra"]["delta_s"] > 0 and row["extra"]["delivery_cpu_s"] > 0, row
        assert row["extra"]["state_server_cpu_s"] > 0, row  # the server's share of the cores
    assert "state: PostgreSQL" in text and "| peak RSS ≤ 1.2 GiB at 20,000 rows |" in text
    # the runs' state went to PostgreSQL: the only DuckDB file left is the warehouse
    state_files = [p for p in (tmp_path / "work").rglob("*.duckdb") if p.name != "warehouse.duckdb"]
    assert not state_files, state_files


def test_state_backends_case_measures_the_server_apart_from_the_sync(tmp_path):
    """`--case state-backends`: both backends e2e on the shared cores, then again with the sync
    (its workers too) confined to one core and the server to another, each ratio a target."""
    import os

    from benchmarks.state_backends import APART

    _, text, rows = _benchmark(tmp_path, "--case", "state-backends", "--quick", "--rows", "2000")
    cores = sorted(os.sched_getaffinity(0))
    e2e = [r for r in rows if r["case"].startswith("e2e")]
    for row in e2e:
        assert "error" not in row["extra"] and row["objects"] == row["rows"] == 2000, row
    shared = {r["extra"]["backend"]: r["extra"]["cpus"] for r in e2e if APART not in r["case"]}
    assert shared == {"embedded": cores, "postgresql": cores}
    apart = {r["extra"]["backend"]: r["extra"]["cpus"] for r in e2e if APART in r["case"]}
    if len(cores) > 1:
        assert apart == {"embedded": cores[:1], "postgresql": cores[:1]}
        assert f"of the embedded backend's ({APART}) |" in text
    else:
        assert not apart
    probes = {r["case"] for r in rows if r["case"].startswith("ledger probe")}
    assert probes == {"ledger probe, state embedded", "ledger probe, state postgresql"}


def test_attribute_diff_case_reports_its_three_targets(tmp_path):
    """`--case attribute-diff` on a small snapshot: both runs, the second sending only the 1% of
    values changed, the diff's cost from every alternated run, and the three targets."""
    from benchmarks.attribute_diff import COST_REPEATS

    _, text, rows = _benchmark(tmp_path, "--case", "attribute-diff", "--rows", "2000")
    assert [r["case"] for r in rows] == ["snapshot, first sync", "snapshot, restamped (1% changed)"]
    assert all(r["rows"] == 2000 for r in rows), rows
    assert "8,000 data points in" in text  # 2,000 users x 4 attributes, all sent once
    assert f"(medians of {COST_REPEATS}; each run, without: " in text
    for target in ("second run's data points", "second run's wall time", "delta throughput with the diff"):
        assert f"| {target}" in text, target


def test_the_state_server_cpu_counts_postgres_processes_only():
    """A process whose command line merely mentions postgres (`benchmarks.run --state
    postgresql`, whose CPU includes every finished case's) is not the server."""
    from benchmarks.state_backends import server_cpu_s

    burn = "import time\nwhile True: pass"
    before = server_cpu_s()
    busy = subprocess.Popen([sys.executable, "-c", burn, "--state", "postgresql"])
    try:
        time.sleep(1.5)  # a second and more of CPU, alive and named in its command line
        assert server_cpu_s() - before < 0.5
    finally:
        busy.kill()
        busy.wait()
