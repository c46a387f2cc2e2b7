"""The delivery state of one sync, as one interface with two backends.

What must outlive a run, per sync (docs/architecture.md, Delivery state):

* the **ledger**: one row per CDI row the sync has settled, with the row's stable hash and status:
    - ``accepted``  Braze acknowledged it; never sent again (re-runs, retries, backfills);
    - ``failed``    Braze refused it for good (its message kept);
    - ``invalid``   failed validation, never sent (its reasons kept);
    - ``held``      outcome unknown, parked until a person decides (``release.py``);
  beside it ``planned`` (the rows of the chunk being sent right now, with their request ids) and
  ``held_details`` (what reconcile needs to ask Braze about a held event or purchase);
* the **journal**: a record per request just before it goes on the wire and one with its known
  outcome after, so recovery can tell requests that never left from those that may have arrived;
* the **delivery lock**: one run at a time sends for a sync, and recovery never races a sender;
  it dies with its holder (process or database session);
* the **watermark**: every row with UPDATED_AT at or before it is settled;
* the settled source files (S3);
* the **sync log** (`sync_log.py`): a record per run, and the ledger's rows seen as a log.

`EmbeddedStateStore` keeps them in DuckDB and small files under a directory (nothing to start);
`PostgresStateStore` in PostgreSQL, for runs in fresh pods with empty disks. Delivery sees only
this interface: it never opens a transaction, a file or a connection itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from braze_assets.attribute_diff import Remembered
from braze_assets.config import AmbiguousPolicy
from braze_assets.delta_files import DeltaFiles
from braze_assets.state.held import held_details_table
from braze_assets.state.recovery import JournalRecords, RecoveryPlan, plan_recovery
from braze_assets.state.sync_log import SyncLog

#: Columns of a ledger row as `LedgerSession.append` takes them (`changed_at` and `object` optional).
LEDGER_COLUMNS = (
    "row_hash",
    "updated_at",
    "status",
    "batch_id",
    "identifier",
    "identifier_hash",
    "message",
    "run_id",
)
#: Columns of a remembered user (attribute_diff.py).
REMEMBERED_COLUMNS = ("user_key", "payload_hash", "attributes", "payload_attributes")
#: What `LedgerSession.remembered_table` answers.
REMEMBERED_SCHEMA = pa.schema(
    [
        ("user_key", pa.string()),
        ("payload_hash", pa.string()),
        ("attributes", pa.string()),
        ("payload_attributes", pa.int32()),
    ]
)
#: Each of those columns in SQL, never null (both backends).
REMEMBERED_SQL = {
    "user_key": "user_key",
    "payload_hash": "payload_hash",
    "attributes": "coalesce(attributes, '{}') AS attributes",
    "payload_attributes": "coalesce(payload_attributes, 0) AS payload_attributes",
}


def nothing_remembered(user_keys: pa.Array) -> pa.Table:
    """`REMEMBERED_COLUMNS` for users known to hold nothing remembered (no PAYLOAD hash, no
    attribute): their next rows go whole. Recovery leaves so the users of requests Braze answered
    or may have applied, whose rows it settles without knowing what to remember."""
    count = len(user_keys)
    return pa.table(
        {
            "user_key": user_keys.cast(pa.string()),
            "payload_hash": pa.nulls(count, pa.string()),
            "attributes": pa.array(["{}"] * count, pa.string()),
            "payload_attributes": pa.array([0] * count, pa.int32()),
        }
    )


def remembered_schema(attributes: bool) -> pa.Schema:
    """`REMEMBERED_SCHEMA`, without the `attributes` column unless asked."""
    if attributes:
        return REMEMBERED_SCHEMA
    return REMEMBERED_SCHEMA.remove(REMEMBERED_SCHEMA.get_field_index("attributes"))


#: Columns of a planned row.
PLANNED_COLUMNS = (
    "row_hash",
    "updated_at",
    "batch_id",
    "identifier",
    "identifier_hash",
    "run_id",
    "user_key",
)


class SyncBusyError(RuntimeError):
    """Another run is delivering this sync right now."""


@dataclass
class Watermark:
    """Every row with UPDATED_AT <= `value` is settled (accepted, failed, invalid or held).
    Scheduled runs rescan from `value - lookback`, so late rows inside the window still go out."""

    value: dt.datetime | None = None
    updated_by_run: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["value"] = self.value.isoformat() if self.value else None
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Watermark:
        data = json.loads(text)
        data["value"] = dt.datetime.fromisoformat(data["value"]) if data.get("value") else None
        return cls(**data)


class LedgerSession(ABC):
    """One connection to a sync's ledger, used by one thread at a time. Each call commits on its
    own unless made inside `transaction()`."""

    def __init__(self, deltas: DeltaFiles):
        self._deltas = deltas

    @abstractmethod
    def settled_since(self, since: dt.datetime) -> bool:
        """Whether the ledger recorded any row from `since` on: when none, no row of a delta
        computed then can have been settled by another run, and delivery skips its probes."""

    @abstractmethod
    def settled_between(self, oldest: dt.datetime, newest: dt.datetime) -> bool:
        """Whether the ledger holds any row with UPDATED_AT in [oldest, newest]: when none, no
        row of a scanned batch stamped within that span can be settled (a row's identity
        includes its UPDATED_AT), and the delta leaves hashing the batch to its workers."""

    @abstractmethod
    def known_hashes(
        self,
        hashes: list[str],
        *,
        since: dt.datetime | None = None,
        between: tuple[dt.datetime, dt.datetime] | None = None,
    ) -> set[str]:
        """Which of these rows the ledger has settled. `since`: only rows settled from then on;
        `between`: the rows' UPDATED_AT range (a row's hash includes its UPDATED_AT, so settled
        rows outside it cannot match). Both narrow what the backend reads."""

    @abstractmethod
    def _insert(self, table: str, rows: pa.Table) -> None:
        """Insert Arrow rows into `ledger`, `planned` or `held_details` (columns by name)."""

    @abstractmethod
    def clear_planned(self, prefix: str) -> None:
        """A planned chunk (request ids `<prefix>-<n>`) is settled, or to be sent again later."""

    @abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Everything inside commits together, or not at all."""

    def append(self, rows: pa.Table) -> None:
        """Record settled rows (`LEDGER_COLUMNS`, `identifier_hash` optional; `changed_at`
        added). Callers hold the delivery lock and append only rows the ledger does not have.

        An optional `object` column (the objects as sent) keeps `held_details` of the rows held;
        without it, a held row's object is looked up in its run's delta file."""
        if not rows.num_rows:
            return
        objects = None
        if "object" in rows.column_names:
            objects = rows["object"]
            rows = rows.drop_columns(["object"])
        if "changed_at" not in rows.column_names:
            now = dt.datetime.now(dt.UTC)
            rows = rows.append_column(
                "changed_at", pa.array([now] * rows.num_rows, pa.timestamp("us", tz="UTC"))
            )
        self._insert("ledger", rows)
        is_held = pc.equal(rows["status"], "held")
        if pc.any(is_held).as_py():
            held = pc.indices_nonzero(is_held)
            hashes = rows["row_hash"].take(held).to_pylist()
            if objects is not None:
                found = dict(zip(hashes, objects.take(held).to_pylist(), strict=True))
            else:
                run_ids = sorted({r for r in rows["run_id"].to_pylist() if r})
                found = dict(self._deltas.objects(hashes, run_ids))
            self._insert("held_details", held_details_table(found))

    def plan(self, rows: pa.Table) -> None:
        """Rows about to be sent (`PLANNED_COLUMNS`; `identifier_hash` and `user_key`, the diff's
        user, optional)."""
        self._insert("planned", rows)

    # ------------------------------------------------------------------ remembered attributes
    @abstractmethod
    def remembered_table(self, user_keys: pa.Array, attributes: bool = True) -> pa.Table:
        """What Braze last accepted from this sync for these users (`attribute_diff.py`), one row
        per remembered user, as `REMEMBERED_SCHEMA` (never null); without the `attributes`
        column unless asked, as a PAYLOAD that did not change never needs it. Arrow, because a
        delta asks it for every batch of a snapshot table."""

    @abstractmethod
    def remembers_anyone(self) -> bool:
        """Whether anything is remembered of this sync's users: a delta that finds nothing
        (a first sync) skips the lookups, and its workers key the rows themselves."""

    @abstractmethod
    def planned_rows(self) -> int:
        """Rows planned and not settled: sent, or about to be, by a run that died or is still
        sending. Recovery settles those Braze answered before the next run sends (a dry run
        says so)."""

    @abstractmethod
    def planned_user_keys(self) -> pa.Array:
        """The users (`user_key`) of rows planned and not settled: a run that died, or one still
        sending, has requests for them whose outcome is not known yet, so what is remembered of
        them may not be what Braze holds. A delta sends their rows whole (`known_users.excluding`)."""

    def remembered(self, user_keys: list[str]) -> dict[str, Remembered]:
        """`remembered_table` by user key."""
        table = self.remembered_table(pa.array(user_keys, pa.string()))
        columns = [table.column(name).to_pylist() for name in REMEMBERED_COLUMNS]
        return {key: Remembered(*rest) for key, *rest in zip(*columns, strict=True)}

    @abstractmethod
    def remember(self, rows: pa.Table) -> None:
        """Braze accepted these users' rows: `REMEMBERED_COLUMNS`, one row per user, replacing
        what was remembered of them (at once, or by `merge_remembered`; `remembered` sees both)."""

    @abstractmethod
    def forget_remembered(self) -> None:
        """Forget everything remembered of this sync's users: a run sending whole payloads
        (`send: full_payload`) does not keep it up to date, so it must not outlive such a run."""

    @abstractmethod
    def merge_remembered(self) -> None:
        """Fold what `remember` set aside into what is remembered: delivery calls it once it is
        done, and before it starts (after a run that stopped in between)."""


