"""The sync log in the PostgreSQL backend: run records in `runs`, rows in `ledger` (see
`sync_log.py`). A user's rows are found by scanning the sync's lookup hashes: searches and purges
are an operator's rare commands, and an index would cost every settled chunk."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from braze_assets.state.sync_log import ERROR_STATUSES_SQL, FORGOTTEN, ROW_SCHEMA, SyncLog, by_day

Cursor = Callable[[], contextlib.AbstractContextManager[Any]]
_MATCHING = "string_to_array(identifier_hash, ' ') && %s::text[]"


class PostgresSyncLog(SyncLog):
    def __init__(self, sync: str, cursor: Cursor):
        super().__init__(sync)
        self._cursor = cursor

    def _all(self, sql: str, params: tuple[Any, ...] | list[Any]) -> list[tuple[Any, ...]]:
        with self._cursor() as cursor:
            cursor.execute(sql, params)
            rows: list[tuple[Any, ...]] = cursor.fetchall() if cursor.description else []
            return rows

    # ------------------------------------------------------------------ runs
    def record_run(self, record: dict[str, Any]) -> None:
        run_id = record.get("run_id") or ""
        with self._cursor() as cursor:  # one transaction: the run's record is replaced whole
            cursor.execute("DELETE FROM runs WHERE sync = %s AND run_id = %s", (self.sync, run_id))
            cursor.execute(
                "INSERT INTO runs (sync, run_id, outcome) VALUES (%s, %s, %s)",
                (self.sync, run_id, json.dumps(record)),
            )

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._all(
            "SELECT outcome FROM runs WHERE sync = %s ORDER BY id DESC LIMIT %s", (self.sync, limit)
        )
        return [dict(outcome) for (outcome,) in rows]

    def delete_runs(self, before: dt.datetime) -> int:
        with self._cursor() as cursor:
            cursor.execute("DELETE FROM runs WHERE sync = %s AND finished_at < %s", (self.sync, before))
            return int(cursor.rowcount)

    # ------------------------------------------------------------------ rows
    def rows(
        self,
        *,
        status: str | None = None,
        errors_only: bool = False,
        lookup: list[str] | None = None,
        run_id: str | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        where: list[str] = ["sync = %s"]
        params: list[Any] = [self.sync]
        if status is not None:
            where.append("status = %s")
            params.append(status)
        if errors_only:
            where.append(f"status IN {ERROR_STATUSES_SQL}")
        if lookup is not None:
            where.append(_MATCHING)
            params.append(lookup)
        if run_id is not None:
            where.append("run_id = %s")
            params.append(run_id)
        sql = (
            f"SELECT {', '.join(ROW_SCHEMA.names)} FROM ledger WHERE {' AND '.join(where)} "
            "ORDER BY changed_at DESC, row_hash"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        names = ROW_SCHEMA.names
        found = [dict(zip(names, row, strict=True)) for row in self._all(sql, params)]
        return pa.Table.from_pylist(found, schema=ROW_SCHEMA)

    def status_counts(self, run_id: str | None = None) -> dict[str, int]:
        rows = self._all(
            "SELECT status, count(*) FROM ledger WHERE sync = %s "
            "AND (%s::text IS NULL OR run_id = %s) GROUP BY 1",
            (self.sync, run_id, run_id),
        )
        return {status: int(n) for status, n in rows}

    def daily_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        rows = self._all(
            "SELECT to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), status, count(*) FROM ledger "
            "WHERE sync = %s AND run_id = %s AND updated_at IS NOT NULL GROUP BY 1, 2",
            (self.sync, run_id),
        )
        return by_day([(d, s, n) for d, s, n in rows])

    def top_messages(self, run_id: str, limit: int = 5) -> list[tuple[str, str, int]]:
        rows = self._all(
            "SELECT status, coalesce(message, ''), count(*) AS n FROM ledger WHERE sync = %s "
            f"AND run_id = %s AND status IN {ERROR_STATUSES_SQL} GROUP BY 1, 2 "
            "ORDER BY n DESC, 1, 2 LIMIT %s",
            (self.sync, run_id, limit),
        )
        return [(s, m, int(n)) for s, m, n in rows]

    # ------------------------------------------------------------------ retention and forgetting
    def clear_row_details(self, before: dt.datetime) -> int:
        with self._cursor() as cursor:
            cursor.execute(
                "UPDATE ledger SET identifier = NULL, identifier_hash = NULL, message = NULL "
                "WHERE sync = %s AND changed_at < %s AND status <> 'held' AND (identifier IS NOT NULL "
                "OR identifier_hash IS NOT NULL OR message IS NOT NULL)",
                (self.sync, before),
            )
            return int(cursor.rowcount)

    def forget_rows(self, lookup: list[str], user_keys: list[str] | None = None) -> int:
        with self._cursor() as cursor:
            if user_keys:
                cursor.execute(
                    "DELETE FROM remembered_attributes WHERE sync = %s AND user_key = ANY(%s)",
                    (self.sync, list(user_keys)),
                )
            cursor.execute(
                "DELETE FROM held_details WHERE sync = %s AND row_hash IN "
                f"(SELECT row_hash FROM ledger WHERE sync = %s AND {_MATCHING})",
                (self.sync, self.sync, lookup),
            )
            cursor.execute(
                f"UPDATE ledger SET identifier = NULL, identifier_hash = NULL, message = %s "
                f"WHERE sync = %s AND {_MATCHING}",
                (FORGOTTEN, self.sync, lookup),
            )
            return int(cursor.rowcount)
