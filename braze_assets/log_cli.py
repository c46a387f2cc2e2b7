"""`braze-assets log`: read, search, export and purge the sync log (`state/sync_log.py`).

    braze-assets log runs   --sync X [--limit N]
    braze-assets log rows   --sync X [--errors] [--status S] [--run RUN_ID] [--limit N] [USER]
    braze-assets log export --sync X --format csv|parquet --output PATH [--errors] [USER]
    braze-assets log purge  [--sync X]              apply each sync's retention now
    braze-assets log forget USER [--sync X]         right to be forgotten: every sync by default

USER is one identifier, as the rows carry it: --external-id, --braze-id, --email, --phone or
--alias NAME LABEL. It is hashed the way the rows' lookup hashes are (`lookup.py`) and never
stored or printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from braze_assets.attribute_diff import user_key
from braze_assets.lookup import lookup_hash
from braze_assets.state import StateStore, SyncBusyError


def _user_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--external-id")
    group.add_argument("--braze-id")
    group.add_argument("--email")
    group.add_argument("--phone")
    group.add_argument("--alias", nargs=2, metavar=("NAME", "LABEL"))


def _user(args: argparse.Namespace) -> dict[str, Any] | None:
    """The identifier named on the command line (kind -> value), or None when none was."""
    for kind, value in (
        ("EXTERNAL_ID", args.external_id),
        ("BRAZE_ID", args.braze_id),
        ("EMAIL", args.email),
        ("PHONE", args.phone),
    ):
        if value is not None:
            return {kind: value}
    if args.alias is not None:
        return {"ALIAS": (args.alias[0], args.alias[1])}
    return None


def _lookup(args: argparse.Namespace) -> list[str] | None:
    """The lookup hash of the user named on the command line, or None when none was."""
    user = _user(args)
    return [lookup_hash(kind, value) for kind, value in user.items()] if user else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braze-assets log", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    runs = commands.add_parser("runs", help="the latest runs of a sync, newest first")
    runs.add_argument("--sync", required=True)
    runs.add_argument("--limit", type=int, default=20)
    rows = commands.add_parser("rows", help="settled rows of a sync, newest first")
    export = commands.add_parser("export", help="write a sync's rows to a CSV or Parquet file")
    for sub in (rows, export):
        sub.add_argument("--sync", required=True)
        sub.add_argument("--errors", action="store_true", help="only rows failed, invalid or held")
        sub.add_argument("--status", choices=["accepted", "failed", "invalid", "held"])
        sub.add_argument("--run", help="only this run's rows (its run id)")
        _user_options(sub)
    rows.add_argument("--limit", type=int, default=50)
    export.add_argument("--format", choices=["csv", "parquet"], required=True)
    export.add_argument("--output", required=True, help="file to write")
    purge = commands.add_parser("purge", help="apply each sync's retention now (it runs after every run)")
    purge.add_argument("--sync", action="append", help="only this sync (repeatable)")
    forget = commands.add_parser("forget", help="clear one user's details from the log and delta files")
    forget.add_argument("--sync", action="append", help="only this sync (repeatable); default every sync")
    _user_options(forget, required=True)
    return parser


def log_command(argv: list[str]) -> int:
    from braze_assets import log_view
    from braze_assets.config import load_syncs
    from braze_assets.resources import delivery_state_from_environment, home_dir

    parser = _parser()
    args = parser.parse_args(argv)
    syncs = {s.name: s for s in load_syncs()}
    chosen = args.sync if isinstance(args.sync, list) else [args.sync] if args.sync else list(syncs)
    unknown = [name for name in chosen if name not in syncs]
    if unknown:
        parser.error(f"no sync named {unknown[0]!r}; syncs: {', '.join(syncs)}")
    state = delivery_state_from_environment(str(home_dir() / "state"), in_definitions=False)

    def store(name: str) -> StateStore:
        return state.store(name)

    if args.command == "runs":
        print(log_view.runs_markdown(store(args.sync).log.runs(limit=args.limit)))
        return 0
    if args.command in ("rows", "export"):
        selection: dict[str, Any] = {
            "status": args.status,
            "errors_only": args.errors,
            "lookup": _lookup(args),
            "run_id": args.run,
        }
        log = store(args.sync).log
        if args.command == "rows":
            table = log.rows(**selection, limit=args.limit)
            print(log_view.rows_markdown(table))
            print(f"{table.num_rows:,} rows shown (--limit {args.limit})", file=sys.stderr)
            return 0
        written = log_view.export_rows(log.rows(**selection), args.output, args.format)
        print(f"{written:,} rows of {args.sync}'s log written to {args.output}")
        return 0
    if args.command == "purge":
        for name in chosen:
            retention = syncs[name].sync_log
            rows, runs = store(name).log.apply_retention(
                retention.row_retention_days, retention.run_retention_days
            )
            print(f"{name}: cleared the details of {rows:,} rows, deleted {runs:,} run records")
        return 0
    lookup = _lookup(args) or []
    user = _user(args) or {}
    status = 0
    for name in chosen:
        try:
            rows, files = store(name).forget(lookup, [user_key(user)])
        except SyncBusyError as exc:
            print(f"{name}: not changed: {exc}")
            status = 1
            continue
        print(f"{name}: cleared the details of {rows:,} log rows, dropped {files:,} rows from delta files")
    return status
