"""Per-sync jobs, schedules and sensors, the held-rows release job, and failure alerting."""


import datetime as dt
import json

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG,
)

from braze_assets.assets import (
    SyncAssets, partitions_for, partitions_start, source_key, utc_now,
)
from braze_assets.config import SyncConfig
from braze_assets.resources import DeliveryStateResource
from braze_assets.sources import CdiSource, SourceError
from braze_assets.sources.factory import make_source, resource_key


def incremental_range(sync: SyncConfig, delivery_state: DeliveryStateResource,
                      now: dt.datetime, source: CdiSource) -> dg.PartitionKeyRange:
    """From the day of (watermark - lookback) to today: where new and late rows can be.

    The first sync starts at the table's oldest row (not at partitions_start), so a run does not
    carry empty days: Dagster records every partition of a run's range.
    """
    watermark = delivery_state.store(sync.name).read_watermark().value
    if watermark is not None:
        start = watermark - sync.lookback
    else:
        try:
            start = source.min_updated_at() or now
        except SourceError:
            start = now  # the run itself reports the source error, changing nothing
    start = max(start, partitions_start(sync))
    keys = partitions_for(sync).get_partition_keys(current_time=now)
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


def build_schedule(sync: SyncConfig, job) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=f"{sync.name}_schedule", job=job, cron_schedule=sync.schedule.cron,
        execution_timezone=sync.schedule.timezone,
        required_resource_keys={resource_key(sync), "delivery_state"},
        description=f"Sync {sync.name} from its watermark minus the lookback up to now.",
    )
    def _schedule(context: dg.ScheduleEvaluationContext):
        delivery_state = context.resources.delivery_state
        source = make_source(sync, getattr(context.resources, resource_key(sync)))
        keys = incremental_range(sync, delivery_state, utc_now(), source)
        return dg.RunRequest(tags=range_tags(keys))

    return _schedule


def build_sensor(sync: SyncConfig, job) -> dg.SensorDefinition:
    status = (dg.DefaultSensorStatus.RUNNING if sync.sensor.enabled
              else dg.DefaultSensorStatus.STOPPED)

    @dg.sensor(
        name=f"{sync.name}_sensor", job=job, default_status=status,
        minimum_interval_seconds=sync.sensor.minimum_interval_seconds,
        required_resource_keys={resource_key(sync), "delivery_state"},
        description=f"Launches {sync.name} when {sync.source.table} has new or changed rows.",
    )
    def _sensor(context: dg.SensorEvaluationContext):
        delivery_state = context.resources.delivery_state
        source = make_source(sync, getattr(context.resources, resource_key(sync)))
        try:
            seen = source.fingerprint()  # tables: newest UPDATED_AT + rows; files: the listing
        except SourceError as exc:
            return dg.SkipReason(f"cannot observe the source: {exc}")
        observation = dg.AssetObservation(asset_key=source_key(sync), metadata={
            **({"dagster/row_count": seen["rows"]} if "rows" in seen else {}),
            "fingerprint": dg.MetadataValue.json(seen)})
        if context.cursor and json.loads(context.cursor) == seen:
            return dg.SensorResult(skip_reason="no new or changed rows", asset_events=[observation])
        keys = incremental_range(sync, delivery_state, utc_now(), source)
        run_key = ":".join([sync.name, *(str(v) for v in seen.values())])
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=run_key, tags=range_tags(keys))],
            cursor=json.dumps(seen), asset_events=[observation],
        )

    return _sensor


class ReleaseHeldConfig(dg.Config):
    sync: str
    #: row hashes to release; empty releases every held row of the sync
    row_hashes: list[str] = []


@dg.op(description="Release rows held because Braze's answer was unknown: the next run of the "
                   "sync sends them again (they may then reach Braze twice).")
def release_held_rows(context: dg.OpExecutionContext, config: ReleaseHeldConfig,
                      delivery_state: DeliveryStateResource) -> None:
    released = delivery_state.store(config.sync).release_held(config.row_hashes or None)
    context.log.info(f"{config.sync}: released {released} held rows")


@dg.job(description="Release held (ambiguous) rows of one sync so its next run resends them.")
def release_held_job():
    release_held_rows()


@dg.run_failure_sensor(description="Reports failed sync runs (hook your alerting in here).")
def sync_failure_alert(context: dg.RunFailureSensorContext):
    sync = context.dagster_run.tags.get("braze_assets/sync", "?")
    context.log.error(f"braze_assets sync {sync} failed in run {context.dagster_run.run_id}: "
                      f"{context.failure_event.message}")


def build_connection_job(sync: SyncConfig) -> dg.JobDefinition:
    """`<sync>_test_connection`: connect, check the table, preview rows with their validation."""
    from braze_assets.connection import check_connection, preview_markdown

    @dg.op(name=f"{sync.name}_check_connection", required_resource_keys={resource_key(sync)},
           description=f"Test the connection of {sync.name}: nothing is sent to Braze.")
    def _check(context: dg.OpExecutionContext) -> None:
        report = check_connection(sync, getattr(context.resources, resource_key(sync)))
        metadata = {"source": report.source, "result": report.message,
                    "preview": dg.MetadataValue.md(preview_markdown(report))}
        if not report.ok:
            raise dg.Failure(description=report.message, metadata=metadata)
        context.log.info(report.message)
        context.log_event(dg.AssetObservation(asset_key=source_key(sync), metadata={
            **metadata, "dagster/row_count": report.row_count or 0,
            "newest_updated_at": report.newest_updated_at or ""}))

    @dg.job(name=f"{sync.name}_test_connection",
            description=f"Test connection for {sync.name} ({sync.source.type} "
                        f"{sync.source.table}), like CDI's: no data is sent.")
    def _job():
        _check()

    return _job
