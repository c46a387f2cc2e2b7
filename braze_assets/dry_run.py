"""A dry run: what a sync would send now, and what Braze would bill for it, without sending.

It does everything a run does up to the wire: the delta of everything pending (as "sync now"),
validation, the attribute diff, the requests. It writes its delta files in a scratch directory it
deletes, and changes no state: no ledger row, no watermark, no remembered attribute, no run record.
Useful before a first sync or a large backfill, to see the bill and the time it will take.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import tempfile
from pathlib import Path
from typing import Any

from braze_assets import delta_store
from braze_assets.attribute_diff import AttributeDiff
from braze_assets.braze import contract
from braze_assets.config import SyncConfig
from braze_assets.datatypes import DATA_TYPES
from braze_assets.delta import DeltaManifest, compute_delta
from braze_assets.request_plan import plan_requests
from braze_assets.sources.base import CdiSource
from braze_assets.state import EmbeddedStateStore, StateStore

#: Braze's documented request limits, per second, by endpoint (docs/braze-contract.md, rate limits).
DOCUMENTED_RATE_PER_S = {
    "/users/track": 3_000 / 3.0,
    "/users/delete": 20_000 / 60.0,
    contract.CATALOG_ITEMS_BUDGET: contract.CATALOG_ITEMS_RATE_LIMIT / contract.CATALOG_ITEMS_RATE_WINDOW_S,
}


@dataclasses.dataclass
class Bill:
    """What a sync would send now, and what it would cost."""

    sync: str
    data_type: str
    window_start: str | None
    window_end: str
    rows_read: int = 0
    rows_already_settled: int = 0
    rows_rejected: int = 0
    rows_to_send: int = 0
    rows_unchanged: int = 0
    #: exact copies of another row (same identity), sent once
    rows_duplicate: int = 0
    #: stamped after now: held back until then (never past the watermark)
    rows_future: int = 0
    #: rows a stopped (or still sending) run has in flight: the next run first settles those
    #: Braze answered, so it may send fewer than `rows_to_send`
    rows_in_flight: int = 0
    #: data points Braze would bill, with the attribute diff (as configured) and without it
    data_points: int = 0
    data_points_without_diff: int = 0
    requests: int = 0
    #: the requests per second this workspace's budget allows the sync (Braze's limit x share)
    rate_per_s: float = 0.0
    #: whose limit `rate_per_s` is a share of: the one Braze announced for the workspace, or its
    #: documented one (before any sync of the workspace sent)
    rate_from: str = "documented"
    minutes_at_budget: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        saved = self.data_points_without_diff - self.data_points
        lines = [
            f"== {self.sync} (dry run: nothing sent, no state changed)",
            f"   window {self.window_start or 'the oldest row'} .. {self.window_end}",
            f"   read {self.rows_read:,}  already settled {self.rows_already_settled:,}  rejected "
            f"{self.rows_rejected:,}  exact copies {self.rows_duplicate:,}  to send {self.rows_to_send:,}  "
            f"unchanged {self.rows_unchanged:,}  future (held back) {self.rows_future:,}",
            f"   data points billed {self.data_points:,} (without the diff {self.data_points_without_diff:,}"
            f", saved {saved:,})",
            f"   {self.requests:,} requests, about {self.minutes_at_budget:,.1f} min at "
            f"{self.rate_per_s:,.2f} requests/s (Braze's {self.rate_from} limit x max_rate_share)",
        ]
        if self.rows_in_flight:
            lines.append(
                f"   {self.rows_in_flight:,} rows of a run that stopped (or is still sending) are in "
                "flight: the next run first settles those Braze answered, and may send fewer"
            )
        if self.note:
            lines.append(f"   {self.note}")
        return "\n".join(lines)


def budget_path(sync: SyncConfig) -> str:
    """The Braze rate budget a sync's requests count against (`DataTypeSpec.budget`)."""
    return DATA_TYPES[sync.data_type].budget


