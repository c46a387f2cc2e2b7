"""What one run of a sync did, and the CDI-style status that sums it up.

`SyncOutcome` is what delivery fills and what `<sync>_sync_results`, the sync log, the checks and
the CLI report; `classify` turns it into a status (`RUN_STATUSES`) with one sentence saying why,
and the CLI exits with the worst status's code.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from braze_assets.delta import DeltaManifest


@dataclass
class SyncOutcome:
    """What `<sync>_sync_results` reports for one run."""

    sync: str
    data_type: str
    run_id: str
    rows_in_delta: int = 0
    settled_since_delta: int = 0
    invalid_recorded: int = 0
    accepted: int = 0
    failed: int = 0
    held: int = 0
    ambiguous: int = 0
    not_sent: int = 0
    requests: int = 0
    attempts: int = 0
    rate_limited: int = 0
    unattributed_errors: int = 0
    recovered_settled: int = 0
    recovered_ambiguous: int = 0
    recovered_unsent: int = 0
    #: of `recovered_ambiguous`, the rows parked as held: those in flight at the crash (the `hold`
    #: policy), and those the crashed run had held already (their request's answer was lost)
    recovered_held: int = 0
    #: attributes syncs sending only what changed: rows with nothing new for Braze (never sent),
    #: and the data points not billed (those rows, and unchanged attributes of the rows sent)
    unchanged: int = 0
    data_points_saved: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    failed_examples: list[dict[str, str]] = field(default_factory=list)
    #: why rows were not sent: what each refused request's last attempt met (rows by message)
    not_sent_reasons: dict[str, int] = field(default_factory=dict)
    earliest_unsettled: str | None = None
    estimated_data_points: int = 0
    seconds: float = 0.0
    watermark_before: str | None = None
    watermark_after: str | None = None
    #: CDI-style run status (`RUN_STATUSES`) and one sentence saying why
    status: str = ""
    status_detail: str = ""
    #: the delta's own counts, so the run's record in the sync log is whole
    rows_read: int = 0
    rows_rejected: int = 0
    #: when the run's delta scan began and when its results were in (ISO 8601, UTC)
    started_at: str | None = None
    finished_at: str | None = None

    @property
    def held_total(self) -> int:
        """Rows parked for a person by this run: held in flight, or by recovering a crashed run."""
        return self.held + self.recovered_held

    @property
    def objects_per_second(self) -> float:
        return (self.accepted + self.failed) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def failed_before_delivery(
        cls, sync: str, data_type: str, run_id: str, detail: str, delta: DeltaManifest | None = None
    ) -> SyncOutcome:
        """A run that ended in `error` before sending anything (source unreachable, a blocking
        check failed), as the sync log records it."""
        return cls(
            sync=sync,
            data_type=data_type,
            run_id=run_id,
            status="error",
            status_detail=detail,
            rows_read=delta.rows_read if delta else 0,
            rows_rejected=delta.rejected if delta else 0,
            # nothing was committed: the watermark stays where the delta found it
            watermark_before=delta.watermark_before if delta else None,
            watermark_after=delta.watermark_before if delta else None,
            started_at=delta.computed_at if delta else None,
            finished_at=dt.datetime.now(dt.UTC).isoformat(),
        )


#: CDI-style run statuses, worst last, and the `braze-assets run` exit code of each (2 is argparse's
#: usage error). A run with several syncs exits with the worst.
RUN_STATUSES = ("success", "partial_success", "held", "error")
EXIT_CODES = {"success": 0, "partial_success": 3, "held": 4, "error": 1}


def worst_status(statuses: list[str]) -> str:
    return max(statuses, key=RUN_STATUSES.index, default="success")


def classify(outcome: SyncOutcome, delta: DeltaManifest) -> tuple[str, str]:
    """The run's status and why, from what happened to every row it was responsible for.

    `error`: rows were due and none reached Braze (unreachable, every request refused);
    `held`: rows are parked for a person (outcome unknown); `partial_success`: some rows failed
    validation, failed at Braze or wait for the next run; `success`: everything due is settled.
    """
    due = outcome.rows_in_delta - outcome.settled_since_delta
    reached = outcome.accepted + outcome.failed + outcome.held
    if due > 0 and reached == 0 and outcome.not_sent:
        if outcome.ambiguous:  # answers lost after Braze may have processed the requests
            return "error", (
                f"Braze confirmed none of {due:,} rows: {outcome.ambiguous:,} may have been processed "
                f"(Braze's answers were lost), and all {outcome.not_sent:,} are sent again by the next "
                "run (ambiguous_policy resend)"
            )
        met = max(outcome.not_sent_reasons, key=outcome.not_sent_reasons.__getitem__, default="")
        return "error", (
            f"none of {due:,} rows reached Braze: {outcome.not_sent:,} not sent (Braze unreachable "
            f"or refusing{': ' + met if met else ''}); they are sent by the next run"
        )
    problems = []
    if outcome.held_total:
        problems.append(
            f"{outcome.held_total:,} held with an unknown outcome (release them from the release_held_job)"
        )
    if outcome.not_sent:
        problems.append(f"{outcome.not_sent:,} not sent (retried by the next run)")
    if outcome.failed:
        problems.append(f"{outcome.failed:,} failed at Braze")
    if delta.rejected:
        problems.append(f"{delta.rejected:,} rejected by validation")
    if delta.late_outside_lookback:  # found, and left: only a backfill of their days sends them
        problems.append(
            f"{delta.late_outside_lookback:,} late rows older than the lookback not sent "
            "(backfill their days)"
        )
    if outcome.unattributed_errors:
        problems.append(f"{outcome.unattributed_errors:,} Braze errors without a row index")
    if outcome.held_total:
        return "held", "; ".join(problems)
    if problems:
        return "partial_success", "; ".join(problems)
    if due <= 0 and outcome.settled_since_delta:
        return "success", (
            f"nothing to send: all {outcome.settled_since_delta:,} rows of this "
            "delta were already delivered by another run"
        )
    if outcome.rows_in_delta == 0 and outcome.unchanged:
        return "success", (
            f"{outcome.unchanged:,} rows hold nothing Braze has not already accepted: nothing sent "
            f"({outcome.data_points_saved:,} data points saved)"
        )
    if outcome.rows_in_delta == 0:
        return "success", "nothing new or changed to send"
    return "success", f"all {outcome.accepted:,} rows accepted by Braze"
