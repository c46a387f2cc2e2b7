"""What recovery does with the rows a dead run left planned, decided from its request journal.

Both state backends keep the same two records of a delivery in flight: `planned` (the rows of the
chunk being sent, with their request ids) and the journal (a `started` line per request just before
it goes on the wire, a `done` line with its known outcome after). This module turns them into one
decision per request, so the backends only store and apply it:

* answered (a `done` record): its rows take the journaled outcome; rows listed with no status are
  sent again, unlisted rows take the request's (`others`, "accepted");
* started without an answer: ambiguous, Braze may have processed it; held or sent again by the
  sync's policy;
* never started: it never left the machine; sent again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

#: The message a row held by recovery keeps in the ledger.
AMBIGUOUS_MESSAGE = "outcome unknown: the process stopped while this request was in flight"


@dataclass
class JournalRecords:
    """What a journal holds: the requests that went on the wire, and the answers by request id."""

    started: set[str] = field(default_factory=set)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_line(self, line: str) -> None:
        """One line of the embedded journal file: `S <id>` or `D <json>`."""
        kind, _, rest = line.partition(" ")
        if kind == "S":
            self.started.add(rest.strip())
        elif kind == "D":
            try:
                record = json.loads(rest)
            except json.JSONDecodeError:
                return  # a line cut short by the crash: that request stays ambiguous
            self.done[record["batch"]] = record


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


def plan_recovery(planned: Iterable[tuple[str, int]], journal: JournalRecords) -> RecoveryPlan:
    """Decide every planned request, given (request id, planned rows) and the journal."""
    counts = {"recovered_settled": 0, "recovered_ambiguous": 0, "recovered_unsent": 0}
    listed: list[tuple[str, str, str | None, str | None]] = []
    answered: list[tuple[str, str | None]] = []
    ambiguous: list[str] = []
    for batch_id, count in planned:
        record: Mapping[str, Any] | None = journal.done.get(batch_id)
        if record is not None:
            listed += [(r[0], batch_id, r[1], r[2]) for r in record["rows"]]
            # journals written before "others" listed every row: the rest were not settled
            answered.append((batch_id, record.get("others")))
            counts["recovered_settled"] += count
        elif batch_id in journal.started:
            ambiguous.append(batch_id)
            counts["recovered_ambiguous"] += count
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
