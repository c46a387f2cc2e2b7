"""What one Braze answer means for the rows of its request.

Kept apart from the sending loop (`delivery.py`) because it is the part of delivery that decides
truth: which rows Braze accepted, which failed and why, which are unknown (ambiguous) and, under
the `hold` policy, held for a person to decide. It only reads the answer and writes each row's
status and message and the run's counts; the loop settles them in the ledger.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from braze_assets.braze.client import RequestOutcome
from braze_assets.delta_schema import reason_key
from braze_assets.request_plan import PlannedRequest
from braze_assets.sync_outcome import SyncOutcome


class BrazeRequestError(RuntimeError):
    """Braze refused a request in a way no row can fix (wrong URL): a global error."""


#: An accepted attributes row's message when its request's answer had errors: what Braze holds
#: of the user is then not known, so it is not remembered (`accepted_attributes`).
UNSURE = (
    "accepted, but Braze reported errors in this request (one tied to no row may be this row's, "
    "and an invalid nested value drops every nested update of the request): what Braze holds of "
    "this user is not remembered, so the next row of theirs goes whole"
)


#: The message of a row whose request's outcome is unknown under the `resend` policy: not
#: settled (sent again next run), and its user remembered as holding nothing (`accepted_attributes`).
RESENT_UNKNOWN = "outcome unknown after sending; sent again by the next run"


@dataclass
class AnswerReader:
    """Reads the answers of one delivery into its outcome (`hold`: the ambiguous policy is
    `hold`, so rows whose outcome is unknown are held rather than sent again)."""

    outcome: SyncOutcome
    endpoint: str
    hold: bool
    log: Callable[[str], None]
    failed_reasons: Counter[str] = field(default_factory=Counter)

    def count(self, result: RequestOutcome) -> None:
        """One request answered (after its retries)."""
        self.outcome.requests += 1
        self.outcome.attempts += result.attempts
        self.outcome.rate_limited += result.rate_limited

    def fail(self, status: list[str | None], messages: list[str | None], i: int, message: str) -> None:
        """Row `i` failed with `message` (Braze's words)."""
        status[i], messages[i] = "failed", message
        self.outcome.failed += 1
        self.failed_reasons[reason_key(message)] += 1

    def apply(
        self,
        request: PlannedRequest,
        result: RequestOutcome,
        status: list[str | None],
        messages: list[str | None],
    ) -> None:
        """Each row of `request` after `result`: its status and message (None: not settled)."""
        out = self.outcome
        self.count(result)
        rows = request.rows
        if result.kind == "refused":
            out.not_sent += len(rows)
            reason = result.message or "refused"
            out.not_sent_reasons[reason] = out.not_sent_reasons.get(reason, 0) + len(rows)
            return
        if result.kind == "ambiguous":
            out.ambiguous += len(rows)
            if self.hold:
                out.held += len(rows)
                for i in rows:
                    status[i] = "held"
                    messages[i] = f"outcome unknown after sending ({result.message}); held"
            else:
                out.not_sent += len(rows)  # resend policy: forgotten, sent again next run
                for i in rows:  # not settled, but Braze may have applied it
                    messages[i] = RESENT_UNKNOWN
            return
        if result.ambiguous_attempts:
            out.ambiguous += len(rows)  # a retried attempt may also have been processed
        if result.kind == "rejected" and result.status == 404:
            raise BrazeRequestError(f"Braze answered 404 for {self.endpoint}: check the REST endpoint URL")
        errors = result.body.get("errors") if isinstance(result.body, dict) else None
        if result.kind == "answered" and not errors:  # the usual answer: every row accepted
            for i in rows:
                status[i] = "accepted"
            out.accepted += len(rows)
            return
        by_index: dict[int, str] = {}
        for error in errors or []:
            index = error.get("index") if isinstance(error, dict) else None
            if isinstance(index, int) and 0 <= index < len(rows):
                by_index[index] = str(error.get("type") or error.get("message") or error)
            else:
                out.unattributed_errors += 1
                self.log(f"{out.sync}: Braze reported an error without a row index: {str(error)[:200]}")
        # Attributes only (what an accepted row's user holds is remembered for the diff): an error
        # tied to no row may be any row's, and Braze drops every nested attribute update of a
        # request holding one invalid nested value, so no row of such a request is sure.
        unsure = request.array == "attributes" and bool(errors)
        for position, i in enumerate(rows):
            message = by_index.get(position)
            if result.kind == "rejected":
                message = message or f"Braze refused the request: {result.message}"
            if message:
                self.fail(status, messages, i, message)
            else:
                status[i] = "accepted"
                out.accepted += 1
                if unsure:
                    messages[i] = UNSURE
