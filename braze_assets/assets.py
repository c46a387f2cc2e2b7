"""The asset factory: per sync, the source table, its validated delta and the Braze sync results.

Time is modelled with daily partitions on `UPDATED_AT`. A run covers a partition range (one run per
range, `BackfillPolicy.single_run`): schedules and sensors request the range from the watermark minus
the lookback up to today; a backfill from the UI re-evaluates exactly the days chosen. Whatever the
range, the ledger keeps a row Braze acknowledged from ever being sent again.
"""

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg

from braze_assets import delta_store
from braze_assets.asset_metadata import (
    RUN_TOTALS,
    delta_metadata,
    per_day,
    results_metadata,
    watermark_change,
)
from braze_assets.attribute_diff import AttributeDiff
from braze_assets.config import SyncConfig, source_key_path
from braze_assets.datatypes import DATA_TYPES
from braze_assets.delivery import Delivery
from braze_assets.delta import DeltaManifest, compute_delta
from braze_assets.log_view import sync_log_markdown
from braze_assets.partition_reports import check_for_each_partition, is_ranged, rows_per_day
from braze_assets.resources import BrazeResource, DeliveryStateResource
from braze_assets.sources.base import CdiSource, SourceError
from braze_assets.sources.factory import make_source, resource_key
from braze_assets.state import StateStore
from braze_assets.sync_outcome import SyncOutcome

_log = logging.getLogger(__name__)

UTC = dt.UTC


def utc_now() -> dt.datetime:
    return dt.datetime.now(UTC)


def source_key(sync: SyncConfig) -> dg.AssetKey:
    return dg.AssetKey(source_key_path(sync))


def partitions_for(sync: SyncConfig) -> dg.DailyPartitionsDefinition:
    # end_offset=1: today's partition exists while the day is still filling up.
    return dg.DailyPartitionsDefinition(start_date=sync.partitions_start.isoformat(), end_offset=1)


def partitions_start(sync: SyncConfig) -> dt.datetime:
    return dt.datetime.combine(sync.partitions_start, dt.time(), tzinfo=UTC)


def pending_start(
    sync: SyncConfig, watermark: dt.datetime | None, source: CdiSource, now: dt.datetime
) -> dt.datetime:
    """Where rows not yet delivered can be: the watermark minus the lookback, or on a first sync
    the table's oldest row; never before partitions_start."""
    if watermark is not None:
        start = watermark - sync.lookback
    else:
        try:
            start = source.min_updated_at() or now
        except SourceError:
            start = now  # the run itself reports the source error, changing nothing
    return max(start, partitions_start(sync))


@dataclass(frozen=True)
class SyncAssets:
    sync: SyncConfig
    source: dg.AssetSpec
    delta: dg.AssetsDefinition
    results: dg.AssetsDefinition