class Journal(ABC):
    """The request journal of one delivery, open while it sends."""

    @abstractmethod
    async def started(self, batch_id: str) -> None:
        """Durable before it returns: the request may go on the wire once this is written."""

    @abstractmethod
    async def refused(self, batch_id: str) -> None:
        """Braze answered the request's latest attempt with a refusal it documents as not
        processed (429, 502, 503, 408, or the connection failed before the request left), no
        earlier attempt may have been processed, and no attempt is on the wire until the next
        `started`: killed meanwhile, recovery sends its rows again rather than holding them."""

    @abstractmethod
    async def done(self, batch_id: str, rows: list[tuple[str, str | None, str | None]]) -> None:
        """The known outcome of a request: its rows not accepted, as (row_hash, status or None to
        send again, message); every other row of the request was accepted. Best effort: a lost
        record only leaves the request ambiguous after a crash."""


class StateStore(ABC):
    """The durable state of one sync (see the module docstring)."""

    #: How long `commit_watermark` and the held-row commands wait for a delivering run to end.
    lock_timeout_s: float = 600.0

    def __init__(self, sync: str, deltas: DeltaFiles, log: SyncLog):
        self.sync = sync
        #: The sync's delta files: recovery reads held rows' objects from them.
        self.deltas = deltas
        #: What each run did and what became of each row (`sync_log.py`).
        self.log = log

    # ------------------------------------------------------------------ locks
    @abstractmethod
    def delivery_lock(self, wait_s: float = 0.0) -> contextlib.AbstractContextManager[None]:
        """Exclusive right to send for this sync, released when its holder dies. Raises
        `SyncBusyError` when another holder keeps it longer than `wait_s`."""

    # ------------------------------------------------------------------ ledger
    @abstractmethod
    def session(self) -> contextlib.AbstractContextManager[LedgerSession]:
        """A ledger session for one thread."""

    @abstractmethod
    def settled_count(self, start: dt.datetime | None, end: dt.datetime) -> int:
        """Settled rows with start <= UPDATED_AT < end (to find rows older than the scan window)."""

    # ------------------------------------------------------------------ journal and recovery
    @abstractmethod
    def journal(self) -> contextlib.AbstractAsyncContextManager[Journal]:
        """The journal of one delivery; emptied when it ends without an error (every chunk's
        outcomes are in the ledger by then). Use with the delivery lock held."""

    @abstractmethod
    def _journal_records(self) -> JournalRecords: ...

    @abstractmethod
    def _planned_batches(self) -> list[tuple[str, int]]: ...

    @abstractmethod
    def _apply_recovery(self, plan: RecoveryPlan, policy: AmbiguousPolicy) -> None:
        """Settle the planned rows by `plan`, forget the others, and empty the journal: at once."""

    def recover(self, policy: AmbiguousPolicy) -> dict[str, int]:
        """Settle `planned` rows left by a run that died. Call with the delivery lock held.

        Requests whose answer was journaled get that outcome (rows it held stay held); those that
        never went on the wire, or whose last attempt Braze refused unprocessed, are forgotten
        (sent again); those sent without a journaled answer are ambiguous: held, or forgotten so
        they are resent, by the sync's policy (`recovery.py`). Every row held keeps what a
        reconcile needs (`held_details`), whichever run held it."""
        plan = plan_recovery(self._planned_batches(), self._journal_records(), policy)
        self._apply_recovery(plan, policy)
        return plan.counts

    # ------------------------------------------------------------------ held rows: a person decides
    @abstractmethod
    def held_rows(self, row_hashes: list[str] | None = None) -> list[dict[str, Any]]:
        """Held rows (all, or those of `row_hashes`) with their details where kept: row_hash,
        updated_at, batch_id, identifier (masked), message, run_id, id_type, id_value, kind,
        name, sent_time (None when no details were kept)."""

    @abstractmethod
    def _forget_held(self, row_hashes: list[str] | None) -> tuple[int, dt.datetime | None]:
        """Delete held rows (all, or those listed) and their details: (count, earliest UPDATED_AT)."""

    @abstractmethod
    def _settle_held(self, messages: dict[str, str], status: str) -> int:
        """Give held rows `status` and their message; returns how many were held."""

    def release_held(self, row_hashes: list[str] | None = None) -> int:
        """A person decided held rows should be sent again: forget them so the next run does.

        The watermark says every row at or before it is settled, so it moves back to just before
        the earliest row forgotten: the next scheduled run reads those rows again, however far
        behind its lookback they lie. The source files marked settled are forgotten first
        (a file whose rows are all settled, held ones too, is skipped): those rows' file is then
        read again, and its rows settled meanwhile are dropped by the ledger as usual. Call with
        the delivery lock held (see `release.py`)."""
        if row_hashes is None or row_hashes:
            self.forget_settled_parts()
        count, earliest = self._forget_held(row_hashes)
        watermark = self.read_watermark()
        if earliest is not None and watermark.value is not None and watermark.value >= earliest:
            self._write_watermark(
                Watermark(earliest - dt.timedelta(microseconds=1), updated_by_run="release_held")
            )
        return count

    def mark_held_delivered(self, messages: dict[str, str]) -> int:
        """A person (or a reconcile with Braze's evidence) settled held rows as accepted: never
        sent again; `messages` gives each row's reason, kept in the ledger."""
        return self._settle_held(messages, "accepted") if messages else 0

    def note_held(self, messages: dict[str, str]) -> int:
        """Rows that stay held, with why (kept in the ledger's message)."""
        return self._settle_held(messages, "held") if messages else 0

    # ------------------------------------------------------------------ watermark
    @abstractmethod
    def read_watermark(self) -> Watermark: ...

    @abstractmethod
    def _write_watermark(self, watermark: Watermark) -> None: ...

    def commit_watermark(
        self, before: dt.datetime | None, after: dt.datetime | None, run_id: str
    ) -> tuple[Watermark, str | None]:
        """The one place a run moves the watermark: to `after`, computed from the `before` it
        started with. Returns the watermark now in force, and why it differs from `after`.

        Taken under the delivery lock, so it never interleaves with a release of held rows; if
        the watermark changed since the run read it (a release moved it back to resend rows), the
        lower of the two wins: a watermark past rows that are not settled would skip them."""
        with self.delivery_lock(wait_s=self.lock_timeout_s):
            current = self.read_watermark()
            if after is None or after == before:
                return current, None
            why = None
            if current.value != before:
                if current.value is None or current.value <= after:
                    return current, (
                        f"kept {current.value.isoformat() if current.value else 'none'}: it changed "
                        f"while the run delivered (by {current.updated_by_run})"
                    )
                why = f"moved to {after.isoformat()}, below the {current.value.isoformat()} it changed to"
            committed = Watermark(after, updated_by_run=run_id)
            self._write_watermark(committed)
            return committed, why

    # ------------------------------------------------------------------ source files
    @abstractmethod
    def settled_parts(self) -> dict[str, str]:
        """Source files (S3 parts) whose every row is settled, with their fingerprints."""

    @abstractmethod
    def add_settled_parts(self, parts: dict[str, str]) -> None: ...

    @abstractmethod
    def forget_settled_parts(self) -> None:
        """No source file is settled any more: the next run reads every file in its window."""

    # ------------------------------------------------------------------ the sync log
    def forget(self, lookup: list[str], user_keys: list[str] | None = None) -> tuple[int, int]:
        """Right to be forgotten: clear every detail kept of the rows carrying these lookup
        hashes (`lookup.py`): in the log, in held rows' details, in the attributes remembered of
        the user (`user_keys`) and in the retained delta files. Taken under the delivery lock, so
        no run is reading those files meanwhile. Returns (log rows cleared, delta rows dropped)."""
        with self.delivery_lock(wait_s=self.lock_timeout_s):
            return self.log.forget_rows(lookup, user_keys), self.deltas.forget(lookup)
