"""What a delta run found and where it put the rows: `DeltaManifest`, the `<sync>_delta` asset's
output.

The manifest is the delta's result, not its computation: a plain record that `DeltaIOManager`
stores as JSON and that the checks, the asset metadata and delivery read back. The scan
(`delta.py`) and the writer (`delta_writer.py`) both fill it in; it is its own module so that
neither of them has to define what the other one fills, and a reader of the record finds it
alone. Its name stays importable from `delta.py`, where it was first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Rejected rows (and rows stamped in the future) a manifest keeps as examples.
EXAMPLES_KEPT = 5


@dataclass
class DeltaManifest:
    """What `<sync>_delta` materialized: where the rows are and what was found on the way."""

    sync: str
    data_type: str
    run_id: str
    window_start: str | None
    window_end: str
    reaches_now: bool
    valid_path: str
    rejected_path: str
    rows_read: int = 0
    already_settled: int = 0
    valid: int = 0
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    rejected_examples: list[dict[str, str]] = field(default_factory=list)
    future_rows: int = 0
    future_examples: list[dict[str, str]] = field(default_factory=list)
    late_outside_lookback: int = 0
    #: rows with UPDATED_AT before the sync's partitions_start: never read, so counted here
    before_partitions_start: int = 0
    #: rows that failed in a way validation did not foresee (rejected, never sent)
    rows_unprocessable: int = 0
    #: rows that were exact copies of another row of the delta (sent, or rejected, once)
    duplicate_rows: int = 0
    #: parts of the source that could not be read at all (files over 512 MB, unknown formats)
    unreadable: list[str] = field(default_factory=list)
    #: parts (files) read in full by this delta, with their version, and those skipped as settled
    parts: dict[str, str] = field(default_factory=dict)
    parts_skipped: int = 0
    max_updated_at: str | None = None
    #: data points the valid rows cost (attributes syncs: only the attributes that changed)
    estimated_data_points: int = 0
    #: attributes syncs sending only what changed: where the unchanged rows are, how many, and
    #: the data points they and the trimmed rows save
    unchanged_path: str | None = None
    unchanged: int = 0
    data_points_saved: int = 0
    #: when the scan began: rows settled from then on by another run are checked again at delivery
    computed_at: str | None = None
    #: the watermark the window was computed from: delivery commits against it, so a release that
    #: moves the watermark back between the two steps is kept (`StateStore.commit_watermark`)
    watermark_before: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