def build_sync_assets(sync: SyncConfig) -> SyncAssets:
    spec = DATA_TYPES[sync.data_type]
    partitions = partitions_for(sync)
    # The sync's own description (syncs.yaml) leads every asset of its group in the UI.
    intro = f"{sync.description}\n\n" if sync.description else ""
    src_key = source_key(sync)
    kinds: set[str] = {sync.source.type}
    source = dg.AssetSpec(
        key=src_key,
        description=intro + f"CDI {sync.data_type} table `{sync.source.table}` (external; observed by the "
        f"`{sync.name}` sensor and runs: row count, newest UPDATED_AT).",
        group_name=sync.name,
        kinds=kinds,
        metadata={"table": sync.source.table, "data_type": sync.data_type},
    )

    @dg.asset(
        name=f"{sync.name}_delta",
        deps=[src_key],
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name=sync.name,
        kinds={*kinds, "pandera"},
        io_manager_key="delta_io_manager",
        required_resource_keys={resource_key(sync), "delivery_state"},
        pool=f"braze_sync_{sync.name}",
        description=(
            intro
            + f"Rows of `{sync.source.table}` in the run's UPDATED_AT window that {sync.name} has not "
            "settled yet, validated with the {0} schema: valid rows as ready Braze objects, "
            "invalid rows with their reasons (never sent).".format(sync.data_type)
        ),
    )
    def delta_asset(context: dg.AssetExecutionContext) -> dg.Output[DeltaManifest]:
        # Resources by key: which warehouse resource depends on the sync's source type.
        delivery_state: DeliveryStateResource = context.resources.delivery_state
        now = utc_now()
        if not (context.has_partition_key or context.has_partition_key_range):
            raise dg.Failure(
                description=(
                    f"sync {sync.name}: its assets are partitioned by UPDATED_AT day, and this run "
                    "names no partition. Use Materialize (the latest partition syncs everything "
                    "pending), choose a partition or a range in the Launchpad, or run "
                    f"`braze-assets run --sync {sync.name}`."
                )
            )
        window = context.partition_time_window
        store = delivery_state.store(sync.name)
        watermark = store.read_watermark().value
        files = store.deltas  # shared storage when BRAZE_ASSETS_DELTA_URL is set
        files.check()  # an unreachable delta store fails the run before the warehouse is read
        run_dir = files.run_dir(context.run.run_id)
        manifest = DeltaManifest(
            sync=sync.name,
            data_type=sync.data_type,
            run_id=context.run.run_id,
            window_start=window.start.isoformat(),
            window_end=window.end.isoformat(),
            reaches_now=window.end > now,
            valid_path=delta_store.join(run_dir, "valid.parquet"),
            rejected_path=delta_store.join(run_dir, "rejected.parquet"),
            unchanged_path=delta_store.join(run_dir, "unchanged.parquet") if sync.diff_attributes else None,
            watermark_before=watermark.isoformat() if watermark else None,
        )
        source = make_source(sync, getattr(context.resources, resource_key(sync)))
        keys = context.partition_key_range
        if window.end > now and keys.start == keys.end:
            # "Sync now": Materialize on the latest partition (the UI's default) delivers
            # everything pending, exactly like a scheduled tick, whose range starts at the
            # beginning of the day of the watermark minus the lookback; ranges stay as chosen.
            pending = pending_start(sync, watermark, source, now)
            start = min(window.start, pending.replace(hour=0, minute=0, second=0, microsecond=0))
            if start < window.start:
                context.log.info(
                    f"{sync.name}: sync now: the latest partition delivers everything pending "
                    f"since {start:%Y-%m-%d %H:%M} UTC (the day of the watermark minus the lookback)"
                )
                window = dg.TimeWindow(start, window.end)
                manifest.window_start = start.isoformat()
        context.log.info(
            f"{sync.name}: computing the delta of {source.description} for "
            f"[{window.start:%Y-%m-%d %H:%M}, {min(window.end, now):%Y-%m-%d %H:%M}) UTC"
        )
        try:
            compute_delta(
                source=source,
                spec=spec,
                store=store,
                manifest=manifest,
                window_start=window.start,
                window_end=window.end,
                now=now,
                partitions_start=partitions_start(sync),
                update_existing_only=sync.update_existing_only,
                diff=AttributeDiff(sync.always_send) if sync.diff_attributes else None,
                progress=context.log.debug,
            )
        except SourceError as exc:  # a global error: nothing was delivered, no state changed
            detail = f"sync {sync.name}: {exc}"
            store.log.record_run(
                SyncOutcome.failed_before_delivery(
                    sync.name, sync.data_type, context.run.run_id, detail, manifest
                ).to_dict()
            )
            raise SourceError(detail) from None
        context.log_event(
            dg.AssetObservation(
                asset_key=src_key,
                metadata={
                    "rows_in_window": manifest.rows_read,
                    "newest_updated_at_in_window": manifest.max_updated_at or "",
                },
            )
        )
        unchanged = (
            f"{manifest.unchanged:,} unchanged since Braze accepted them (not sent), "
            if manifest.unchanged_path
            else ""
        )
        context.log.info(
            f"{sync.name}: {manifest.rows_read:,} rows read, {manifest.valid:,} to send, {unchanged}"
            f"{manifest.rejected:,} rejected, {manifest.already_settled:,} already settled, "
            f"{manifest.future_rows:,} in the future held back, "
            f"{manifest.late_outside_lookback:,} late rows outside the lookback"
        )
        for reason in manifest.unreadable:
            context.log.warning(f"{sync.name}: not read: {reason}")
        if manifest.before_partitions_start:
            context.log.warning(
                f"{sync.name}: {manifest.before_partitions_start:,} rows have UPDATED_AT before "
                f"partitions_start ({sync.partitions_start}) and are never synced; set an earlier "
                "partitions_start in the sync's config to include them"
            )
        if manifest.duplicate_rows:
            context.log.warning(
                f"{sync.name}: {manifest.duplicate_rows:,} rows are exact copies of another row "
                "(same identifiers, UPDATED_AT and PAYLOAD) and go out once"
            )
        if manifest.rows_unprocessable:
            context.log.warning(
                f"{sync.name}: {manifest.rows_unprocessable:,} rows could not be processed and "
                "were rejected on their own (see rejected_examples); the other rows go on"
            )
        if manifest.late_outside_lookback:
            context.log.warning(
                f"{sync.name}: {manifest.late_outside_lookback:,} rows older than the scanned window"
                " are not delivered; backfill their days to deliver them"
            )
        metadata = delta_metadata(
            manifest, watermark.isoformat() if watermark else None, files=sync.source.type == "s3"
        )
        if is_ranged(context):
            days: dict[str, dict[str, int]] = {}
            for name, uri in (("rows_valid", manifest.valid_path), ("rows_rejected", manifest.rejected_path)):
                for day, n in rows_per_day(uri).items():
                    days.setdefault(day, {})[name] = n
            metadata = per_day(context, metadata, days, "rows_valid")
        return dg.Output(manifest, metadata=metadata)

    @dg.asset(
        name=f"{sync.name}_sync_results",
        ins={"delta": dg.AssetIn(key=delta_asset.key)},
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name=sync.name,
        kinds={"braze"},
        io_manager_key="watermark_io_manager",
        pool=f"braze_sync_{sync.name}",
        check_specs=[
            dg.AssetCheckSpec(
                "delivery_complete",
                asset=f"{sync.name}_sync_results",
                description="Every row this run was responsible for is settled: nothing held with an "
                "unknown outcome, failed at Braze, rejected by validation or left for the "
                "next run (WARN otherwise, with the run's status and why).",
            )
        ],
        description=(
            intro + f"What Braze did with {sync.name}'s delta ({sync.endpoint}): per-row outcome in the "
            "ledger (accepted / failed with Braze's message / held when the outcome is unknown), "
            "counts, throughput and the watermark after the run."
        ),
    )
    def results_asset(
        context: dg.AssetExecutionContext,
        delta: DeltaManifest,
        braze: BrazeResource,
        delivery_state: DeliveryStateResource,
    ) -> Iterator[dg.Output[SyncOutcome] | dg.AssetCheckResult | dg.AssetCheckEvaluation]:
        store = delivery_state.store(sync.name)
        # the watermark the delta read, not today's: a release since then moved it back for a reason
        before = dt.datetime.fromisoformat(delta.watermark_before) if delta.watermark_before else None
        delivery = Delivery(
            endpoint=sync.endpoint,
            spec=spec,
            store=store,
            manifest=delta,
            client=braze.client(sync.max_in_flight),
            policy=sync.effective_ambiguous_policy,
            max_in_flight=sync.max_in_flight,
            run_id=context.run.run_id,
            log=context.log.info,
        )
        try:
            outcome = delivery.run()
        except Exception as exc:  # stopped (a refused key, a missing catalog): in the sync log too
            _record_stopped(store, delivery.outcome, delta, f"sync {sync.name}: {exc}")
            raise
        # older runs' Parquet files; their outcomes stay in the ledger
        store.deltas.prune(keep=5)
        outcome.watermark_before = before.isoformat() if before else None
        after = next_watermark(sync, delta, outcome, before)
        if outcome.status == "error":  # the run fails below: no watermark is committed
            after = before
        outcome.watermark_after = after.isoformat() if after else None
        _add_run_facts(outcome, delta)
        context.log.info(
            f"{sync.name}: accepted {outcome.accepted:,}, failed {outcome.failed:,}, held "
            f"{outcome.held_total:,}, ambiguous {outcome.ambiguous:,}, not sent "
            f"{outcome.not_sent:,} in {outcome.requests:,} requests ({outcome.seconds:.1f}s); "
            + watermark_change(outcome)
        )
        context.log.info(f"{sync.name}: {outcome.status}: {outcome.status_detail}")
        _apply_retention(context, sync, store)
        sync_log = dg.MetadataValue.md(
            sync_log_markdown(
                sync.name,
                [outcome.to_dict(), *store.log.runs(limit=9)],
                store.log.top_messages(outcome.run_id),
            )
        )
        metadata = {**results_metadata(outcome, delta), "sync_log": sync_log}
        if outcome.status == "error":  # nothing reached Braze: the run failed, nothing changed
            store.log.record_run(outcome.to_dict())
            raise dg.Failure(description=f"sync {sync.name}: {outcome.status_detail}", metadata=metadata)
        if is_ranged(context):
            days = {
                day: {f"rows_{status}": n for status, n in statuses.items()}
                for day, statuses in store.log.daily_counts(outcome.run_id).items()
            }
            metadata = per_day(context, metadata, days, "rows_accepted")
        yield dg.Output(outcome, metadata=metadata)
        # The check is recorded once per run: the run's totals and the sync log, in one place
        # (what alerts read, whatever the run covered).
        totals = results_metadata(outcome, delta)
        check = dg.AssetCheckResult(
            check_name="delivery_complete",
            passed=outcome.status == "success",
            severity=dg.AssetCheckSeverity.WARN,
            description=outcome.status_detail,
            metadata={
                **{key: totals[key] for key in RUN_TOTALS},
                "rows_held": outcome.held_total,
                "sync_log": sync_log,
            },
        )
        yield from check_for_each_partition(context, context.asset_key, "delivery_complete", check)
        yield check

    return SyncAssets(sync, source, delta_asset, results_asset)


