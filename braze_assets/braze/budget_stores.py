"""Where the shared Braze budgets live: a locked file (the default) or a PostgreSQL table.

Both backends do one thing (`BudgetStore.exchange`): read a budget, let the caller change it under
an exclusive lock, and keep the result. The file is enough for every process on one machine or on
one shared volume with working `flock` (nothing to start); PostgreSQL, selected by
`BRAZE_ASSETS_STATE_URL`, for pods without such a volume.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from braze_assets.braze.budget import BudgetState, BudgetStore, BudgetStoreError
from braze_assets.state.postgres_schema import (
    StateDatabase,
    StateUnreachableError,
    StateUrlError,
    masked_url,
    state_url_from_environment,
)

#: In the state schema, created by its migrations (state/migrations/).
BUDGET_TABLE = "rate_budget"

T = TypeVar("T")


class FileBudgetStore(BudgetStore):
    """One JSON file per budget under `directory`, read and rewritten in place under an exclusive
    `flock` on the file itself; the lock dies with its process.

    In place, not through a temporary file and a rename: on ext4 a rename over a file flushes its
    data (about a millisecond here), ten times the rest of a lease. A process killed mid-update
    cannot leave half a state: the state goes out in one `pwrite` (the kernel finishes a write to a
    regular file before delivering a signal), padded with spaces over any longer old content, and
    only then is the file cut to size."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.description = f"the budget files in {self.directory}"
        self._handles: dict[str, int] = {}
        self._mutex = threading.Lock()  # flock does not exclude threads sharing one descriptor

    def exchange(self, workspace: str, path: str, change: Callable[[BudgetState, float], T]) -> T:
        name = _file_name(workspace, path)
        with self._mutex:
            handle = self._handle(name)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    old = _read_all(handle)
                    state = _parse_state(old)
                    result = change(state, time.time())
                    new = json.dumps(state.to_json()).encode()
                    os.pwrite(handle, new.ljust(len(old)), 0)
                    os.ftruncate(handle, len(new))
                    return result
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            except OSError as exc:
                raise BudgetStoreError(f"{self.description}: {type(exc).__name__}: {exc.strerror}") from None

    def peek(self, workspace: str, path: str) -> BudgetState | None:
        file = self.directory / f"{_file_name(workspace, path)}.json"
        try:
            handle = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BudgetStoreError(f"{self.description}: {type(exc).__name__}: {exc.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)  # never half a state being written
            return _parse_state(_read_all(handle))
        finally:
            os.close(handle)  # closing releases the lock

    def _handle(self, name: str) -> int:
        handle = self._handles.get(name)
        if handle is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                handle = os.open(self.directory / f"{name}.json", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise BudgetStoreError(f"{self.description}: {type(exc).__name__}: {exc.strerror}") from None
            self._handles[name] = handle
        return handle

    def close(self) -> None:
        with self._mutex:
            for handle in self._handles.values():
                os.close(handle)
            self._handles.clear()


def _file_name(workspace: str, path: str) -> str:
    """A readable file name: `http_127.0.0.1_4545_key-<hash>_users_track`."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", f"{workspace}{path}").strip("_")


def _read_all(handle: int) -> bytes:
    size = os.fstat(handle).st_size
    return os.pread(handle, size, 0) if size else b""


def _parse_state(content: bytes) -> BudgetState:
    if not content.strip():
        return BudgetState()
    try:
        return BudgetState.from_json(json.loads(content))
    except (ValueError, TypeError, KeyError):
        # Unreadable (written by hand?): start over. At worst one window is overspent, and
        # Braze's headers and 429s still hold the line.
        return BudgetState()


class PostgresBudgetStore(BudgetStore):
    """One row per budget in `BUDGET_TABLE`, locked with `SELECT ... FOR UPDATE` for the change.
    The clock is the server's, so pods whose clocks differ still measure one window. Commits are
    asynchronous (`synchronous_commit = off`): a budget lost in a server crash costs at most one
    window's pacing, and a synchronous WAL flush per lease would cost more than the lease."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.description = f"the budget table in PostgreSQL at {masked_url(url)}"
        self._connection: Any = None
        self._mutex = threading.Lock()

    def exchange(self, workspace: str, path: str, change: Callable[[BudgetState, float], T]) -> T:
        import psycopg2

        with self._mutex:
            for attempt in (1, 2):  # a connection the server dropped is reopened once
                try:
                    return self._exchange(workspace, path, change)
                except (psycopg2.OperationalError, psycopg2.InterfaceError, StateUnreachableError) as exc:
                    self._drop_connection()
                    if attempt == 2:
                        raise BudgetStoreError(f"{self.description}: {_first_line(exc)}") from None
                except psycopg2.Error as exc:
                    self._drop_connection()
                    raise BudgetStoreError(f"{self.description}: {_first_line(exc)}") from None
        raise AssertionError("unreachable")

    def _exchange(self, workspace: str, path: str, change: Callable[[BudgetState, float], T]) -> T:
        connection = self._connect()
        key = (workspace, path)
        select = (
            f"SELECT grants, next_grant_id, paused_until, rate_limit, window_s FROM {BUDGET_TABLE} "
            "WHERE workspace = %s AND endpoint = %s FOR UPDATE"
        )
        with connection.cursor() as cursor:
            cursor.execute(select, key)
            row = cursor.fetchone()
            if row is None:  # a new budget (or one an operator deleted)
                cursor.execute(
                    f"INSERT INTO {BUDGET_TABLE} (workspace, endpoint) VALUES (%s, %s) "
                    "ON CONFLICT DO NOTHING",
                    key,
                )
                cursor.execute(select, key)
                row = cursor.fetchone()
            grants, next_grant_id, paused_until, limit, window_s = row
            # The time once the row is ours: a clock read before the lock wait would date the
            # grant too early, and it would leave the window too soon.
            cursor.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            (now,) = cursor.fetchone()
            state = BudgetState.from_json(
                {
                    "grants": grants,
                    "next_grant_id": next_grant_id,
                    "paused_until": paused_until,
                    "limit": limit,
                    "window_s": window_s,
                }
            )
            result = change(state, float(now))
            cursor.execute(
                f"UPDATE {BUDGET_TABLE} SET grants = %s, next_grant_id = %s, paused_until = %s, "
                "rate_limit = %s, window_s = %s, updated_at = now() WHERE workspace = %s AND endpoint = %s",
                (
                    json.dumps(state.to_json()["grants"]),
                    state.next_grant_id,
                    state.paused_until,
                    state.limit,
                    state.window_s,
                    *key,
                ),
            )
        connection.commit()
        return result

    def peek(self, workspace: str, path: str) -> BudgetState | None:
        import psycopg2

        with self._mutex:
            try:
                connection = self._connect()
                with connection.cursor() as cursor:
                    cursor.execute(
                        f"SELECT rate_limit, window_s FROM {BUDGET_TABLE} "
                        "WHERE workspace = %s AND endpoint = %s",
                        (workspace, path),
                    )
                    row = cursor.fetchone()
                connection.rollback()  # a read: nothing to keep
            except (psycopg2.Error, StateUnreachableError) as exc:
                self._drop_connection()
                raise BudgetStoreError(f"{self.description}: {_first_line(exc)}") from None
        return None if row is None else BudgetState(limit=row[0], window_s=row[1])

    def _connect(self) -> Any:
        if self._connection is None:
            connection = StateDatabase.from_url(self.url).connect("rate budget")
            with connection.cursor() as cursor:
                cursor.execute("SET synchronous_commit = off")
                cursor.execute("SET statement_timeout = '10s'")
            connection.commit()
            self._connection = connection
        return self._connection

    def _drop_connection(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # already broken: it is being replaced
                self._connection.close()
            self._connection = None

    def close(self) -> None:
        with self._mutex:
            self._drop_connection()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def budget_store_from_environment(state_dir: Path) -> BudgetStore:
    """PostgreSQL when `BRAZE_ASSETS_STATE_URL` is set, else files under `<state_dir>/budgets`.
    One store per place in a process, so its clients share the lock handles and the connection."""
    url = state_url_from_environment()
    if url:
        try:
            StateDatabase.from_url(url)
        except StateUrlError as exc:
            raise BudgetStoreError(str(exc)) from None
        return _postgres_store(url)
    return _file_store(str(state_dir / "budgets"))


@functools.cache
def _postgres_store(url: str) -> BudgetStore:
    return PostgresBudgetStore(url)


@functools.cache
def _file_store(directory: str) -> BudgetStore:
    return FileBudgetStore(directory)
