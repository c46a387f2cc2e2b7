"""Per-sync jobs, schedules and sensors, the held-rows release job, and failure alerting."""

import datetime as dt
import json
from typing import Any, Literal

import dagster as dg

# private: Dagster 1.13 has no public RunRequest argument or constant for a partition-range run
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from braze_assets.assets import (
    SyncAssets,
    partitions_for,
    pending_start,
    source_key,
    utc_now,
)
from braze_assets.config import SyncConfig
from braze_assets.resources import BrazeResource, DeliveryStateResource
from braze_assets.sources import CdiSource, SourceError
from braze_assets.sources.factory import make_source, resource_key


class NothingToSyncYet(Exception):
    """The sync's first partition (`partitions_start`) is still ahead: there is no day to sync.

    The config refuses a partitions_start after today, so this takes a clock behind the one the
    file was checked by; a tick or `braze-assets run` then says so instead of failing."""


def incremental_range(
    sync: SyncConfig, delivery_state: DeliveryStateResource, now: dt.datetime, source: CdiSource
) -> dg.PartitionKeyRange:
    """From the day of (watermark - lookback) to today: where new and late rows can be.

    The first sync starts at the table's oldest row (not at partitions_start), so a run does not
    carry empty days: Dagster records every partition of a run's range. Raises `NothingToSyncYet`
    when `now` is before the first partition.
    """
    keys = partitions_for(sync).get_partition_keys(current_time=now)
    if not keys:
        raise NothingToSyncYet(
            f"sync {sync.name}: nothing to sync yet: its partitions start on "
            f"{sync.partitions_start.isoformat()} (partitions_start), after today "
            f"({now.astimezone(dt.UTC).date().isoformat()} UTC)"
        )
    watermark = delivery_state.store(sync.name).read_watermark().value
    start = pending_start(sync, watermark, source, now)
    first = start.strftime("%Y-%m-%d")
    return dg.PartitionKeyRange(max(first, keys[0]), keys[-1])


def range_tags(keys: dg.PartitionKeyRange) -> dict[str, str]:
    return {ASSET_PARTITION_RANGE_START_TAG: keys.start, ASSET_PARTITION_RANGE_END_TAG: keys.end}


def build_job(assets: SyncAssets):
    return dg.define_asset_job(
        name=f"{assets.sync.name}_job",
        selection=dg.AssetSelection.assets(assets.delta, assets.results),
        description=f"Sync {assets.sync.name} ({assets.sync.data_type}) to Braze.",
        tags={"braze_assets/sync": assets.sync.name},
    )


def reclaim_before_launch(
    context: dg.ScheduleEvaluationContext | dg.SensorEvaluationContext, sync: SyncConfig
) -> str | None:
    """Reclaim the pool slot of the sync's runs whose process died (they would block every later
    run); the reason to launch nothing while a live run of the sync holds it."""
    from braze_assets.instance import reclaim_dead_runs

    try:
        instance = context.instance
    except dg.DagsterInvariantViolationError:  # a context built without an instance (tests)
        return None
    state = reclaim_dead_runs(instance, sync.name, log=context.log.warning)
    return state.busy_message() if state.busy else None


def build_schedule(sync: SyncConfig, job) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"{sync.name}_schedule",
        job=job,
        cron_schedule=sync.schedule.cron,
        execution_timezone=sync.schedule.timezone,
        required_resource_keys={resource_key(sync), "delivery_state"},
        description=f"Sync {sync.name} from its watermark minus the lookback up to now.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext):
        busy = reclaim_before_launch(context, sync)
        if busy:
            return dg.SkipReason(busy)
        delivery_state = context.resources.delivery_state
        source = make_source(sync, getattr(context.resources, resource_key(sync)))
        try:
            keys = incremental_range(sync, delivery_state, utc_now(), source)
        except NothingToSyncYet as exc:
            return dg.SkipReason(str(exc))
        return dg.RunRequest(tags=range_tags(keys))

    return _schedule


#: How long after a run that left rows for the next run a sensor launches that next run itself,
#: when the table has not changed: long enough not to hammer a Braze that is down, and each
#: failed run is retried once (its run id is the run key), so a retry that fails waits again.
RETRY_AFTER = dt.timedelta(minutes=10)