def _apply_retention(context: dg.AssetExecutionContext, sync: SyncConfig, store: StateStore) -> None:
    """The sync log's retention, after every run: cheap when nothing is due (an indexed range)."""
    rows, runs = store.log.apply_retention(sync.sync_log.row_retention_days, sync.sync_log.run_retention_days)
    if rows or runs:
        context.log.info(
            f"{sync.name}: sync log retention: cleared the details of {rows:,} rows settled more than "
            f"{sync.sync_log.row_retention_days} days ago, deleted {runs:,} run records older than "
            f"{sync.sync_log.run_retention_days} days"
        )


def next_watermark(
    sync: SyncConfig, delta: DeltaManifest, outcome: SyncOutcome, before: dt.datetime | None
) -> dt.datetime | None:
    """The watermark moves only when this run scanned up to now and everything older than its
    window is settled (the window starts at or before the watermark, or no unsettled rows lie
    below it); never past a row still waiting to be sent, nor past now (future rows are not read)."""
    if not delta.reaches_now or not delta.max_updated_at:
        return before
    covered = before is not None and (
        delta.window_start is None or dt.datetime.fromisoformat(delta.window_start) <= before
    )
    if not covered and delta.late_outside_lookback:
        return before
    candidate = dt.datetime.fromisoformat(delta.max_updated_at)
    if outcome.earliest_unsettled:
        earliest = dt.datetime.fromisoformat(outcome.earliest_unsettled)
        candidate = min(candidate, earliest - dt.timedelta(microseconds=1))
    return max(candidate, before) if before else candidate


def _record_stopped(store: StateStore, outcome: SyncOutcome, delta: DeltaManifest, detail: str) -> None:
    """A delivery that stopped on an error is an `error` run in the sync log, with what it
    settled before it stopped; a log that cannot be written must not hide that error."""
    outcome.status, outcome.status_detail = "error", detail
    # a stopped delivery commits no watermark: the one the delta found stays
    outcome.watermark_before = outcome.watermark_after = delta.watermark_before
    _add_run_facts(outcome, delta)
    try:
        store.log.record_run(outcome.to_dict())
    except Exception:  # noqa: BLE001 - the delivery's own error is the one to raise
        _log.warning("sync %s: the stopped run could not be recorded in the sync log", outcome.sync)


def _add_run_facts(outcome: SyncOutcome, delta: DeltaManifest) -> None:
    """What the sync log keeps of a run from its delta: rows read and rejected, when it began;
    and when its results were in (now)."""
    outcome.rows_read, outcome.rows_rejected = delta.rows_read, delta.rejected
    outcome.started_at, outcome.finished_at = delta.computed_at, utc_now().isoformat()