def bill_now(
    sync: SyncConfig,
    source: CdiSource,
    store: StateStore,
    rate_share: float,
    announced_rate_per_s: float | None = None,
) -> Bill:
    """The bill of everything pending now: from the watermark minus the lookback (or the table's
    oldest row), as a "sync now" run would send it. `announced_rate_per_s`: the limit Braze last
    announced for this workspace (`BrazeResource.announced_rate_per_s`), else its documented one."""
    from braze_assets.assets import partitions_start, pending_start

    now = dt.datetime.now(dt.UTC)
    return dry_run(
        sync,
        source,
        store,
        window_start=pending_start(sync, store.read_watermark().value, source, now),
        now=now,
        partitions_start=partitions_start(sync),
        rate_share=rate_share,
        announced_rate_per_s=announced_rate_per_s,
    )


def dry_run(
    sync: SyncConfig,
    source: CdiSource,
    store: StateStore,
    *,
    window_start: dt.datetime,
    now: dt.datetime,
    partitions_start: dt.datetime,
    rate_share: float,
    announced_rate_per_s: float | None = None,
) -> Bill:
    """The bill of sending everything pending from `window_start` up to `now`, at the share of
    the rate Braze announced for the workspace, or of its documented rate before any sync sent."""
    spec = DATA_TYPES[sync.data_type]
    with tempfile.TemporaryDirectory(prefix="braze-assets-dry-run-") as scratch:
        root = Path(scratch)
        if isinstance(store, EmbeddedStateStore) and not store.db_path.exists():
            # a sync that never ran has no state: an empty one in the scratch directory is the
            # same, and opening its own would create it
            store = EmbeddedStateStore(root / "state", sync.name)
        manifest = DeltaManifest(
            sync=sync.name,
            data_type=sync.data_type,
            run_id="dry-run",
            window_start=window_start.isoformat(),
            window_end=now.isoformat(),
            reaches_now=True,
            valid_path=str(root / "valid.parquet"),
            rejected_path=str(root / "rejected.parquet"),
            unchanged_path=str(root / "unchanged.parquet") if sync.diff_attributes else None,
        )
        compute_delta(
            source=source,
            spec=spec,
            store=store,
            manifest=manifest,
            window_start=window_start,
            window_end=now,
            now=now,
            partitions_start=partitions_start,
            update_existing_only=sync.update_existing_only,
            diff=AttributeDiff(sync.always_send) if sync.diff_attributes else None,
        )
        with store.session() as ledger:
            in_flight = ledger.planned_rows()
        requests = 0
        for batch in delta_store.parquet_batches(manifest.valid_path, 20_000, columns=["object"]):
            requests += len(plan_requests(spec, batch.column("object").to_pylist(), "dry"))
    documented = DOCUMENTED_RATE_PER_S.get(budget_path(sync), 0.0)
    rate = (announced_rate_per_s or documented) * rate_share
    bill = Bill(
        sync=sync.name,
        data_type=sync.data_type,
        window_start=manifest.window_start,
        window_end=manifest.window_end,
        rows_read=manifest.rows_read,
        rows_already_settled=manifest.already_settled,
        rows_rejected=manifest.rejected,
        rows_to_send=manifest.valid,
        rows_unchanged=manifest.unchanged,
        rows_duplicate=manifest.duplicate_rows,
        rows_future=manifest.future_rows,
        rows_in_flight=in_flight,
        data_points=manifest.estimated_data_points,
        data_points_without_diff=manifest.estimated_data_points + manifest.data_points_saved,
        requests=requests,
        rate_per_s=rate,
        rate_from="announced" if announced_rate_per_s else "documented",
        minutes_at_budget=round(requests / rate / 60, 2) if rate else math.nan,
    )
    if sync.data_type == "deletions":
        bill.note = "deletions bill no data points"
    elif sync.data_type == "catalogs":
        bill.note = "catalog syncs bill no data points (catalog storage counts instead)"
    elif sync.data_type == "attributes" and not sync.diff_attributes:
        bill.note = "send: full_payload: every attribute of every row is billed; send: changed would not"
    return bill
