"""What `braze-assets run` and `demo` say of each sync's run: its CDI-style status and why, what
it read, sent and settled, as a dict (`--json`) or as text."""

from __future__ import annotations


def summarize_run(name: str, keys, result, reclaimed: list[str] | None = None) -> dict:
    """The sync's CDI-style status and why, and what the run read and sent."""
    summary: dict = {
        "sync": name,
        "partitions": f"{keys.start}..{keys.end}",
        "status": "error",
        "status_detail": "",
        "run_id": result.run_id,
        "reclaimed": reclaimed or [],
    }
    if result.is_node_success(f"{name}_delta"):
        delta = result.output_for_node(f"{name}_delta")
        summary.update(
            read=delta.rows_read,
            already_settled=delta.already_settled,
            valid=delta.valid,
            rejected=delta.rejected,
            rejected_reasons=delta.rejected_reasons,
            future_held_back=delta.future_rows,
            late_outside_lookback=delta.late_outside_lookback,
        )
    if result.is_node_success(f"{name}_sync_results"):
        out = result.output_for_node(f"{name}_sync_results")
        summary.update(
            status=out.status,
            status_detail=out.status_detail,
            sent=out.accepted + out.failed + out.held,
            accepted=out.accepted,
            failed=out.failed,
            held=out.held_total,
            ambiguous=out.ambiguous,
            not_sent=out.not_sent,
            failed_reasons=out.failed_reasons,
            requests=out.requests,
            recovered_settled=out.recovered_settled,
            recovered_held=out.recovered_held,
            recovered_unsent=out.recovered_unsent,
            data_type=out.data_type,
            unchanged=out.unchanged,
            data_points_sent=out.estimated_data_points,
            data_points_saved=out.data_points_saved,
            watermark_before=out.watermark_before,
            watermark_after=out.watermark_after,
        )
    elif result.is_node_failed(f"{name}_sync_results"):
        summary.update(_counts_of_failed_delivery(result, f"{name}_sync_results"))
    else:
        checks = [
            e for e in result.get_asset_check_evaluations() if not e.passed and e.severity.value == "ERROR"
        ]
        # a run over several days records each check once per day: name each check once
        summary["blocked_by"] = list(dict.fromkeys(e.check_name for e in checks))
        if checks:
            summary["status_detail"] = (
                f"delivery blocked by check(s) {', '.join(summary['blocked_by'])}: nothing was sent"
            )
    error = _run_error(result)
    if error:  # a step failure is an error, whatever was delivered before it
        summary.update(status="error", status_detail=error, error=error)
    elif not summary["status_detail"]:
        summary["status_detail"] = "the run ended without delivering"
    return summary


#: what a failed delivery (a `dg.Failure` with the results' metadata) still tells
_FAILED_DELIVERY_COUNTS = {
    "rows_sent": "sent",
    "rows_accepted": "accepted",
    "rows_failed_at_braze": "failed",
    "rows_held_ambiguous": "held",
    "rows_ambiguous": "ambiguous",
    "rows_not_sent_retry_next_run": "not_sent",
    "failed_reasons": "failed_reasons",
    "requests": "requests",
    "watermark_before": "watermark_before",
    "watermark_after": "watermark_after",
}


def _counts_of_failed_delivery(result, node: str) -> dict:
    from braze_assets.alerts import failure_metadata

    metadata = failure_metadata(result.failure_data_for_node(node))
    return {key: metadata[name] for name, key in _FAILED_DELIVERY_COUNTS.items() if name in metadata}


def _run_error(result) -> str | None:
    """The cause of the first step failure (the user's error under Dagster's "Error occurred
    while executing op" wrapper), else the run failure's message."""
    failures = result.get_step_failure_events()
    if failures:
        from braze_assets.alerts import step_failure_cause

        return step_failure_cause(failures[0])
    if not result.success:
        return result.get_run_failure_event().message or "the run failed"
    return None


def print_summaries(summaries: list[dict], emulator_stats: dict | None = None) -> None:
    for s in summaries:
        run = f"partitions {s['partitions']}  run {s['run_id'][:8]}" if s["run_id"] else "no run"
        print(f"\n== {s['sync']}  [{s['status']}]  {run}")
        print(f"   {s['status_detail']}")
        for message in s.get("reclaimed", []):
            print(f"   {message}")
        if "read" in s:
            print(
                f"   read {s['read']:,}  already settled {s['already_settled']:,}  valid "
                f"{s['valid']:,}  rejected {s['rejected']:,}  future (held back) "
                f"{s['future_held_back']:,}  late outside lookback {s['late_outside_lookback']:,}"
            )
            for reason, count in s["rejected_reasons"].items():
                print(f"      rejected {count:>4}  {reason}")
        if {"sent", "requests", "accepted", "failed", "held", "not_sent"} <= s.keys():
            print(
                f"   sent {s['sent']:,} in {s['requests']:,} requests: accepted "
                f"{s['accepted']:,}  failed {s['failed']:,}  held (unknown outcome) {s['held']:,}"
                f"  not sent (retry next run) {s['not_sent']:,}"
            )
            if s.get("ambiguous"):
                print(
                    f"   answer lost for {s['ambiguous']:,} rows (Braze may have processed them; held, or "
                    "sent again where ambiguous_policy is resend)"
                )
            if s.get("recovered_settled") or s.get("recovered_held") or s.get("recovered_unsent"):
                print(
                    f"   recovered from a killed run: settled {s['recovered_settled']:,}  held "
                    f"{s['recovered_held']:,}  to send again {s['recovered_unsent']:,}"
                )
            for reason, count in s.get("failed_reasons", {}).items():
                print(f"      failed   {count:>4}  {reason}")
            if s.get("data_type") == "attributes":
                print(
                    f"   unchanged since Braze accepted them (not sent) {s['unchanged']:,}  data points "
                    f"sent {s['data_points_sent']:,}  saved {s['data_points_saved']:,}"
                )
            elif s.get("data_type") in ("events", "purchases"):  # deletions, catalogs: none billed
                print(f"   data points sent {s['data_points_sent']:,}")
            print(
                f"   watermark {s.get('watermark_before') or 'none'} -> {s.get('watermark_after') or 'none'}"
            )
        if s.get("error") and s["error"] != s["status_detail"]:
            print(f"   error: {s['error']}")
    if emulator_stats is not None:
        print(
            "\n== Braze emulator now holds: "
            + ", ".join(
                f"{emulator_stats.get(k, 0):,} {k}"
                for k in ("profiles", "events", "purchases", "deletions", "catalog_items")
            )
        )
