"""The sensors that turn sync runs into alerts (`alerts.py`), however the run was started.

A run is tied to its syncs by the job's `braze_assets/sync` tag (schedules, sensors, the CLI) or by
its asset selection (Materialize in the UI, backfills), so an alert always names its sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dagster as dg

from braze_assets.alerts import (
    Alert,
    AlertError,
    failure_metadata,
    row_error_share,
    send,
    step_failure_cause,
)
from braze_assets.config import SyncConfig

SYNC_TAG = "braze_assets/sync"
_SUFFIXES = ("_sync_results", "_delta")


def syncs_of_run(run: dg.DagsterRun, names: set[str]) -> list[str]:
    """The syncs a run materialized (or tried to)."""
    found = {run.tags[SYNC_TAG]} & names if SYNC_TAG in run.tags else set()
    for key in run.asset_selection or ():
        last = key.path[-1]
        for suffix in _SUFFIXES:
            if last.endswith(suffix) and last[: -len(suffix)] in names:
                found.add(last[: -len(suffix)])
    return sorted(found)


def run_totals(instance: dg.DagsterInstance, run_id: str, sync: str) -> dict[str, Any] | None:
    """The run's totals: its `delivery_complete` check result on `<sync>_sync_results`, recorded
    once per run however many days it covered (`partition_reports.py`)."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION, limit=10_000
    ).records
    key = dg.AssetKey(f"{sync}_sync_results")
    for record in records:
        event = record.event_log_entry.dagster_event
        evaluation = event.event_specific_data if event is not None else None
        if (
            isinstance(evaluation, dg.AssetCheckEvaluation)
            and evaluation.asset_key == key
            and evaluation.check_name == "delivery_complete"
            and evaluation.partition is None
        ):
            return {name: value.value for name, value in evaluation.metadata.items()}
    return None


def blocking_checks(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """What each blocking check that failed in the run said (`check: description`): a run a check
    blocked fails with Dagster's generic error, and the check's own sentence says why."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION, limit=10_000
    ).records
    said = []
    for record in records:
        event = record.event_log_entry.dagster_event
        evaluation = event.event_specific_data if event is not None else None
        if (
            isinstance(evaluation, dg.AssetCheckEvaluation)
            and not evaluation.passed
            and evaluation.severity == dg.AssetCheckSeverity.ERROR
        ):
            said.append(f"{evaluation.check_name}: {evaluation.description or 'failed'}")
    return list(dict.fromkeys(said))  # a run over several days evaluates each check once per day


def _failure_totals(failures: Sequence[dg.DagsterEvent]) -> dict[str, Any]:
    """The counts a failed delivery carries on its failure (`dg.Failure` metadata): such a run
    records no `delivery_complete` result."""
    for event in failures:
        metadata = failure_metadata(event.step_failure_data)
        if metadata:
            return metadata
    return {}


def _counts(metadata: dict[str, Any]) -> dict[str, int]:
    return {k: int(v) for k, v in metadata.items() if k.startswith("rows_") and isinstance(v, int)}


def _deliver(context: dg.RunStatusSensorContext, alert: Alert, sync: SyncConfig) -> None:
    try:
        sent = send(alert, sync.alerts)
    except AlertError as exc:
        context.log.error(str(exc))
        return
    context.log.info(f"{alert.subject} (run {alert.run_id}): sent by {', '.join(sent)}")


def build_alert_sensors(syncs: list[SyncConfig]) -> list[dg.SensorDefinition]:
    by_name = {s.name: s for s in syncs}
    alerted = {s.name: s for s in syncs if s.alerts.emails or s.alerts.slack_webhook_env}

    # Every run of the instance, not only those launched from this code location: a run of
    # `braze-assets run` or `dagster asset materialize` runs in its own process and has no
    # location of origin, so Dagster's default filter would never show it to these sensors.
    # `syncs_of_run` then keeps the runs of this project's syncs.
    @dg.run_failure_sensor(
        name="sync_failure_alert",
        monitor_all_code_locations=True,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Alerts (email, Slack: each sync's `alerts`) when a sync's run fails: a global "
        "error such as an unreachable warehouse, a refused API key or a blocking check.",
    )
    def sync_failure_alert(context: dg.RunFailureSensorContext) -> None:
        run = context.dagster_run
        failures = context.get_step_failure_events()
        detail = step_failure_cause(failures[0]) if failures else (context.failure_event.message or "")
        blocked = blocking_checks(context.instance, run.run_id)
        if blocked:
            detail = "delivery blocked by " + "; ".join(blocked) + ": nothing was sent"
        for name in syncs_of_run(run, set(by_name)):
            context.log.error(f"braze_assets sync {name} failed in run {run.run_id}: {detail}")
            if name in alerted:
                totals = run_totals(context.instance, run.run_id, name) or _failure_totals(failures)
                counts = _counts(totals)
                alert = Alert(name, run.run_id, "error", "error", detail, counts)
                _deliver(context, alert, alerted[name])

    @dg.run_status_sensor(
        name="sync_result_alert",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitor_all_code_locations=True,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Alerts when a sync's run rejected or failed more rows than its "
        "`alerts.row_error_threshold`, and on every success when `alerts.on_success` is set.",
    )
    def sync_result_alert(context: dg.RunStatusSensorContext) -> None:
        run = context.dagster_run
        for name in syncs_of_run(run, set(alerted)):
            sync = alerted[name]
            metadata = run_totals(context.instance, run.run_id, name)
            if metadata is None:
                continue  # the run did not deliver this sync (a check blocked it: a failure)
            counts = _counts(metadata)
            status, detail = str(metadata.get("status", "")), str(metadata.get("status_detail", ""))
            share = row_error_share(counts)
            if share > sync.alerts.row_error_threshold:
                detail = (
                    f"{share:.1%} of the rows failed (threshold "
                    f"{sync.alerts.row_error_threshold:.1%}); {detail}"
                )
                _deliver(context, Alert(name, run.run_id, "row_errors", status, detail, counts), sync)
            elif sync.alerts.on_success:
                _deliver(context, Alert(name, run.run_id, "success", status, detail, counts), sync)

    return [sync_failure_alert, sync_result_alert]
