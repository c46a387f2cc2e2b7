"""`braze-assets`: run the syncs from a terminal, the demo on the embedded default, or the UI.

    braze-assets demo            seed DuckDB, start the local Braze emulator, run every sync, report
    braze-assets ui              the same setup, then the Dagster UI (dagster dev) on it
    braze-assets run [--sync X]  run syncs against the configured Braze (BRAZE_REST_ENDPOINT)
    braze-assets test-connection [--sync X]   check each source and preview rows; sends nothing
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import warnings
from pathlib import Path

DEMO_PORT = 4545
DAGSTER_YAML = """\
# Local Dagster instance for braze_assets (see deploy/dagster.yaml for production).
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1   # one run at a time per sync (pool braze_sync_<name>)
"""


def _prepare_home(home: Path) -> Path:
    os.environ["BRAZE_ASSETS_HOME"] = str(home)
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


def run_syncs(only: list[str] | None = None, log_level: str = "INFO") -> list[dict]:
    """Materialize each sync's job for its incremental range; return one summary per sync."""
    import dagster as dg

    from braze_assets.automation import incremental_range, range_tags
    from braze_assets.config import load_syncs
    from braze_assets.definitions import build_definitions, default_resources
    from braze_assets.sources.factory import make_source, resource_key

    syncs = [s for s in load_syncs() if not only or s.name in only]
    resources = default_resources(syncs)
    defs = build_definitions(syncs, resources)
    instance = dg.DagsterInstance.get()
    summaries = []
    for sync in syncs:
        source = make_source(sync, resources[resource_key(sync)])
        keys = incremental_range(sync, resources["delivery_state"],
                                 dt.datetime.now(dt.timezone.utc), source)
        job = defs.resolve_job_def(f"{sync.name}_job")
        result = job.execute_in_process(
            instance=instance, tags=range_tags(keys), raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}})
        summaries.append(_summary(sync.name, keys, result))
    return summaries


def connection_reports(only: list[str] | None, as_json: bool) -> int:
    """Test each sync's connection (nothing sent to Braze); exit 1 if any fails."""
    import dataclasses

    from braze_assets.config import load_syncs
    from braze_assets.connection import check_connection, preview_markdown
    from braze_assets.definitions import default_resources
    from braze_assets.sources.factory import resource_key

    syncs = [s for s in load_syncs() if not only or s.name in only]
    resources = default_resources(syncs)
    reports = []
    for sync in syncs:
        resource = resources[resource_key(sync)]
        if hasattr(resource, "process_config_and_initialize"):  # resolve dg.EnvVar settings
            resource = resource.process_config_and_initialize()
        reports.append(check_connection(sync, resource))
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in reports], indent=2, default=str))
    for report in [] if as_json else reports:
        print(f"\n== {report.sync}  [{'ok' if report.ok else 'FAILED'}]  {report.message}")
        if report.preview:
            print(preview_markdown(report))
    return 0 if all(r.ok for r in reports) else 1


def _summary(name: str, keys, result) -> dict:
    summary: dict = {"sync": name, "partitions": f"{keys.start}..{keys.end}",
                     "success": result.success, "run_id": result.run_id}
    try:
        delta = result.output_for_node(f"{name}_delta")
        summary.update(read=delta.rows_read, already_settled=delta.already_settled,
                       valid=delta.valid, rejected=delta.rejected,
                       rejected_reasons=delta.rejected_reasons, future_held_back=delta.future_rows,
                       late_outside_lookback=delta.late_outside_lookback)
    except Exception:  # the delta step did not produce an output
        pass
    try:
        out = result.output_for_node(f"{name}_sync_results")
        summary.update(sent=out.accepted + out.failed + out.held, accepted=out.accepted,
                       failed=out.failed, held=out.held, ambiguous=out.ambiguous,
                       not_sent=out.not_sent, failed_reasons=out.failed_reasons,
                       requests=out.requests, watermark_before=out.watermark_before,
                       watermark_after=out.watermark_after)
    except Exception:
        checks = [e for e in result.get_asset_check_evaluations() if not e.passed
                  and e.severity.value == "ERROR"]
        summary["blocked_by"] = [e.check_name for e in checks]
    if not result.success:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        if failure is not None:
            summary["error"] = failure.step_failure_data.error.message.strip()[:500]
    return summary


