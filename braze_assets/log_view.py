"""The sync log as people read it: Markdown tables for the Dagster UI and the terminal, and the
row-level log exported as CSV or Parquet.

Everything shown here is already safe to show: identifiers are masked and reasons quote values
masked when the rows are settled (`masking.py`); lookup hashes are never shown or exported.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

#: CDI's names for the run statuses.
STATUS_NAMES = {"success": "Success", "partial_success": "Partial success", "held": "Held", "error": "Error"}
#: Columns of the runs table: (heading, record key).
RUN_COLUMNS = (
    ("run", "run_id"),
    ("status", "status"),
    ("started (UTC)", "started_at"),
    ("seconds", "seconds"),
    ("read", "rows_read"),
    ("rejected", "rows_rejected"),
    ("accepted", "accepted"),
    ("failed at Braze", "failed"),
    ("held", "held"),
    ("not sent", "not_sent"),
    ("unchanged", "unchanged"),
    ("data points", "estimated_data_points"),
    ("saved", "data_points_saved"),
    ("watermark before", "watermark_before"),
    ("watermark after", "watermark_after"),
)
ExportFormat = Literal["csv", "parquet"]


def cell(value: object) -> str:
    """A Markdown table cell: pipes and line breaks would end it."""
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _when(text: object) -> str:
    if not isinstance(text, str) or not text:
        return ""
    return dt.datetime.fromisoformat(text).astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def run_row(record: dict[str, Any]) -> list[str]:
    held = int(record.get("held") or 0) + int(record.get("recovered_held") or 0)
    shown = {
        **record,
        "run_id": str(record.get("run_id") or "")[:8],
        "status": STATUS_NAMES.get(str(record.get("status")), record.get("status") or "?"),
        "started_at": _when(record.get("started_at")),
        "seconds": f"{float(record.get('seconds') or 0):.1f}",
        "held": held,
        "watermark_before": _when(record.get("watermark_before")) or "none",
        "watermark_after": _when(record.get("watermark_after")) or "none",
    }
    return [cell(shown.get(key, "")) for _, key in RUN_COLUMNS]


def markdown_table(headings: Iterable[str], rows: Iterable[list[str]]) -> str:
    headings = list(headings)
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def runs_markdown(records: list[dict[str, Any]]) -> str:
    """The latest runs, newest first."""
    if not records:
        return "No runs recorded yet."
    return markdown_table((h for h, _ in RUN_COLUMNS), (run_row(r) for r in records))


def rows_markdown(rows: pa.Table) -> str:
    """Rows of the log (`ROW_SCHEMA`), as they come."""
    if not rows.num_rows:
        return "No rows."

    def shown(value: object) -> str:
        if isinstance(value, dt.datetime):
            return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        return cell(value)

    return markdown_table(rows.column_names, ([shown(v) for v in row.values()] for row in rows.to_pylist()))


def errors_markdown(top: list[tuple[str, str, int]]) -> str:
    """A run's most common reasons for rows not accepted."""
    if not top:
        return "No row errors."
    return markdown_table(
        ("rows", "status", "reason or Braze's message"),
        ([f"{n:,}", status, cell(message[:300])] for status, message, n in top),
    )


def sync_log_markdown(sync: str, records: list[dict[str, Any]], top: list[tuple[str, str, int]]) -> str:
    """What the UI shows of a sync's log on each `<sync>_sync_results` materialization."""
    return (
        f"#### {sync}: this run's row errors\n\n{errors_markdown(top)}\n\n"
        f"#### {sync}: latest runs\n\n{runs_markdown(records)}\n\n"
        f"Search, export and purge the log with `braze-assets log --sync {sync}` (see `docs/sync-log.md`)."
    )


def export_rows(rows: pa.Table, path: str | Path, fmt: ExportFormat) -> int:
    """Write the log's rows to a CSV or Parquet file; returns how many."""
    if fmt == "parquet":
        pq.write_table(rows, str(path))
    else:
        pacsv.write_csv(rows, str(path))
    return rows.num_rows
