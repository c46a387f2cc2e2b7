"""What recovery does with the rows a dead run left planned, decided from its request journal.

Both state backends keep the same two records of a delivery in flight: `planned` (the rows of the
chunk being sent, with their request ids) and the journal (a `started` line per request just before
it goes on the wire, a `refused` line when Braze answered an attempt with a refusal it documents as
not processed and nothing else of the request is on the wire, a `done` line with its known outcome
after). This module turns them into one decision per request, so the backends only store and apply
it:

* answered (a `done` record): its rows take the journaled outcome; rows listed with no status are
  sent again, unlisted rows take the request's (`others`, "accepted"). Rows listed `held` (their
  answer was lost before the crash) are held like the rows in flight: counted held, not settled;
* started without an answer, its last record a `started`: ambiguous, Braze may have processed it;
  held or sent again by the sync's policy;
* its last record a `refused` (waiting to retry after a 429, say): Braze processed none of its
  attempts, so it is sent again, as if it had never started;
* never started: it never left the machine; sent again.

Journals written before `refused` existed hold only `started` and `done` lines, and are read the
same way as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from braze_assets.config import AmbiguousPolicy

#: The message a row held by recovery keeps in the ledger.
AMBIGUOUS_MESSAGE = "outcome unknown: the process stopped while this request was in flight"


@dataclass
class JournalRecords:
    """What a journal holds: the requests that went on the wire, and the answers by request id."""

    started: set[str] = field(default_factory=set)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: requests whose last record says Braze refused an attempt unprocessed, none sent since
    refused: set[str] = field(default_factory=set)

    def add(self, kind: str, batch_id: str, record: Mapping[str, Any] | None = None) -> None:
        """One record, in the order they were written: `S` (an attempt goes on the wire), `R`
        (Braze refused that attempt unprocessed; no other is on the wire) or `D` (the answer)."""
        if kind == "S":
            self.started.add(batch_id)
            self.refused.discard(batch_id)  # a retry went out: in flight again
        elif kind == "R":
            self.refused.add(batch_id)
        elif kind == "D" and record is not None:
            self.done[batch_id] = dict(record)

    def add_line(self, line: str) -> None:
        """One line of the embedded journal file: `S <id>`, `R <id>` or `D <json>`."""
        kind, _, rest = line.partition(" ")
        if kind in ("S", "R"):
            self.add(kind, rest.strip())
        elif kind == "D":
            try:
                record = json.loads(rest)
            except json.JSONDecodeError:
                return  # a line cut short by the crash: that request stays ambiguous
            self.add("D", record["batch"], record)


def done_record(batch_id: str, rows: list[tuple[str, str | None, str | None]]) -> dict[str, Any]:
    """The journaled answer of a request: its rows not accepted, as (row_hash, status or None to
    send again, message); every other row of the request was accepted."""
    return {"batch": batch_id, "rows": rows, "others": "accepted"}


@dataclass
class RecoveryPlan:
    """The decision for every planned request of a dead run."""

    answered: pa.Table  # batch_id, others: the status of a request's rows it did not list
    listed: pa.Table  # row_hash, batch_id, status, message: rows the answer listed
    ambiguous: list[str]  # request ids that went out without a journaled answer
    counts: dict[str, int]


def plan_recovery(
    planned: Iterable[tuple[str, int]], journal: JournalRecords, policy: AmbiguousPolicy
) -> RecoveryPlan:
    """Decide every planned request, given (request id, planned rows), the journal and the sync's
    ambiguous policy.

    The counts say what becomes of the rows: `recovered_settled` (accepted or failed, by Braze's
    journaled answer), `recovered_ambiguous` (outcome unknown: in flight at the crash, or held
    by the dead run itself), of which `recovered_held` are held (all those the dead run held; the
    ones in flight too under `hold`), and `recovered_unsent` (sent again). A row counted held is a
    row the ledger holds, so a run's held count and a later reconcile agree."""
    counts = {
        "recovered_settled": 0,
        "recovered_ambiguous": 0,
        "recovered_held": 0,
        "recovered_unsent": 0,
    }
    listed: list[tuple[str, str, str | None, str | None]] = []
    answered: list[tuple[str, str | None]] = []
    ambiguous: list[str] = []
    for batch_id, count in planned:
        record: Mapping[str, Any] | None = journal.done.get(batch_id)
        if record is not None:
            rows = [(r[0], batch_id, r[1], r[2]) for r in record["rows"]]
            listed += rows
            # journals written before "others" listed every row: the rest were not settled
            others = record.get("others")
            answered.append((batch_id, others))
            held = sum(1 for r in rows if r[2] == "held")
            unsent = sum(1 for r in rows if r[2] is None)
            unlisted = max(0, count - len(rows))
            counts["recovered_ambiguous"] += held
            counts["recovered_held"] += held
            counts["recovered_unsent"] += unsent + (unlisted if others is None else 0)
            counts["recovered_settled"] += len(rows) - held - unsent + (unlisted if others else 0)
        elif batch_id in journal.started and batch_id not in journal.refused:
            ambiguous.append(batch_id)
            counts["recovered_ambiguous"] += count
            counts["recovered_held"] += count if policy == "hold" else 0
        else:
            counts["recovered_unsent"] += count
    return RecoveryPlan(
        answered=pa.table(
            {
                "batch_id": pa.array([a[0] for a in answered], pa.string()),
                "others": pa.array([a[1] for a in answered], pa.string()),
            }
        ),
        listed=pa.table(
            {
                "row_hash": pa.array([r[0] for r in listed], pa.string()),
                "batch_id": pa.array([r[1] for r in listed], pa.string()),
                "status": pa.array([r[2] for r in listed], pa.string()),
                "message": pa.array([r[3] for r in listed], pa.string()),
            }
        ),
        ambiguous=ambiguous,
        counts=counts,
    )
