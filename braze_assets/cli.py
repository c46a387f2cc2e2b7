"""`braze-assets`: run the syncs from a terminal, the demo on the embedded default, or the UI.

    braze-assets demo            seed DuckDB, start the local Braze emulator, run every sync, report
    braze-assets ui              the same setup, then the Dagster UI (dg dev) on it
    braze-assets run [--sync X]  run syncs against the configured Braze (BRAZE_REST_ENDPOINT)
    braze-assets run --dry-run   what each sync would send now and the bill; nothing sent
    braze-assets test-connection [--sync X]   check each source and preview rows; sends nothing
    braze-assets release --sync X --mode M    decide what becomes of held rows
    braze-assets log runs|rows|export|purge|forget   the sync log (see `braze-assets log --help`)

Each sync of a run ends with a CDI-style status, printed with the reason. Exit status of `run`,
the worst status of its syncs:
    0 success           every row due was accepted by Braze (or there was nothing to send)
    3 partial_success   some rows were rejected by validation, failed at Braze or wait for the
                        next run
    4 held              rows are held because Braze's answer was lost (release_held_job)
    1 error             no row reached Braze (unreachable, refused), a step failed (its cause is
                        shown), a check blocked delivery, or the sync is busy with another run
    2                   usage error
`demo` exits 1 only when a sync ends in error (its seed has bad rows on purpose).
A run killed with kill -9 is reclaimed by the next launch: its Dagster pool slot is freed and the
run marked failed; rows it had in flight are recovered from the sync's journal.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from braze_assets.run_summary import print_summaries, summarize_run

if TYPE_CHECKING:
    from braze_assets.config import SyncConfig

DEMO_PORT = 4545
#: How long a dry run waits for a sync's state that a run or a release holds, before saying so.
DRY_RUN_STATE_WAIT_S = 5.0
DAGSTER_YAML = """\
# Local Dagster instance for braze_assets (see deploy/dagster.yaml for production).
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1   # one run at a time per sync (pool braze_sync_<name>)
# The daemon (dg dev) fails runs that never start and frees the pool slots runs keep after
# they end (a run worker that died is marked failed by its code server). Runs of a sync whose
# process died are also reclaimed before each launch (braze_assets/instance.py).
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 180
  poll_interval_seconds: 30
  free_slots_after_run_end_seconds: 30
