"""The sync log: what each run of a sync did, and what became of each row, kept as data.

Like CDI's sync logs, but in the operator's own database (the state backend):

* **runs**: one record per run (`SyncOutcome.to_dict()`: CDI-style status, every count, the
  watermark before and after, start and finish), kept `run_retention_days`;
* **rows**: the ledger itself: each settled row's identity (`row_hash`), masked identifier,
  lookup hashes (`lookup.py`), status, reason or Braze's message, and run. The ledger is also the
  exactly-once record, so retention never deletes a ledger row: after `row_retention_days` it
  clears the row's details (identifier, lookup hashes, message) and keeps `row_hash` and `status`,
  which are all delivery needs. Held rows keep their details until a person decides.

`forget` clears one user's details everywhere they are kept (right to be forgotten).
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from typing import Any

import pyarrow as pa

#: Row statuses that are errors in the log: refused by Braze, rejected by validation, or held.
ERROR_STATUSES = ("failed", "invalid", "held")
#: The same as an SQL list, for `status IN ...`.
ERROR_STATUSES_SQL = "(" + ", ".join(f"'{s}'" for s in ERROR_STATUSES) + ")"
#: What a row of the log shows, in order.
ROW_SCHEMA = pa.schema(
    [
        ("changed_at", pa.timestamp("us", tz="UTC")),
        ("run_id", pa.string()),
        ("status", pa.string()),
        ("identifier", pa.string()),
        ("message", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("row_hash", pa.string()),
    ]
)
#: The message a forgotten row keeps, so the log says why its details are gone.
FORGOTTEN = "details removed on request (right to be forgotten)"


class SyncLog(ABC):
    """The run and row records of one sync's log (see the module docstring)."""

    def __init__(self, sync: str):
        self.sync = sync

    # ------------------------------------------------------------------ runs
    @abstractmethod
    def record_run(self, record: dict[str, Any]) -> None:
        """Keep a run's record; it replaces an earlier record of the same run (a run that failed
        a check is recorded once however many checks failed)."""

    @abstractmethod
    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest runs' records, newest first."""

    def last_run(self) -> dict[str, Any] | None:
        latest = self.runs(limit=1)
        return latest[0] if latest else None

    # ------------------------------------------------------------------ rows
    @abstractmethod
    def rows(
        self,
        *,
        status: str | None = None,
        errors_only: bool = False,
        lookup: list[str] | None = None,
        run_id: str | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Settled rows (`ROW_SCHEMA`), newest first: all, of one status, errors only
        (`ERROR_STATUSES`), one user's (any of the `lookup` hashes) or one run's."""

    @abstractmethod
    def status_counts(self, run_id: str | None = None) -> dict[str, int]:
        """Rows by status (of one run, or all)."""

    @abstractmethod
    def daily_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        """A run's settled rows by UPDATED_AT day (UTC, `YYYY-MM-DD`) and status."""

    @abstractmethod
    def top_messages(self, run_id: str, limit: int = 5) -> list[tuple[str, str, int]]:
        """A run's most common reasons for rows not accepted: (status, message, rows)."""

    # ------------------------------------------------------------------ retention and forgetting
    @abstractmethod
    def clear_row_details(self, before: dt.datetime) -> int:
        """Clear identifier, lookup hashes and message of rows settled before `before` (held
        rows excepted); returns how many rows had details."""

    @abstractmethod
    def delete_runs(self, before: dt.datetime) -> int:
        """Delete run records of runs finished before `before`; returns how many."""

    def apply_retention(
        self, row_days: int, run_days: int, now: dt.datetime | None = None
    ) -> tuple[int, int]:
        """Clear row details and delete run records past their days: (rows, runs)."""
        rows_before, runs_before = cutoffs(row_days, run_days, now)
        return self.clear_row_details(rows_before), self.delete_runs(runs_before)

    @abstractmethod
    def forget_rows(self, lookup: list[str], user_keys: list[str] | None = None) -> int:
        """Clear the details of every row carrying one of these lookup hashes (its message says
        why), drop what held rows keep for reconcile and the attributes remembered of these users
        (`attribute_diff.user_key`); returns how many rows."""


def by_day(rows: list[tuple[str, str, int]]) -> dict[str, dict[str, int]]:
    """(day, status, rows) triples as {day: {status: rows}}."""
    days: dict[str, dict[str, int]] = {}
    for day, status, n in rows:
        days.setdefault(str(day), {})[status] = int(n)
    return days


def cutoffs(row_days: int, run_days: int, now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
    """The instants before which row details and run records are past retention."""
    now = now or dt.datetime.now(dt.UTC)
    return now - dt.timedelta(days=row_days), now - dt.timedelta(days=run_days)
