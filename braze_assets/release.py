"""Held rows: a person's informed choice, per sync, of what becomes of them.

A row is held when Braze may or may not have processed it (the answer was lost, or the process was
killed with the request in flight). After a crash most held rows did reach Braze: sending them
again duplicates most of them, settling them as delivered loses the rest. Three modes:

* ``resend``: forget them, so the next run sends them (they may then reach Braze twice);
* ``mark_delivered``: settle them as accepted, the ledger saying a person decided so;
* ``reconcile``: ask Braze (``POST /users/export/ids``, permission ``users.export.ids``) what it
  holds for each held event or purchase, resend only what is proven missing, settle what is shown
  to have arrived, and leave the rest held with the reason.

Reconcile's rule, the requests it makes and why attributes and deletions cannot be reconciled are in
`release_reconcile.py`.

Every mode holds the sync's delivery lock, so no run of the sync sends meanwhile.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from braze_assets.braze.client import BrazeAuthError, BrazeClient
from braze_assets.release_reconcile import (
    EXPORT_IN_FLIGHT,
    EXPORT_MAX_IDS,
    EXPORT_PATH,
    LATER,
    NO_ANSWER,
    NO_DETAILS,
    RECONCILABLE,
    SHARED,
    UNREADABLE,
    reconcile,
)
from braze_assets.state import StateStore, SyncBusyError

Mode = Literal["resend", "mark_delivered", "reconcile"]
MODES: tuple[str, ...] = ("resend", "mark_delivered", "reconcile")

#: Reconcile's limits and its reasons for leaving a row held live in `release_reconcile.py`; they are
#: importable from here too, where they were first.
__all__ = [
    "EXPORT_IN_FLIGHT",
    "EXPORT_MAX_IDS",
    "EXPORT_PATH",
    "LATER",
    "MODES",
    "NO_ANSWER",
    "NO_DETAILS",
    "RECONCILABLE",
    "SHARED",
    "UNREADABLE",
    "Mode",
    "ReleaseError",
    "ReleaseReport",
    "last_data_type",
    "release",
    "release_command",
]


class ReleaseError(ValueError):
    """The choice cannot apply to this sync (nothing was changed)."""


@dataclass
class ReleaseReport:
    """What one release did, per path."""

    sync: str
    mode: str
    data_type: str | None = None
    #: held rows the choice applied to
    held: int = 0
    #: forgotten: the next run of the sync sends them
    resent: int = 0
    #: settled as accepted
    marked_delivered: int = 0
    #: left held (reconcile), by reason
    still_held: int = 0
    still_held_reasons: dict[str, int] = field(default_factory=dict)
    export_requests: int = 0
    watermark_before: str | None = None
    watermark_after: str | None = None

    def summary(self) -> str:
        text = (
            f"{self.sync}: {self.mode} over {self.held:,} held rows: {self.resent:,} resent by "
            f"the next run, {self.marked_delivered:,} marked delivered, {self.still_held:,} "
            "still held"
        )
        if self.mode == "reconcile":
            text += f" ({self.export_requests:,} export requests to Braze)"
        if self.watermark_after != self.watermark_before:
            text += (
                f"; watermark moved back {self.watermark_before} -> {self.watermark_after} "
                "so the next run reads the resent rows"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def last_data_type(store: StateStore) -> str | None:
    """The sync's data type as its last recorded run had it."""
    last = store.log.last_run()
    return last.get("data_type") if last else None


def release(
    store: StateStore,
    mode: str,
    row_hashes: list[str] | None = None,
    *,
    client: Callable[[], BrazeClient] | None = None,
    data_type: str | None = None,
    decided_by: str = "a person",
    log: Callable[[str], None] = print,
) -> ReleaseReport:
    """Apply `mode` to the sync's held rows (all, or those of `row_hashes`). `client` makes the
    Braze client reconcile asks; `data_type` defaults to the last run's."""
    if mode not in MODES:
        raise ReleaseError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    data_type = data_type or last_data_type(store)
    if mode == "reconcile":
        if data_type is not None and data_type not in RECONCILABLE:
            raise ReleaseError(
                f"reconcile is not supported for {store.sync} ({data_type}): Braze keeps no trace "
                "of an attributes update or a deletion to compare with, and a second copy of one "
                "is harmless; use mode resend (or mark_delivered). Nothing was changed."
            )
        if client is None:
            raise ReleaseError("reconcile needs a Braze client")
    report = ReleaseReport(store.sync, mode, data_type)
    with store.delivery_lock():
        before = store.read_watermark().value
        report.watermark_before = before.isoformat() if before else None
        rows = store.held_rows(row_hashes)
        report.held = len(rows)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        if mode == "resend":
            report.resent = store.release_held([r["row_hash"] for r in rows]) if rows else 0
        elif mode == "mark_delivered":
            report.marked_delivered = store.mark_held_delivered(
                {
                    r["row_hash"]: f"marked delivered by {decided_by} on {stamp} (outcome at Braze "
                    f"was unknown: {r['message'] or 'held'}); never sent again"
                    for r in rows
                }
            )
        elif rows:
            assert client is not None
            reconcile(store, rows, client, report, decided_by, stamp)
        after = store.read_watermark().value
        report.watermark_after = after.isoformat() if after else None
    log(report.summary())
    for reason, count in report.still_held_reasons.items():
        log(f"{store.sync}: {count:,} still held: {reason}")
    return report


# ---------------------------------------------------------------------------------- command line
def release_command(argv: list[str] | None = None) -> int:
    """`braze-assets release --sync NAME --mode resend|mark_delivered|reconcile [--row-hash H]`."""
    parser = argparse.ArgumentParser(
        prog="braze-assets release",
        description="Decide what becomes of a sync's held rows (outcome at Braze unknown).",
    )
    parser.add_argument("--sync", required=True)
    parser.add_argument(
        "--mode",
        choices=MODES,
        required=True,
        help="resend: the next run sends them; mark_delivered: settle as "
        "accepted; reconcile: ask Braze, resend what is proven missing",
    )
    parser.add_argument(
        "--row-hash",
        action="append",
        dest="row_hashes",
        help="only this held row (repeatable); default every held row",
    )
    args = parser.parse_args(argv)

    import os
    import sys

    from braze_assets.config import load_syncs
    from braze_assets.definitions import DEFAULT_ENDPOINT
    from braze_assets.resources import (
        BrazeResource,
        delivery_state_from_environment,
        home_dir,
        rate_share_from_environment,
    )

    sync = next((s for s in load_syncs() if s.name == args.sync), None)
    if sync is None:
        parser.error(f"no sync named {args.sync!r}")
    store = delivery_state_from_environment(str(home_dir() / "state"), in_definitions=False).store(sync.name)

    def client() -> BrazeClient:
        return BrazeResource(
            rest_endpoint=os.environ.get("BRAZE_REST_ENDPOINT", DEFAULT_ENDPOINT),
            api_key=os.environ.get("BRAZE_API_KEY", ""),
            **rate_share_from_environment(),
        ).client(EXPORT_IN_FLIGHT)

    try:
        report = release(
            store,
            args.mode,
            args.row_hashes,
            client=client,
            data_type=sync.data_type,
            decided_by="a person (braze-assets release)",
            log=lambda line: print(line, file=sys.stderr),
        )
    except ReleaseError as exc:
        print(f"braze-assets release: {exc}")
        return 2
    except (SyncBusyError, BrazeAuthError) as exc:  # nothing was changed
        print(f"braze-assets release: {exc}")
        return 1
    print(json.dumps(report.to_dict(), indent=2))
    return 0