"""


def _prepare_home(home: Path) -> Path:
    from braze_assets.instance import initialise_local_instance

    os.environ["BRAZE_ASSETS_HOME"] = str(home)
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    initialise_local_instance(dagster_home, DAGSTER_YAML)  # once, under a lock
    return dagster_home


class UsageError(Exception):
    """A command line naming something that is not there: exit 2, as argparse does."""


def selected_syncs(only: list[str] | None) -> list[SyncConfig]:
    """The configured syncs `--sync` names (all without it); a name not configured is a usage
    error, not a run of nothing: a typo in a cron line would otherwise sync nothing, silently."""
    from braze_assets.config import load_syncs, syncs_path

    syncs = load_syncs()
    names = [s.name for s in syncs]
    unknown = [name for name in only or [] if name not in names]
    if unknown:
        raise UsageError(
            f"no sync named {unknown[0]!r} in {syncs_path()}; configured: {', '.join(names) or 'none'}"
        )
    return [s for s in syncs if not only or s.name in only]


def run_syncs(only: list[str] | None = None, log_level: str = "INFO") -> list[dict]:
    """Materialize each sync's job for its incremental range; return one summary per sync."""
    import dagster as dg

    from braze_assets.automation import NothingToSyncYet, incremental_range, range_tags
    from braze_assets.definitions import build_definitions, default_resources
    from braze_assets.instance import file_lock, process_tags, reclaim_dead_runs
    from braze_assets.resources import delivery_state_from_environment, home_dir
    from braze_assets.sources.factory import make_source, resource_key

    syncs = selected_syncs(only)
    resources = default_resources(syncs)
    defs = build_definitions(syncs, resources)
    # read here, outside a run: the state's URL itself, not the `dg.EnvVar` Definitions hold
    state = delivery_state_from_environment(str(home_dir() / "state"), in_definitions=False)
    instance = dg.DagsterInstance.get()
    summaries = []
    for sync in syncs:
        # One `braze-assets run` of a sync at a time on this machine; then runs of the sync that
        # died are reclaimed, and a live one makes the sync busy: Dagster would otherwise wait
        # for its pool slot in a busy loop.
        lock = Path(instance.root_directory) / "locks" / f"{sync.name}.lock"
        with file_lock(lock, blocking=False) as ours:
            if not ours:
                summaries.append(
                    _no_run_summary(
                        sync.name,
                        (
                            f"sync {sync.name} is busy: another braze-assets run of it is in progress "
                            "on this machine; try again when it ends"
                        ),
                        [],
                    )
                )
                continue
            pool = reclaim_dead_runs(instance, sync.name, log=_note)
            if pool.busy:
                summaries.append(_no_run_summary(sync.name, pool.busy_message(), pool.reclaimed))
                continue
            source = make_source(sync, resources[resource_key(sync)])
            try:
                keys = incremental_range(sync, state, dt.datetime.now(dt.UTC), source)
            except NothingToSyncYet as exc:  # no day to run: said, and the next syncs still run
                summaries.append(_no_run_summary(sync.name, str(exc), pool.reclaimed, status="success"))
                continue
            job = defs.resolve_job_def(f"{sync.name}_job")
            result = job.execute_in_process(
                instance=instance,
                tags={**range_tags(keys), **process_tags()},
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
            )
        summaries.append(summarize_run(sync.name, keys, result, pool.reclaimed))
    return summaries


def dry_runs(only: list[str] | None = None) -> list[dict]:
    """The bill of each sync's pending rows, nothing sent and no state changed (`dry_run.py`)."""
    import dagster as dg

    from braze_assets.definitions import default_resources
    from braze_assets.dry_run import bill_now, budget_path
    from braze_assets.resources import delivery_state_from_environment, home_dir
    from braze_assets.sources.base import SourceError
    from braze_assets.sources.factory import make_source, resource_key
    from braze_assets.state import SyncBusyError

    syncs = selected_syncs(only)
    resources = default_resources(syncs)
    # The key only names the workspace whose announced limit a bill uses: without it (a dry run
    # sends nothing), bills are at the documented limit.
    try:
        braze = resources["braze"].process_config_and_initialize()  # the key from the environment
    except dg.DagsterInvalidConfigError:
        braze = None

    state = delivery_state_from_environment(str(home_dir() / "state"), in_definitions=False)
    bills = []
    for sync in syncs:
        source = make_source(sync, resources[resource_key(sync)])
        announced = braze.announced_rate_per_s(budget_path(sync)) if braze is not None else None
        store = copy.copy(state.store(sync.name))
        # a run delivering holds the embedded state: a dry run says so rather than wait for it
        store.lock_timeout_s = min(store.lock_timeout_s, DRY_RUN_STATE_WAIT_S)
        try:
            share = resources["braze"].max_rate_share
            bill = bill_now(sync, source, store, share, announced)
        except (SourceError, SyncBusyError) as exc:  # this sync's: the other syncs' bills still come
            error = f"sync {sync.name}: {exc}"
            bills.append({"sync": sync.name, "error": error, "text": f"== {sync.name}  [error]\n   {error}"})
            continue
        bills.append(bill.to_dict() | {"text": bill.text()})
    return bills


def _note(message: str) -> None:
    print(f"braze-assets: {message}", file=sys.stderr, flush=True)