def _retry_due(sync: SyncConfig, delivery_state: DeliveryStateResource, now: dt.datetime) -> str | None:
    """The run id of the sync's last run when it left rows unsent for the next run and has ended
    at least `RETRY_AFTER` ago; None otherwise. A run a check blocked, or whose source failed,
    left nothing to retry: the same rows would fail the same way until the table changes."""
    last = delivery_state.store(sync.name).log.last_run()
    if not last or not last.get("not_sent") or last.get("status") not in ("error", "partial_success"):
        return None
    finished = last.get("finished_at")
    if not finished or now - dt.datetime.fromisoformat(finished) < RETRY_AFTER:
        return None
    return str(last["run_id"])


def _unchanged(seen: dict[str, Any]) -> str:
    """Why a sensor tick launched nothing, in the words of what it compared."""
    if "newest" in seen:
        return (
            f"no new or changed rows since the last launch (newest UPDATED_AT "
            f"{seen['newest'] or 'none'}, {seen.get('rows', 0):,} rows)"
        )
    return "no new or changed files since the last launch"


def build_sensor(sync: SyncConfig, job) -> dg.SensorDefinition:
    status = dg.DefaultSensorStatus.RUNNING if sync.sensor.enabled else dg.DefaultSensorStatus.STOPPED

    @dg.sensor(
        name=f"{sync.name}_sensor",
        job=job,
        default_status=status,
        minimum_interval_seconds=sync.sensor.minimum_interval_seconds,
        required_resource_keys={resource_key(sync), "delivery_state"},
        description=f"Launches {sync.name} when {sync.source.table} has new or changed rows.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        busy = reclaim_before_launch(context, sync)
        delivery_state = context.resources.delivery_state
        source = make_source(sync, getattr(context.resources, resource_key(sync)))
        try:
            seen = source.fingerprint()  # tables: newest UPDATED_AT + rows; files: the listing
        except SourceError as exc:
            return dg.SkipReason(f"cannot observe the source: {exc}")
        observation = dg.AssetObservation(
            asset_key=source_key(sync),
            metadata={
                **({"dagster/row_count": seen["rows"]} if "rows" in seen else {}),
                "fingerprint": dg.MetadataValue.json(seen),
            },
        )
        retry = None
        if context.cursor and json.loads(context.cursor) == seen:
            retry = _retry_due(sync, delivery_state, utc_now())
            if retry is None:
                return dg.SensorResult(skip_reason=_unchanged(seen), asset_events=[observation])
        if busy:  # the cursor stays: the rows are requested once the live run has ended
            return dg.SensorResult(skip_reason=busy, asset_events=[observation])
        try:
            keys = incremental_range(sync, delivery_state, utc_now(), source)
        except NothingToSyncYet as exc:  # no cursor: the rows are requested once the day exists
            return dg.SensorResult(skip_reason=str(exc), asset_events=[observation])
        # a retry's key is the failed run's: launched once per failed run
        run_key = (
            f"{sync.name}:retry:{retry}" if retry else ":".join([sync.name, *(str(v) for v in seen.values())])
        )
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=run_key, tags=range_tags(keys))],
            cursor=json.dumps(seen),
            asset_events=[observation],
        )

    return _sensor