def print_summaries(summaries: list[dict], emulator_stats: dict | None = None) -> None:
    for s in summaries:
        status = "ok" if s["success"] else "FAILED"
        print(f"\n== {s['sync']}  [{status}]  partitions {s['partitions']}  run {s['run_id'][:8]}")
        if "read" in s:
            print(f"   read {s['read']:,}  already settled {s['already_settled']:,}  valid "
                  f"{s['valid']:,}  rejected {s['rejected']:,}  future (held back) "
                  f"{s['future_held_back']:,}  late outside lookback {s['late_outside_lookback']:,}")
            for reason, count in s["rejected_reasons"].items():
                print(f"      rejected {count:>4}  {reason}")
        if "accepted" in s:
            print(f"   sent {s['sent']:,} in {s['requests']:,} requests: accepted "
                  f"{s['accepted']:,}  failed {s['failed']:,}  held (unknown outcome) {s['held']:,}"
                  f"  not sent (retry next run) {s['not_sent']:,}")
            for reason, count in s["failed_reasons"].items():
                print(f"      failed   {count:>4}  {reason}")
            print(f"   watermark {s['watermark_before'] or 'none'} -> {s['watermark_after'] or 'none'}")
        if s.get("blocked_by"):
            print(f"   delivery blocked by check(s): {', '.join(s['blocked_by'])}")
        if s.get("error"):
            print(f"   error: {s['error']}")
    if emulator_stats is not None:
        print("\n== Braze emulator now holds: "
              + ", ".join(f"{emulator_stats.get(k, 0):,} {k}"
                          for k in ("profiles", "events", "purchases", "deletions")))


def _start_emulator(home: Path, port: int):
    from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig

    key = os.environ.get("BRAZE_API_KEY") or secrets.token_urlsafe(24)
    os.environ["BRAZE_API_KEY"] = key
    emulator = BrazeEmulator(EmulatorConfig(api_key=key, port=port,
                                            state_file=str(home / "emulator_store.json")))
    os.environ["BRAZE_REST_ENDPOINT"] = emulator.start()
    return emulator


def _seed_if_needed(home: Path) -> None:
    from braze_assets.seed import seed_warehouse

    warehouse = Path(os.environ.get("BRAZE_ASSETS_DUCKDB") or home / "warehouse.duckdb")
    os.environ["BRAZE_ASSETS_DUCKDB"] = str(warehouse)
    if not warehouse.exists():
        counts = seed_warehouse(warehouse)
        print(f"Seeded {warehouse}: " + ", ".join(f"{t} {n:,} rows" for t, n in counts.items()))
    else:
        print(f"Using the existing warehouse {warehouse} (delete it, or pass --reset, to reseed)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="braze-assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["demo", "ui", "run", "test-connection"])
    parser.add_argument("--home", default=os.environ.get("BRAZE_ASSETS_HOME", ".braze_assets"),
                        help="state directory (default .braze_assets)")
    parser.add_argument("--sync", action="append", help="only this sync (repeatable)")
    parser.add_argument("--reset", action="store_true", help="demo/ui: start from a fresh warehouse,"
                        " emulator and state")
    parser.add_argument("--port", type=int, default=DEMO_PORT, help="demo/ui: emulator port")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")
    parser.add_argument("--log-level", default="INFO", help="Dagster console log level")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", category=Warning)  # library notices; errors still surface
    home = Path(args.home).resolve()
    if args.reset and home.exists():
        import shutil

        shutil.rmtree(home)
    _prepare_home(home)
    os.environ.setdefault("BRAZE_ASSETS_PROGRESS_BAR", "1")  # shown only on a terminal
    if args.command == "test-connection":
        return connection_reports(args.sync, args.json)
    if args.command == "run":
        summaries = run_syncs(args.sync, args.log_level)
        print(json.dumps(summaries, indent=2, default=str) if args.json else "", end="")
        if not args.json:
            print_summaries(summaries)
        return 0 if all(s["success"] for s in summaries) else 1
    _seed_if_needed(home)
    emulator = _start_emulator(home, args.port)
    print(f"Local Braze emulator on {emulator.base_url}")
    try:
        if args.command == "ui":
            print("Starting the Dagster UI (Ctrl-C to stop) ...")
            root = Path(__file__).resolve().parent.parent
            return subprocess.call([sys.executable, "-m", "dagster", "dev", "-w",
                                    str(root / "workspace.yaml")], cwd=root)
        summaries = run_syncs(args.sync, args.log_level)
        stats = emulator.store.stats()
        if args.json:
            print(json.dumps({"syncs": summaries, "emulator": stats}, indent=2, default=str))
        else:
            print_summaries(summaries, stats)
        return 0 if all(s["success"] for s in summaries) else 1
    finally:
        emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