def _no_run_summary(name: str, detail: str, reclaimed: list[str], status: str = "error") -> dict:
    """A sync that launched no run (busy, or no day to sync yet), with why."""
    _note(detail)
    return {
        "sync": name,
        "partitions": None,
        "status": status,
        "status_detail": detail,
        "run_id": None,
        "reclaimed": reclaimed,
    }


def connection_reports(only: list[str] | None, as_json: bool) -> int:
    """Test each sync's connection (nothing sent to Braze); exit 1 if any fails."""
    import dataclasses

    from braze_assets.connection import check_connection, preview_markdown
    from braze_assets.definitions import default_resources
    from braze_assets.sources.factory import resource_key

    syncs = selected_syncs(only)
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


def _start_emulator(home: Path, port: int):
    from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig
    from braze_assets.seed import CATALOG_FIELDS, CATALOG_NAME

    key = os.environ.get("BRAZE_API_KEY") or secrets.token_urlsafe(24)
    os.environ["BRAZE_API_KEY"] = key
    emulator = BrazeEmulator(
        EmulatorConfig(
            api_key=key,
            port=port,
            state_file=str(home / "emulator_store.json"),
            catalogs={CATALOG_NAME: CATALOG_FIELDS},  # the demo's catalog exists, as in Braze
        )
    )
    os.environ["BRAZE_REST_ENDPOINT"] = emulator.start()
    return emulator


def _seed_if_needed(home: Path) -> None:
    from braze_assets.seed import SNAPSHOT_TABLE, change_snapshot, seed_warehouse

    warehouse = Path(os.environ.get("BRAZE_ASSETS_DUCKDB") or home / "warehouse.duckdb")
    os.environ["BRAZE_ASSETS_DUCKDB"] = str(warehouse)
    if not warehouse.exists():
        counts = seed_warehouse(warehouse)
        print(f"Seeded {warehouse}: " + ", ".join(f"{t} {n:,} rows" for t, n in counts.items()))
    else:
        print(f"Using the existing warehouse {warehouse} (delete it, or pass --reset, to reseed)")
        changed = change_snapshot(warehouse)
        print(f"The CRM snapshot ({SNAPSHOT_TABLE}) changed the loyalty points of {changed:,} members")