def build_reclaim_sensor(syncs: list[SyncConfig]) -> dg.SensorDefinition:
    """Frees the pool slots of dead runs even when no schedule or sensor of the sync is on, so a
    crashed run never blocks a Materialize click or a backfill (Dagster's own run monitoring does
    not see a run whose process died with its code server, nor a CLI run)."""

    @dg.sensor(
        name="reclaim_dead_runs",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=60,
        description="Marks failed the sync runs whose process is gone and frees their "
        "pool slots, so a crash never blocks a sync.",
    )
    def _reclaim(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        from braze_assets.instance import reclaim_dead_runs

        said = [
            line
            for sync in syncs
            for line in reclaim_dead_runs(context.instance, sync.name, log=context.log.warning).reclaimed
        ]
        return dg.SkipReason("; ".join(said) if said else "no dead run holds a sync's pool")

    return _reclaim


class ReleaseHeldConfig(dg.Config):
    sync: str
    #: resend: forget them so the next run sends them (they may reach Braze twice);
    #: mark_delivered: settle them as accepted; reconcile: ask Braze (/users/export/ids), resend
    #: only what is proven missing, settle what is shown to have arrived, keep the rest held
    mode: Literal["resend", "mark_delivered", "reconcile"] = "resend"
    #: row hashes to decide on; empty means every held row of the sync
    row_hashes: list[str] = []


@dg.op(
    description="Decide what becomes of a sync's held rows (Braze's answer was unknown): "
    "resend them, mark them delivered, or reconcile them with what Braze holds "
    "(events and purchases). Reports how many rows each path resolved."
)
def release_held_rows(
    context: dg.OpExecutionContext,
    config: ReleaseHeldConfig,
    delivery_state: DeliveryStateResource,
    braze: BrazeResource,
) -> dg.Output[dict]:
    from braze_assets.release import EXPORT_IN_FLIGHT, ReleaseError, release
    from braze_assets.state import SyncBusyError

    try:
        report = release(
            delivery_state.store(config.sync),
            config.mode,
            config.row_hashes or None,
            client=lambda: braze.client(EXPORT_IN_FLIGHT),
            decided_by=f"a person (release_held_job run {context.run_id[:8]}, mode {config.mode})",
            log=context.log.info,
        )
    except (ReleaseError, SyncBusyError) as exc:  # nothing was changed
        raise dg.Failure(description=str(exc)) from None
    counts = {
        "held_rows": report.held,
        "resent_next_run": report.resent,
        "marked_delivered": report.marked_delivered,
        "still_held": report.still_held,
    }
    return dg.Output(
        report.to_dict(),
        metadata={
            "sync": config.sync,
            "mode": config.mode,
            **counts,
            "still_held_reasons": dg.MetadataValue.json(report.still_held_reasons),
            "export_requests": report.export_requests,
            "watermark_before": report.watermark_before or "none",
            "watermark_after": report.watermark_after or "none",
        },
    )


@dg.job(
    description="Decide on held (ambiguous) rows of one sync: resend, mark_delivered or reconcile with Braze."
)
def release_held_job():
    release_held_rows()


def build_connection_job(sync: SyncConfig) -> dg.JobDefinition:
    """`<sync>_test_connection`: connect, check the table, preview rows with their validation."""
    from braze_assets.connection import check_connection, preview_markdown

    @dg.op(
        name=f"{sync.name}_check_connection",
        required_resource_keys={resource_key(sync)},
        description=f"Test the connection of {sync.name}: nothing is sent to Braze.",
    )
    def _check(context: dg.OpExecutionContext) -> None:
        report = check_connection(sync, getattr(context.resources, resource_key(sync)))
        metadata: dict[str, Any] = {
            "source": report.source,
            "result": report.message,
            "preview": dg.MetadataValue.md(preview_markdown(report)),
        }
        if not report.ok:
            raise dg.Failure(description=report.message, metadata=metadata)
        context.log.info(report.message)
        context.log_event(
            dg.AssetObservation(
                asset_key=source_key(sync),
                metadata={
                    **metadata,
                    "dagster/row_count": report.row_count or 0,
                    "newest_updated_at": report.newest_updated_at or "",
                },
            )
        )

    @dg.job(
        name=f"{sync.name}_test_connection",
        description=f"Test connection for {sync.name} ({sync.source.type} "
        f"{sync.source.table}), like CDI's: no data is sent.",
    )
    def _job():
        _check()

    return _job


def build_dry_run_job(sync: SyncConfig) -> dg.JobDefinition:
    """`<sync>_dry_run`: everything pending, up to the wire, with its bill; nothing sent or changed."""
    from braze_assets.dry_run import bill_now, budget_path

    @dg.op(
        name=f"{sync.name}_bill",
        required_resource_keys={resource_key(sync), "delivery_state", "braze"},
        description=f"What {sync.name} would send now and what Braze would bill: nothing is sent.",
    )
    def _preview(context: dg.OpExecutionContext) -> None:
        braze = context.resources.braze
        bill = bill_now(
            sync,
            make_source(sync, getattr(context.resources, resource_key(sync))),
            context.resources.delivery_state.store(sync.name),
            braze.max_rate_share,
            braze.announced_rate_per_s(budget_path(sync)),
        )
        context.log.info(bill.text())
        context.log_event(
            dg.AssetObservation(
                asset_key=source_key(sync),
                metadata={
                    "dry_run": dg.MetadataValue.md(f"```\n{bill.text()}\n```"),
                    **{k: v for k, v in bill.to_dict().items() if isinstance(v, (int, float)) and v == v},
                },
            )
        )

    @dg.job(
        name=f"{sync.name}_dry_run",
        description=f"Dry run of {sync.name}: the delta, validation and attribute diff of everything "
        "pending, with the data points Braze would bill and the time it would take; nothing is "
        "sent and no state changes.",
    )
    def _job():
        _preview()

    return _job
