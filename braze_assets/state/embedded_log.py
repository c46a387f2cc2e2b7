"""The sync log in the embedded backend: run records as JSON lines (`<sync>.runs.jsonl`), rows in
the sync's DuckDB ledger (see `sync_log.py`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from braze_assets.state.sync_log import ERROR_STATUSES_SQL, FORGOTTEN, ROW_SCHEMA, SyncLog, by_day

Connect = Callable[..., contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]]


def _finished(record: dict[str, Any]) -> dt.datetime | None:
    text = record.get("finished_at")
    return dt.datetime.fromisoformat(text) if isinstance(text, str) and text else None


class EmbeddedSyncLog(SyncLog):
    def __init__(self, sync: str, history_path: Path, db_path: Path, connect: Connect):
        super().__init__(sync)
        self.history_path, self.db_path, self._connect = history_path, db_path, connect

    # ------------------------------------------------------------------ runs
    def _records(self) -> list[dict[str, Any]]:
        """Every run's latest record, oldest first (a line cut short by a crash is skipped)."""
        try:
            lines = self.history_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        latest: dict[str, dict[str, Any]] = {}
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            run_id = record.get("run_id") or f"#{len(latest)}"
            latest.pop(run_id, None)  # a newer record of the run moves it to the end
            latest[run_id] = record
        return list(latest.values())

    def record_run(self, record: dict[str, Any]) -> None:
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with self.history_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(reversed(self._records()))[:limit]

    def delete_runs(self, before: dt.datetime) -> int:
        records = self._records()
        kept = [r for r in records if (_finished(r) or before) >= before]
        if len(kept) == len(records):
            return 0
        tmp = self.history_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.history_path)
        return len(records) - len(kept)

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
        if not self.db_path.exists():
            return ROW_SCHEMA.empty_table()
        where: list[str] = ["TRUE"]
        params: list[Any] = []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if errors_only:
            where.append(f"status IN {ERROR_STATUSES_SQL}")
        if lookup is not None:
            where.append("list_has_any(string_split(identifier_hash, ' '), ?::VARCHAR[])")
            params.append(lookup)
        if run_id is not None:
            where.append("run_id = ?")
            params.append(run_id)
        sql = (
            f"SELECT {', '.join(ROW_SCHEMA.names)} FROM ledger WHERE {' AND '.join(where)} "
            "ORDER BY changed_at DESC, row_hash"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._connect(read_only=True) as con:
            found = con.sql(sql, params=params).to_arrow_table()
        if found is None:  # DuckDB returns a table for every SELECT
            raise RuntimeError("the sync log query returned no result")
        return found.cast(ROW_SCHEMA)

    def status_counts(self, run_id: str | None = None) -> dict[str, int]:
        if not self.db_path.exists():
            return {}
        with self._connect(read_only=True) as con:
            rows = con.execute(
                "SELECT status, count(*) FROM ledger WHERE ? IS NULL OR run_id = ? GROUP BY 1",
                [run_id, run_id],
            ).fetchall()
        return {status: int(n) for status, n in rows}

    def daily_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        if not self.db_path.exists():
            return {}
        with self._connect(read_only=True) as con:
            rows = con.execute(
                "SELECT CAST(CAST(timezone('UTC', updated_at) AS DATE) AS VARCHAR), status, count(*) "
                "FROM ledger WHERE run_id = ? AND updated_at IS NOT NULL GROUP BY 1, 2",
                [run_id],
            ).fetchall()
        return by_day(rows)

    def top_messages(self, run_id: str, limit: int = 5) -> list[tuple[str, str, int]]:
        if not self.db_path.exists():
            return []
        with self._connect(read_only=True) as con:
            rows = con.execute(
                "SELECT status, coalesce(message, ''), count(*) AS n FROM ledger "
                f"WHERE run_id = ? AND status IN {ERROR_STATUSES_SQL} GROUP BY 1, 2 "
                "ORDER BY n DESC, 1, 2 LIMIT ?",
                [run_id, limit],
            ).fetchall()
        return [(s, m, int(n)) for s, m, n in rows]

    # ------------------------------------------------------------------ retention and forgetting
    def clear_row_details(self, before: dt.datetime) -> int:
        if not self.db_path.exists():
            return 0
        with self._connect() as con:
            rows = con.execute(
                "UPDATE ledger SET identifier = NULL, identifier_hash = NULL, message = NULL "
                "WHERE changed_at < ? AND status <> 'held' AND (identifier IS NOT NULL "
                "OR identifier_hash IS NOT NULL OR message IS NOT NULL)",
                [before],
            ).fetchall()
        return int(rows[0][0]) if rows else 0

    def forget_rows(self, lookup: list[str], user_keys: list[str] | None = None) -> int:
        if not self.db_path.exists():
            return 0
        with self._connect() as con:
            con.begin()
            if user_keys:
                for table in ("remembered_attributes", "remembered_pending"):
                    con.execute(f"DELETE FROM {table} WHERE user_key IN (SELECT unnest(?))", [user_keys])
            matching = "list_has_any(string_split(identifier_hash, ' '), ?::VARCHAR[])"
            con.execute(
                f"DELETE FROM held_details WHERE row_hash IN (SELECT row_hash FROM ledger WHERE {matching})",
                [lookup],
            )
            rows = con.execute(
                f"UPDATE ledger SET identifier = NULL, identifier_hash = NULL, message = ? WHERE {matching}",
                [FORGOTTEN, lookup],
            ).fetchall()
            con.commit()
        return int(rows[0][0]) if rows else 0
