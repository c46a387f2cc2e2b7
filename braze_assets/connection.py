"""Test connection, like CDI's: connect, check the table against the data type, preview the first
rows with their validation results. Nothing is sent to Braze and no state changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa

from braze_assets.catalog_items import check_catalog_rows
from braze_assets.config import SyncConfig
from braze_assets.datatypes import DATA_TYPES, DataTypeSpec, validate_rows
from braze_assets.masking import mask_identifiers, mask_key
from braze_assets.sources.base import SourceError
from braze_assets.sources.factory import make_source

PREVIEW_ROWS = 10


@dataclass
class ConnectionReport:
    sync: str
    source: str
    ok: bool
    message: str
    columns: dict[str, str] = field(default_factory=dict)
    row_count: int | None = None
    newest_updated_at: str | None = None
    preview: list[dict[str, Any]] = field(default_factory=list)


def check_connection(sync: SyncConfig, resource: Any, rows: int = PREVIEW_ROWS) -> ConnectionReport:
    """Never raises for a source problem: the report says what is wrong (credentials never shown)."""
    spec = DATA_TYPES[sync.data_type]
    source = make_source(sync, resource)
    report = ConnectionReport(sync.name, source.description, False, "")
    try:
        columns = source.check_shape(spec)
        report.columns = source.columns()
        report.row_count = source.count()
        newest = source.max_updated_at()
        report.newest_updated_at = newest.isoformat() if newest else None
        sample = source.preview(rows).select(columns).to_pylist()
    except SourceError as exc:
        report.message = f"sync {sync.name}: {exc}"
        return report
    if spec.name == "catalogs":
        _preview_items(report, sample)
    else:
        _preview_rows(report, sample, spec)
    invalid = sum(1 for row in report.preview if not row["valid"])
    report.ok = True
    report.message = (
        f"connected to {source.description}: {report.row_count:,} rows, columns "
        f"{', '.join(columns)}; {len(sample) - invalid} of {len(sample)} preview rows "
        "valid"
    )
    return report


def _preview_items(report: ConnectionReport, sample: list[dict]) -> None:
    """Catalog rows: item ids (not personal data) are shown as they are."""
    if not sample:
        return
    checked = check_catalog_rows(pa.Table.from_pylist(sample))
    for i, row in enumerate(sample):
        payload = None
        if i in checked.objects:
            payload = orjson.loads(checked.objects[i])[1]
        report.preview.append(
            {
                "identifier": checked.shown[i],
                "updated_at": row["UPDATED_AT"].isoformat() if row.get("UPDATED_AT") else None,
                "payload_keys": sorted(k for k in payload if k != "id")[:20] if payload else None,
                "valid": i not in checked.failures,
                "reasons": checked.failures.get(i, []),
            }
        )


def _preview_rows(report: ConnectionReport, sample: list[dict], spec: DataTypeSpec) -> None:
    checked = validate_rows(sample, spec)
    for i, row in enumerate(sample):
        payload = checked.payloads[i]
        report.preview.append(
            {
                "identifier": mask_identifiers(checked.identifiers(i)),
                "updated_at": row["UPDATED_AT"].isoformat() if row.get("UPDATED_AT") else None,
                "payload_keys": sorted(map(mask_key, payload))[:20] if isinstance(payload, dict) else None,
                "valid": i not in checked.failures,
                "reasons": checked.failures.get(i, []),
            }
        )


def preview_markdown(report: ConnectionReport) -> str:
    """The preview as a Markdown table for the Dagster UI (identifiers masked)."""
    if not report.preview:
        return report.message
    lines = ["| identifier | UPDATED_AT | payload keys | valid | reasons |", "|---|---|---|---|---|"]
    for row in report.preview:
        keys = ", ".join(row["payload_keys"] or [])
        lines.append(
            f"| {row['identifier']} | {row['updated_at'] or ''} | {keys} | "
            f"{'yes' if row['valid'] else 'no'} | {'; '.join(row['reasons'])} |"
        )
    return "\n".join(lines)
