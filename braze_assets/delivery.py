"""Deliver a materialized delta to Braze with the ledger's exactly-once bookkeeping.

Per chunk of the delta: drop rows the ledger settled since the delta was computed, plan requests
(≤ 75 objects and ≤ 4 MB for `/users/track`; ≤ 50 ids of one type for `/users/delete`), record the
rows as `planned`, then send through one window of at most `max_in_flight` requests shared by all
chunks (the next chunk starts while the last requests of the previous one are in flight), journaling
each request just before it leaves (and again when Braze refuses it unprocessed, and before it
goes again). A chunk's outcomes are written to the ledger once all its
requests are answered; see `state/base.py` for what each status means and how a crashed run is
recovered.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import pyarrow as pa
import pyarrow.compute as pc

from braze_assets import delta_store
from braze_assets.braze.client import BrazeAuthError, BrazeClient, RequestOutcome
from braze_assets.catalog_requests import (
    catalog_missing,
    item_ids,
    items_at_fault,
    items_body,
    request_message,
)
from braze_assets.config import AmbiguousPolicy
from braze_assets.datatypes import DataTypeSpec
from braze_assets.delivery_answers import AnswerReader, BrazeRequestError
from braze_assets.delivery_rows import (
    accepted_attributes,
    ledger_rows,
    lookup_column,
    planned_rows,
    unsent_rows,
)
from braze_assets.delta import DeltaManifest
from braze_assets.request_plan import PlannedRequest, plan_requests
from braze_assets.state import LedgerSession, StateStore
from braze_assets.state.base import Journal
from braze_assets.sync_outcome import EXIT_CODES, RUN_STATUSES, SyncOutcome, classify, worst_status

if TYPE_CHECKING:
    from tqdm import tqdm

#: The run's outcome, request planning, the reading of Braze's answers and the state's rows live
#: in `sync_outcome.py`, `request_plan.py`, `delivery_answers.py` and `delivery_rows.py`; they are
#: importable from here too, where they were first.
__all__ = [
    "EXIT_CODES",
    "RUN_STATUSES",
    "BrazeRequestError",
    "Delivery",
    "SyncOutcome",
    "accepted_attributes",
    "classify",
    "lookup_column",
    "plan_requests",
    "worst_status",
]

EXAMPLES_KEPT = 5
#: Rows read, and settled in one statement, at a time from a delta's files of rows never sent
#: (invalid, unchanged): two of DuckDB's row groups (122,880 rows each). The embedded ledger
#: writes an append of at least that many rows straight into its file; a smaller one goes through
#: its write-ahead log and is written again when the log is folded. Measured, 960,000 `unchanged`
#: rows settled and the file closed: 2.3-2.6 s in batches of 100,000, 1.2 s in these.
UNSENT_BATCH_ROWS = 2 * 122_880
#: What settling them reads of those files (not a rejected row's payload excerpt); each file
#: has `reasons` (invalid) or `data_points_saved` (unchanged), not both.
_UNSENT_COLUMNS = ["row_hash", "updated_at", "identifier", "identifier_hash", "reasons", "data_points_saved"]


@dataclass
class _Chunk:
    """One chunk of the delta on its way: its rows, requests and the outcome of each row."""

    prefix: str
    table: pa.Table
    hashes: list[str]
    batch_of: list[str]
    requests: list[PlannedRequest]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    status: list[str | None] = field(default_factory=list)
    messages: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.status = [None] * self.table.num_rows
        self.messages = [None] * self.table.num_rows


def _progress_bar(total: int, sync: str) -> tqdm[NoReturn] | None:
    """A terminal progress bar for `braze-assets run/demo` (BRAZE_ASSETS_PROGRESS_BAR=1 on a TTY);
    runs in the Dagster UI report progress through their log lines instead."""
    if not total or os.environ.get("BRAZE_ASSETS_PROGRESS_BAR") != "1":
        return None
    try:  # the controlling terminal: Dagster captures the step's stdout and stderr
        terminal = open("/dev/tty", "w")  # noqa: SIM115 - closed with the bar
    except OSError:
        return None  # no terminal (CI, a daemon): progress is in the log lines
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"{sync} -> Braze", unit="rows", unit_scale=True, file=terminal, mininterval=0.5
    )


class Delivery:
    """One run's delivery of one delta."""

    def __init__(
        self,
        *,
        spec: DataTypeSpec,
        store: StateStore,
        manifest: DeltaManifest,
        client: BrazeClient,
        policy: AmbiguousPolicy,
        max_in_flight: int,
        run_id: str,
        chunk_rows: int = 20_000,
        log: Callable[[str], None] = print,
        endpoint: str | None = None,
    ):
        """`endpoint`: the path the objects go to, when not the data type's own (a catalog's)."""
        self.spec, self.store, self.manifest = spec, store, manifest
        self.client, self.policy, self.max_in_flight = client, policy, max_in_flight
        self.run_id, self.chunk_rows, self.log = run_id, chunk_rows, log
        self.endpoint = endpoint or spec.endpoint
        self.outcome = SyncOutcome(manifest.sync, manifest.data_type, run_id, rows_in_delta=manifest.valid)
        self.answers = AnswerReader(self.outcome, self.endpoint, policy == "hold", log)
        self._earliest_unsettled: dt.datetime | None = None
        self._auth_error: BrazeAuthError | None = None
        self._live: set[asyncio.Task[None]] = set()
        #: tasks whose request has gone out: what they sent may have been processed
        self._on_wire: set[asyncio.Task[Any]] = set()
        self._done = 0
        self._started = self._last_log = time.monotonic()
        self._bar: tqdm[NoReturn] | None = None
        self._settling: asyncio.Task[None] | None = None
        self._probe = True  # whether rows may have been settled elsewhere since the delta

    def run(self) -> SyncOutcome:
        started = time.monotonic()
        with self.store.delivery_lock():
            recovered = self.store.recover(self.policy)
            self.outcome.recovered_settled = recovered["recovered_settled"]
            self.outcome.recovered_ambiguous = recovered["recovered_ambiguous"]
            self.outcome.recovered_unsent = recovered["recovered_unsent"]
            self.outcome.recovered_held = recovered["recovered_held"]
            # Two sessions: chunks are planned on one while the previous chunk settles on the other
            with self.store.session() as ledger, self.store.session() as settler:
                since = self._since()
                # Under the lock no other run settles rows, so when none did since the delta was
                # computed, no chunk needs the probe (the usual case: it would only find this
                # run's own earlier chunks, which hold none of the later ones' rows).
                self._probe = since is None or ledger.settled_since(since)
                ledger.merge_remembered()  # what a run that stopped early had set aside
                if self._sends_whole_attributes() and ledger.remembers_anyone():
                    ledger.forget_remembered()  # Braze is about to hold what nothing remembers
                self._record_invalid(ledger)
                self._record_unchanged(ledger)
                asyncio.run(self._send_all(ledger, settler))
                ledger.merge_remembered()  # after a failure, the next delivery does it
            if not self.outcome.not_sent and self._earliest_unsettled is None:
                # every row of the delta's source files is settled: later runs skip them. Under
                # the lock, so a release of held rows, which forgets the files, is never undone.
                self.store.add_settled_parts(self.manifest.parts)
        self.outcome.seconds = round(time.monotonic() - started, 3)
        self.outcome.failed_reasons = dict(self.answers.failed_reasons.most_common())
        if self._earliest_unsettled is not None:
            self.outcome.earliest_unsettled = self._earliest_unsettled.isoformat()
        self.outcome.status, self.outcome.status_detail = classify(self.outcome, self.manifest)
        return self.outcome

    def _sends_whole_attributes(self) -> bool:
        """An attributes delivery without the diff (`send: full_payload`) with rows to send."""
        return self.spec.name == "attributes" and not self.manifest.unchanged_path and self.manifest.valid > 0

    def _since(self) -> dt.datetime | None:
        computed = self.manifest.computed_at
        return dt.datetime.fromisoformat(computed) if computed else None

    def _settled_elsewhere(self, ledger: LedgerSession, hashes: list[str]) -> set[str]:
        """Of these rows of the delta, those another run settled after it was computed."""
        return ledger.known_hashes(hashes, since=self._since()) if self._probe else set()

    def _record_invalid(self, ledger: LedgerSession) -> None:
        """Rows that failed validation are settled as `invalid` (never sent, reasons kept)."""
        self.outcome.invalid_recorded = self._record_unsent(
            ledger, self.manifest.rejected_path, "invalid", lambda rows: rows["reasons"]
        )

    def _record_unchanged(self, ledger: LedgerSession) -> None:
        """Rows whose attributes all match what Braze last accepted are settled as `unchanged`
        (never sent: attribute_diff.py)."""
        if self.manifest.unchanged_path:
            self.outcome.unchanged = self._record_unsent(
                ledger,
                self.manifest.unchanged_path,
                "unchanged",
                lambda rows: pa.nulls(rows.num_rows, pa.string()),
                saved=True,
            )

    def _record_unsent(
        self,
        ledger: LedgerSession,
        uri: str,
        status: str,
        message: Callable[[pa.Table], pa.Array | pa.ChunkedArray],
        saved: bool = False,
    ) -> int:
        """Settle the rows of a delta file that are not sent, with `status`; returns how many."""
        recorded = 0
        with delta_store.open_input(uri) as source:
            # Batches larger than a chunk: a restamped snapshot settles nearly every row here
            # (measured, 960,000 rows: 2.4-2.8 s in batches of 20,000; see UNSENT_BATCH_ROWS).
            for batch in delta_store.parquet_batches(source, UNSENT_BATCH_ROWS, columns=_UNSENT_COLUMNS):
                rows = pa.Table.from_batches([batch])
                known = (
                    self._settled_elsewhere(ledger, rows["row_hash"].to_pylist()) if self._probe else set()
                )
                if known:  # recorded by another run since this delta was computed
                    rows = rows.filter(
                        pc.invert(pc.is_in(rows["row_hash"], pa.array(list(known), pa.string())))
                    )
                ledger.append(unsent_rows(rows, status, message(rows), self.run_id))
                recorded += rows.num_rows
                if saved:
                    self.outcome.data_points_saved += int(pc.sum(rows["data_points_saved"]).as_py() or 0)
        return recorded

    async def _send_all(self, ledger: LedgerSession, settler: LedgerSession) -> None:
        """Chunks flow through one window of `max_in_flight` requests: while a chunk's last
        requests are in flight the next chunk is planned and starts sending, and a chunk's
        outcomes are written once all its requests are answered, in the background while the
        next chunk is planned (one settle at a time, in chunk order). Ledger and Parquet work runs
        in worker threads so the event loop keeps the window full."""
        total, self._done, self._last_log = self.manifest.valid, 0, time.monotonic()
        self._started = time.monotonic()
        self._bar = _progress_bar(total, self.manifest.sync)
        window = asyncio.Semaphore(self.max_in_flight)
        errors: list[BaseException] = []
        previous: _Chunk | None = None
        with delta_store.open_input(self.manifest.valid_path) as source:
            # One record batch at a time: a large delta on an object store is never read whole.
            batches = delta_store.parquet_batches(source, self.chunk_rows)
            async with self.store.journal() as journal, self.client:
                for n in itertools.count():
                    batch = await asyncio.to_thread(next, batches, None)
                    if batch is None or errors or self._auth_error is not None:
                        break
                    chunk = await asyncio.to_thread(
                        self._prepare, ledger, pa.Table.from_batches([batch]), f"{self.run_id[:8]}-{n}"
                    )
                    if chunk is not None:
                        chunk.tasks = [
                            asyncio.create_task(self._send(chunk, r, journal, window)) for r in chunk.requests
                        ]
                        self._live.update(chunk.tasks)
                        if self._auth_error is not None:
                            self._stop_all(self._auth_error)  # planned while the key failed
                            for task in chunk.tasks:
                                task.cancel()
                    if previous is not None:
                        await self._finish(settler, previous, errors)
                    previous = chunk
                if previous is not None:
                    await self._finish(settler, previous, errors)
                if self._settling is not None:
                    await self._settling
        if self._bar is not None:
            self._bar.close()
            self._bar.fp.close()
        if self._auth_error is not None:
            out = self.outcome
            unsettled = self.manifest.valid - out.settled_since_delta - out.accepted - out.failed - out.held
            # the same kind of error (a missing catalog is not a refused key), its words first
            raise type(self._auth_error)(
                f"{str(self._auth_error).rstrip('. ')}. Delivery stopped at the first refusal: "
                f"{self.outcome.accepted:,} rows accepted before it, "
                f"{unsettled:,} rows not sent and left for the next run "
                "(nothing else settled)."
            ) from None
        if errors:
            raise errors[0]

    def _prepare(self, ledger: LedgerSession, chunk: pa.Table, prefix: str) -> _Chunk | None:
        """Drop rows settled since the delta, plan the requests and record the rows as planned."""
        hashes = chunk["row_hash"].to_pylist()
        known = self._settled_elsewhere(ledger, hashes)
        if known:  # settled by another run after this delta was computed: never send twice
            self.outcome.settled_since_delta += len(known)
            chunk = chunk.filter(pa.array([h not in known for h in hashes]))
            hashes = chunk["row_hash"].to_pylist()
        if not chunk.num_rows:
            return None
        self.outcome.estimated_data_points += int(pc.sum(chunk["data_points"]).as_py() or 0)
        if "data_points_saved" in chunk.column_names:  # attributes left out as unchanged
            self.outcome.data_points_saved += int(pc.sum(chunk["data_points_saved"]).as_py() or 0)
        requests = plan_requests(self.spec, chunk["object"].to_pylist(), prefix)
        batch_of = [""] * chunk.num_rows
        for request in requests:
            for i in request.rows:
                batch_of[i] = request.batch_id
        ledger.plan(planned_rows(chunk, batch_of, self.run_id))
        return _Chunk(prefix, chunk, hashes, batch_of, requests)

    async def _send(
        self, chunk: _Chunk, request: PlannedRequest, journal: Journal, window: asyncio.Semaphore
    ) -> None:
        original = request
        async with window:
            try:
                result = await self._post(request, journal)
                if self.spec.request_key:  # catalog items: Braze names the items at fault
                    request, result = await self._without_items_at_fault(chunk, request, result)
            except BrazeAuthError as exc:
                self._stop_all(exc)
                raise
        if request.rows:
            self.answers.apply(request, result, chunk.status, chunk.messages)
        # Known outcomes reach the journal at once, so a crash before the chunk is written to the
        # ledger does not turn answered requests into ambiguous ones.
        await journal.done(
            original.batch_id,
            [
                (chunk.hashes[i], chunk.status[i], chunk.messages[i])
                for i in original.rows
                if chunk.status[i] != "accepted"
            ],
        )

    def _post(self, request: PlannedRequest, journal: Journal | None = None) -> Awaitable[RequestOutcome]:
        catalog = self.spec.request_key is not None  # items go by PUT or DELETE, one shared budget

        def sent() -> Awaitable[None] | None:
            task = asyncio.current_task()
            if task is not None:
                self._on_wire.add(task)
            return journal.started(request.batch_id) if journal is not None else None

        def refused() -> Awaitable[None] | None:  # answered unprocessed: off the wire until retried
            task = asyncio.current_task()
            if task is not None:
                self._on_wire.discard(task)
            return journal.refused(request.batch_id) if journal is not None else None

        return self.client.post(
            self.endpoint,
            request.body,
            retry_ambiguous=self.policy == "resend",
            on_send=sent,
            on_refused=refused,
            method=request.array if catalog else "POST",
            budget_key=self.spec.budget,
        )

    async def _without_items_at_fault(
        self, chunk: _Chunk, request: PlannedRequest, result: RequestOutcome
    ) -> tuple[PlannedRequest, RequestOutcome]:
        """The items a 400 names fail with Braze's words; the rest of the request goes again
        without them (`catalog_requests.py`). A missing catalog stops the sync."""
        objects: list[bytes] | None = None
        while True:
            missing = catalog_missing(result, self.endpoint.split("/")[2], self.manifest.sync)
            if missing is not None:
                raise missing
            if result.kind != "rejected" or result.status != 400:
                return request, result
            objects = objects or chunk.table["object"].to_pylist()
            named = items_at_fault(result, item_ids(objects, request.rows))
            if not named:  # the request itself is wrong: every item fails, in Braze's words
                result.message = request_message(result)
                return request, result
            self.answers.count(result)
            for i, message in named.items():
                self.answers.fail(chunk.status, chunk.messages, i, message)
            rest = [i for i in request.rows if i not in named]
            request = PlannedRequest(
                request.batch_id, items_body(objects, rest) if rest else b"", rest, request.array
            )
            if not rest:
                return request, result
            result = await self._post(request)

    def _stop_all(self, exc: BrazeAuthError) -> None:
        """Braze refused the key: every request still to go would be refused too. Those that have
        not left are cancelled, their rows unsettled, to be sent once the key is fixed. Those
        already sent are left to end as usual: Braze may have processed them (a key revoked while
        they travelled, a refusal of one request only), so their answers are settled, or their
        rows held or resent by the sync's policy; dropped as unsent, they would go twice."""
        if self._auth_error is None:
            self._auth_error = exc
            for task in self._live:
                if task is not asyncio.current_task() and task not in self._on_wire:
                    task.cancel()

    async def _finish(
        self, settler: LedgerSession, chunk: _Chunk | None, errors: list[BaseException]
    ) -> None:
        """Once a chunk's requests are all answered, settle it in the background: the loop goes
        on planning the next chunk meanwhile. The previous chunk's settle ends first."""
        if chunk is None:
            return
        results = await asyncio.gather(*chunk.tasks, return_exceptions=True)
        self._live.difference_update(chunk.tasks)
        self._on_wire.difference_update(chunk.tasks)
        errors += [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        ]
        if self._settling is not None:
            await self._settling
        self._settling = asyncio.create_task(self._settle_in_background(settler, chunk))

    async def _settle_in_background(self, settler: LedgerSession, chunk: _Chunk) -> None:
        await asyncio.to_thread(self._settle, settler, chunk)
        self._done += chunk.table.num_rows
        if self._bar is not None:
            self._bar.update(chunk.table.num_rows)
        total = self.manifest.valid
        if time.monotonic() - self._last_log > 5 or self._done == total:
            rate = self._done / max(time.monotonic() - self._started, 1e-6)
            eta = (total - self._done) / rate if rate else 0
            self.log(
                f"{self.manifest.sync}: {self._done:,}/{total:,} rows through "
                f"({rate:,.0f} rows/s, ETA {eta:,.0f}s); accepted "
                f"{self.outcome.accepted:,}, failed {self.outcome.failed:,}"
            )
            self._last_log = time.monotonic()

    def _settle(self, ledger: LedgerSession, chunk: _Chunk) -> None:
        """Write a chunk's outcomes: settled rows to the ledger, the rest sent again later."""
        status, messages, hashes = chunk.status, chunk.messages, chunk.hashes
        identifiers = None
        for i, state in enumerate(status):
            if state == "failed" and len(self.outcome.failed_examples) < EXAMPLES_KEPT:
                identifiers = identifiers or chunk.table["identifier"].to_pylist()
                self.outcome.failed_examples.append(  # a failed row always has its message
                    {"row_hash": hashes[i], "identifier": identifiers[i], "message": messages[i] or ""}
                )
        settled = [i for i, s in enumerate(status) if s is not None]
        # One transaction: a crash leaves either the chunk planned (recovered from the journal)
        # or its outcomes in the ledger, never both.
        with ledger.transaction():
            ledger.append(
                ledger_rows(
                    chunk.table.take(pa.array(settled, pa.int64())),
                    [status[i] for i in settled],
                    [chunk.batch_of[i] for i in settled],
                    [messages[i] for i in settled],
                    self.run_id,
                ),
            )
            ledger.clear_planned(chunk.prefix)  # the rest is sent again by a later run
            ledger.remember(accepted_attributes(chunk.table, status, messages))
        if len(settled) < chunk.table.num_rows:
            updated = chunk.table["updated_at"].to_pylist()
            earliest = min(updated[i] for i, s in enumerate(status) if s is None)
            if self._earliest_unsettled is None or earliest < self._earliest_unsettled:
                self._earliest_unsettled = earliest
