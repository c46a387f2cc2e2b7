"""What a run says about each daily partition it covered.

A run over a range of days (a backfill, `BackfillPolicy.single_run`) materializes every partition of
the range from one output, and Dagster copies that output's metadata into each partition: a
ten-day backfill would show the whole run's counts ten times. So a ranged run puts no counts in its
output; each day gets its own counts, of the rows whose UPDATED_AT falls on it, as an observation
of that partition, and the run's totals live in one place: the run's `delivery_complete` check
result and the sync log (`docs/sync-log.md`).

Likewise for checks: Dagster plans a ranged run's checks once per partition but records the check's
result without one, so every partition of the range would show the check as skipped. Each
partition gets the run's result instead: the check judged the run that covered that day.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from braze_assets import delta_store


def is_ranged(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> bool:
    """The run covers more than one partition (one output for several days)."""
    op = context.op_execution_context if isinstance(context, dg.AssetCheckExecutionContext) else context
    if not op.has_partition_key_range:
        return False
    keys = op.partition_key_range
    return keys.start != keys.end


def partition_keys(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> list[str]:
    op = context.op_execution_context if isinstance(context, dg.AssetCheckExecutionContext) else context
    return list(op.partition_keys)


def rows_per_day(uri: str) -> dict[str, int]:
    """Rows of a delta file by UPDATED_AT day (UTC, `YYYY-MM-DD`, as the daily partitions)."""
    try:
        with delta_store.open_input(uri) as source:
            stamps = pq.read_table(source, columns=["updated_at"])["updated_at"]
    except FileNotFoundError:
        return {}
    if not len(stamps):
        return {}
    days = pc.strftime(stamps.cast(pa.timestamp("us", tz="UTC")), format="%Y-%m-%d", locale="C")
    return {str(c["values"]): int(c["counts"]) for c in pc.value_counts(days).to_pylist()}


def daily_observations(
    asset_key: dg.AssetKey, keys: list[str], counts: Mapping[str, Mapping[str, int]], row_count_of: str
) -> Iterator[dg.AssetObservation]:
    """One observation per partition: its own counts (zero when no row of the run fell on it);
    `row_count_of` names the count shown as the partition's row count."""
    names = sorted({name for day in counts.values() for name in day} | {row_count_of})
    for key in keys:
        day = counts.get(key, {})
        yield dg.AssetObservation(
            asset_key=asset_key,
            partition=key,
            metadata={
                "dagster/row_count": day.get(row_count_of, 0),
                **{name: day.get(name, 0) for name in names},
                "counts_of": "rows of this run whose UPDATED_AT falls on this day",
            },
        )


def check_for_each_partition(
    context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext,
    asset_key: dg.AssetKey,
    check_name: str,
    result: dg.AssetCheckResult,
) -> Iterator[dg.AssetCheckEvaluation]:
    """The run's check result for every partition of its range (nothing for a single partition,
    whose result Dagster records itself). Not blocking: the run's own result blocks, once."""
    if not is_ranged(context):
        return
    keys = partition_keys(context)
    covered = f"run over {keys[0]}..{keys[-1]}: " if keys else ""
    for key in keys:
        yield dg.AssetCheckEvaluation(
            asset_key=asset_key,
            check_name=check_name,
            passed=result.passed,
            severity=result.severity,
            description=covered + (result.description or ""),
            # the run's counts stay on the run's own result: one place, not one copy per day
            metadata={"run_id": context.run.run_id},
            partition=key,
            blocking=False,
        )