#: how long the UI's processes get to stop after Ctrl-C before they are killed
UI_STOP_GRACE_S = 15.0
#: how often the UI's wait looks whether Ctrl-C was pressed
UI_WAIT_S = 0.5
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_ui(ui_port: int) -> int:
    """`dg dev` on the project's workspace.yaml until Ctrl-C, then every process it started stops
    within seconds. It runs in its own process group: Ctrl-C reaches only this process, which asks
    the whole group to stop (SIGINT), waits a little, then kills what is left. Killing only
    `dg dev` itself would leave its webserver, daemon and code servers running."""
    root = Path(__file__).resolve().parent.parent
    # `dg dev` (dagster-dg-cli) with this interpreter; `-w` serves workspace.yaml as it is. The
    # definitions silence Dagster's beta notices themselves (braze_assets/definitions.py).
    command = [sys.executable, "-m", "dagster_dg_cli.cli", "dev"]
    command += ["-w", str(root / "workspace.yaml"), "-p", str(ui_port)]
    print(f"Starting the Dagster UI on http://127.0.0.1:{ui_port} (Ctrl-C to stop) ...", flush=True)
    # Ctrl-C (or SIGTERM) sets a flag the wait below checks. KeyboardInterrupt is not relied on: a
    # process started with SIGINT ignored (a background job of a non-interactive shell) never
    # gets it, and CPython raises it wherever the main thread is, so inside a finalizer it is
    # printed and lost. Either way the UI would never stop.
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in _STOP_SIGNALS}
    try:
        process = subprocess.Popen(command, cwd=root, start_new_session=True)
        while not stop.is_set():  # waking often: a flag set by any thread's signal is seen
            with contextlib.suppress(subprocess.TimeoutExpired):
                return process.wait(timeout=UI_WAIT_S)
        print("Stopping the Dagster UI ...", flush=True)
        _stop_group(process)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGINT to the UI's process group; SIGKILL to whatever of it is left after the grace."""
    import time

    group = process.pid  # the group's leader: started with start_new_session
    try:
        os.killpg(group, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + UI_STOP_GRACE_S
    while time.monotonic() < deadline:
        process.poll()  # reap the leader, or its zombie keeps the group alive
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return  # every process of the group has stopped
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    process.wait()


def main(argv: list[str] | None = None) -> int:
    from braze_assets.config import ConfigError
    from braze_assets.delta_store import DeltaStoreError
    from braze_assets.state.postgres_schema import StateUnreachableError, StateUrlError

    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"braze-assets: {exc}", file=sys.stderr)
        return 2
    # what to fix, not a traceback; each names its setting (a delta store's error, the variable)
    except (ConfigError, StateUrlError, StateUnreachableError, DeltaStoreError) as exc:
        print(f"braze-assets: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    if argv[:1] == ["release"]:  # its own options: see `braze-assets release --help`
        from braze_assets.release import release_command

        return release_command(argv[1:])
    if argv[:1] == ["log"]:  # its own subcommands: see `braze-assets log --help`
        from braze_assets.log_cli import log_command

        return log_command(argv[1:])
    parser = argparse.ArgumentParser(
        prog="braze-assets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["demo", "ui", "run", "test-connection"])
    parser.add_argument(
        "--home",
        default=os.environ.get("BRAZE_ASSETS_HOME", ".braze_assets"),
        help="state directory (default .braze_assets)",
    )
    parser.add_argument("--sync", action="append", help="only this sync (repeatable)")
    parser.add_argument(
        "--reset", action="store_true", help="demo/ui: start from a fresh warehouse, emulator and state"
    )
    parser.add_argument("--port", type=int, default=DEMO_PORT, help="demo/ui: emulator port")
    parser.add_argument("--ui-port", type=int, default=3000, help="ui: the Dagster UI's port")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")
    parser.add_argument("--log-level", default="INFO", help="Dagster console log level")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run: everything but sending (delta, validation, attribute diff) and the bill: rows, "
        "data points with and without the diff, requests and minutes at the rate budget; changes no state",
    )
    return _command(parser.parse_args(argv))


def _command(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore", category=Warning)  # library notices; errors still surface
    home = Path(args.home).resolve()
    if args.reset and home.exists():
        import shutil

        shutil.rmtree(home)
    _prepare_home(home)
    os.environ.setdefault("BRAZE_ASSETS_PROGRESS_BAR", "1")  # shown only on a terminal
    if args.command == "test-connection":
        return connection_reports(args.sync, args.json)
    if args.command == "run" and args.dry_run:
        bills = dry_runs(args.sync)
        if args.json:
            print(json.dumps([{k: v for k, v in b.items() if k != "text"} for b in bills], indent=2))
        else:
            print("\n\n".join(b["text"] for b in bills))
        return 1 if any("error" in b for b in bills) else 0
    if args.command == "run":
        summaries = run_syncs(args.sync, args.log_level)
        print(json.dumps(summaries, indent=2, default=str) if args.json else "", end="")
        if not args.json:
            print_summaries(summaries)
        from braze_assets.sync_outcome import EXIT_CODES, worst_status

        return EXIT_CODES[worst_status([s["status"] for s in summaries])]
    _seed_if_needed(home)
    emulator = _start_emulator(home, args.port)
    print(f"Local Braze emulator on {emulator.base_url}")
    try:
        if args.command == "ui":
            return run_ui(args.ui_port)
        summaries = run_syncs(args.sync, args.log_level)
        stats = emulator.store.stats()
        if args.json:
            print(json.dumps({"syncs": summaries, "emulator": stats}, indent=2, default=str))
        else:
            print_summaries(summaries, stats)
        return 1 if any(s["status"] == "error" for s in summaries) else 0
    finally:
        emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
