"""The metadata each sync asset reports in the Dagster UI: the delta's counts and files, the
results' counts and watermark, and how a run over several days splits them (each day's own
counts on its observation, the run's totals once on its `delivery_complete` check result)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from braze_assets.delta import DeltaManifest
from braze_assets.partition_reports import daily_observations, partition_keys
from braze_assets.sync_outcome import SyncOutcome

#: What a ranged run's output keeps (Dagster copies it into every partition of the range): what
#: holds for the run as a whole, no counts (those go to each day's observation).
RUN_LEVEL_METADATA = frozenset(
    {
        "status",
        "status_detail",
        "window_start",
        "window_end",
        "watermark_before",
        "watermark_after",
        "valid_rows_file",
        "rejected_rows_file",
    }
)
#: The run's totals, kept once per run on its `delivery_complete` check result.
#: Every row count and delivery figure of the results is here: a run over several days carries
#: none on its results.
RUN_TOTALS = (
    "status",
    "status_detail",
    "rows_read",
    "rows_valid",
    "rows_rejected_by_validation",
    "rows_sent",
    "rows_accepted",
    "rows_failed_at_braze",
    "rows_held_ambiguous",
    "rows_held_in_flight",
    "rows_held_by_crash_recovery",
    "rows_ambiguous",
    "rows_not_sent_retry_next_run",
    "rows_settled_by_another_run",
    "rows_unchanged_not_sent",
    "recovered_from_crash_settled",
    "recovered_from_crash_ambiguous",
    "recovered_from_crash_unsent",
    "data_points_sent",
    "data_points_saved",
    # how the delivery went, and what Braze said of the rows it failed
    "failed_reasons",
    "failed_examples",
    "requests",
    "rate_limited_429",
    "seconds",
    "objects_per_second",
)
RANGED_COUNTS_NOTE = (
    "This run covered several days: each day's counts are in that partition's observation (rows whose "
    "UPDATED_AT falls on the day); the run's totals and the sync log are on its delivery_complete "
    "check, and in `braze-assets log runs`."
)


def delta_metadata(manifest: DeltaManifest, watermark: str | None, files: bool) -> dict[str, Any]:
    return {
        "dagster/row_count": manifest.valid,
        "window_start": manifest.window_start or "",
        "window_end": manifest.window_end,
        "watermark_before": watermark or "none (first sync)",
        "rows_read": manifest.rows_read,
        "rows_already_settled": manifest.already_settled,
        "rows_valid": manifest.valid,
        "rows_rejected": manifest.rejected,
        "rejected_reasons": dg.MetadataValue.json(manifest.rejected_reasons),
        "rejected_examples": dg.MetadataValue.json(manifest.rejected_examples),
        "rows_in_future_held_back": manifest.future_rows,
        "future_examples": dg.MetadataValue.json(manifest.future_examples),
        "late_rows_outside_lookback": manifest.late_outside_lookback,
        "rows_before_partitions_start": manifest.before_partitions_start,
        "rows_unprocessable": manifest.rows_unprocessable,
        "rows_exact_duplicates_dropped": manifest.duplicate_rows,
        "estimated_data_points": manifest.estimated_data_points,
        **(
            {"rows_unchanged": manifest.unchanged, "data_points_saved": manifest.data_points_saved}
            if manifest.unchanged_path
            else {}
        ),
        "valid_rows_file": dg.MetadataValue.path(manifest.valid_path),
        "rejected_rows_file": dg.MetadataValue.path(manifest.rejected_path),
        **(files_metadata(manifest) if files else {}),
    }


def watermark_change(outcome: SyncOutcome) -> str:
    before, after = outcome.watermark_before, outcome.watermark_after
    if before == after:
        return f"watermark unchanged ({before or 'none yet: set by the first run that reaches now'})"
    return f"watermark {before or 'none'} -> {after}"


def files_metadata(manifest: DeltaManifest) -> dict[str, Any]:
    """What only a file source (S3) has to say: files read, skipped as settled, unreadable."""
    return {
        "unreadable_parts": dg.MetadataValue.json(manifest.unreadable),
        "parts_read": len(manifest.parts),
        "parts_skipped_as_settled": manifest.parts_skipped,
    }


def per_day(
    context: dg.AssetExecutionContext,
    metadata: dict[str, Any],
    days: dict[str, dict[str, int]],
    row_count_of: str,
) -> dict[str, Any]:
    """A ranged run: each day's counts as its partition's observation, and the output's metadata
    without counts (Dagster would copy them into every partition of the range)."""
    for observation in daily_observations(context.asset_key, partition_keys(context), days, row_count_of):
        context.log_event(observation)
    kept = {key: value for key, value in metadata.items() if key in RUN_LEVEL_METADATA}
    return {**kept, "counts": RANGED_COUNTS_NOTE}


def results_metadata(outcome: SyncOutcome, delta: DeltaManifest) -> dict:
    sent = outcome.accepted + outcome.failed
    return {
        # the headline count, when the run had rows to send ("0" would read as a failure)
        **({"dagster/row_count": outcome.accepted} if outcome.rows_in_delta else {}),
        "status": outcome.status,
        "status_detail": outcome.status_detail,
        "rows_read": delta.rows_read,
        "rows_valid": delta.valid,
        "rows_rejected_by_validation": delta.rejected,
        "rows_sent": sent + outcome.held,
        "rows_accepted": outcome.accepted,
        "rows_failed_at_braze": outcome.failed,
        "rows_held_ambiguous": outcome.held_total,
        "rows_held_in_flight": outcome.held,
        "rows_held_by_crash_recovery": outcome.recovered_held,
        "rows_ambiguous": outcome.ambiguous,
        "rows_not_sent_retry_next_run": outcome.not_sent,
        "rows_settled_by_another_run": outcome.settled_since_delta,
        "recovered_from_crash_settled": outcome.recovered_settled,
        "recovered_from_crash_ambiguous": outcome.recovered_ambiguous,
        "recovered_from_crash_unsent": outcome.recovered_unsent,
        "failed_reasons": dg.MetadataValue.json(outcome.failed_reasons),
        "failed_examples": dg.MetadataValue.json(outcome.failed_examples),
        "requests": outcome.requests,
        "request_attempts": outcome.attempts,
        "rate_limited_429": outcome.rate_limited,
        "estimated_data_points": outcome.estimated_data_points,
        "rows_unchanged_not_sent": outcome.unchanged,
        "data_points_sent": outcome.estimated_data_points,
        "data_points_saved": outcome.data_points_saved,
        "seconds": outcome.seconds,
        "objects_per_second": round(outcome.objects_per_second, 1),
        "watermark_before": outcome.watermark_before or "none",
        "watermark_after": outcome.watermark_after or "none",
    }
