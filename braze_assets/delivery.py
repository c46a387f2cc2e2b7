"""Deliver a materialized delta to Braze with the ledger's exactly-once bookkeeping.

Per chunk of the delta: drop rows the ledger settled since the delta was computed, plan requests
(≤ 75 objects and ≤ 4 MB for `/users/track`; ≤ 50 ids of one type for `/users/delete`), record the
rows as `planned`, then send with a bounded number of requests in flight, journaling each request
just before it leaves. Outcomes are written back per chunk; see `state.py` for what each status means
and how a crashed run is recovered.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from braze_assets.braze import contract
from braze_assets.braze.client import BrazeClient, RequestOutcome
from braze_assets.datatypes import DataTypeSpec
from braze_assets.delta import DeltaManifest, reason_key
from braze_assets.state import StateStore

LEDGER_COLUMNS = ("row_hash", "updated_at", "status", "batch_id", "identifier", "message", "run_id")
EXAMPLES_KEPT = 5


class BrazeRequestError(RuntimeError):
    """Braze refused a request in a way no row can fix (wrong URL): a global error."""


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
    failed_reasons: dict[str, int] = field(default_factory=dict)
    failed_examples: list[dict[str, str]] = field(default_factory=list)
    earliest_unsettled: str | None = None
    estimated_data_points: int = 0
    seconds: float = 0.0
    watermark_before: str | None = None
    watermark_after: str | None = None

    @property
    def objects_per_second(self) -> float:
        return (self.accepted + self.failed) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Request:
    batch_id: str
    body: bytes
    rows: list[int]  # positions in the chunk
    array: str  # track array, or the delete id key


def plan_requests(spec: DataTypeSpec, objects: list[bytes], batch_prefix: str) -> list[_Request]:
    """Group serialized objects into requests within Braze's per-request limits [B1.2][B2]."""
    groups: dict[str, list[int]] = {}
    if spec.track_array:
        groups[spec.track_array] = list(range(len(objects)))
        payloads = objects
    else:  # deletions: one identifier type per request
        payloads = []
        for i, raw in enumerate(objects):
            key, value = orjson.loads(raw)
            groups.setdefault(key, []).append(i)
            payloads.append(orjson.dumps(value))
    requests: list[_Request] = []
    for array, positions in groups.items():
        head = b'{"' + array.encode() + b'":['

        def close(rows: list[int]) -> None:
            body = head + b",".join(payloads[i] for i in rows) + b"]}"
            requests.append(_Request(f"{batch_prefix}-{len(requests)}", body, rows, array))

        current: list[int] = []
        size = len(head) + 2
        for i in positions:
            extra = len(payloads[i]) + 1
            if current and (len(current) == spec.max_per_request
                            or size + extra > contract.SEND_BODY_MAX_BYTES):
                close(current)
                current, size = [], len(head) + 2
            current.append(i)
            size += extra
        if current:
            close(current)
    return requests


def _progress_bar(total: int, sync: str):
    """A terminal progress bar for `braze-assets run/demo` (BRAZE_ASSETS_PROGRESS_BAR=1 on a TTY);
    runs in the Dagster UI report progress through their log lines instead."""
    if not total or os.environ.get("BRAZE_ASSETS_PROGRESS_BAR") != "1":
        return None
    try:  # the controlling terminal: Dagster captures the step's stdout and stderr
        terminal = open("/dev/tty", "w")  # noqa: SIM115 - closed with the bar
    except OSError:
        return None  # no terminal (CI, a daemon): progress is in the log lines
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{sync} -> Braze", unit="rows", unit_scale=True,
                file=terminal, mininterval=0.5)


class Delivery:
    """One run's delivery of one delta."""

    def __init__(self, *, spec: DataTypeSpec, store: StateStore, manifest: DeltaManifest,
                 client: BrazeClient, policy: str, max_in_flight: int, run_id: str,
                 chunk_rows: int = 20_000, log: Callable[[str], None] = print):
        self.spec, self.store, self.manifest = spec, store, manifest
        self.client, self.policy, self.max_in_flight = client, policy, max_in_flight
        self.run_id, self.chunk_rows, self.log = run_id, chunk_rows, log
        self.outcome = SyncOutcome(manifest.sync, manifest.data_type, run_id,
                                   rows_in_delta=manifest.valid)
        self._failed_reasons: Counter[str] = Counter()
        self._earliest_unsettled: dt.datetime | None = None

    def run(self) -> SyncOutcome:
        started = time.monotonic()
        with self.store.delivery_lock():
            recovered = self.store.recover(self.policy)
            self.outcome.recovered_settled = recovered["recovered_settled"]
            self.outcome.recovered_ambiguous = recovered["recovered_ambiguous"]
            self.outcome.recovered_unsent = recovered["recovered_unsent"]
            with self.store.connect() as con:
                self._record_invalid(con)
                asyncio.run(self._send_all(con))
        self.outcome.seconds = round(time.monotonic() - started, 3)
        self.outcome.failed_reasons = dict(self._failed_reasons.most_common())
        if self._earliest_unsettled is not None:
            self.outcome.earliest_unsettled = self._earliest_unsettled.isoformat()
        return self.outcome

    def _since(self) -> dt.datetime | None:
        computed = self.manifest.computed_at
        return dt.datetime.fromisoformat(computed) if computed else None

    def _record_invalid(self, con) -> None:
        """Rows that failed validation are settled as `invalid` (never sent, reasons kept)."""
        rejected = pq.read_table(self.manifest.rejected_path)
        if rejected.num_rows:
            known = self.store.known_hashes(con, rejected["row_hash"].to_pylist(),
                                            since=self._since())
            if known:  # recorded by another run since this delta was computed
                rejected = rejected.filter(pc.invert(pc.is_in(
                    rejected["row_hash"], pa.array(list(known), pa.string()))))
            self.store.append(con, pa.table({
                "row_hash": rejected["row_hash"], "updated_at": rejected["updated_at"],
                "status": pa.array(["invalid"] * rejected.num_rows, pa.string()),
                "batch_id": pa.nulls(rejected.num_rows, pa.string()),
                "identifier": rejected["identifier"], "message": rejected["reasons"],
                "run_id": pa.array([self.run_id] * rejected.num_rows, pa.string()),
            }))
        self.outcome.invalid_recorded = rejected.num_rows

    async def _send_all(self, con) -> None:
        parquet = pq.ParquetFile(self.manifest.valid_path)
        total, done, last_log = self.manifest.valid, 0, time.monotonic()
        started = time.monotonic()
        bar = _progress_bar(total, self.manifest.sync)
        with open(self.store.journal_path, "a") as journal:
            async with self.client:
                for n, batch in enumerate(parquet.iter_batches(batch_size=self.chunk_rows)):
                    await self._send_chunk(con, journal, pa.Table.from_batches([batch]),
                                           f"{self.run_id[:8]}-{n}")
                    done += batch.num_rows
                    if bar is not None:
                        bar.update(batch.num_rows)
                    if time.monotonic() - last_log > 5 or done == total:
                        rate = done / max(time.monotonic() - started, 1e-6)
                        eta = (total - done) / rate if rate else 0
                        self.log(f"{self.manifest.sync}: {done:,}/{total:,} rows through "
                                 f"({rate:,.0f} rows/s, ETA {eta:,.0f}s); accepted "
                                 f"{self.outcome.accepted:,}, failed {self.outcome.failed:,}")
                        last_log = time.monotonic()
        if bar is not None:
            bar.close()
            bar.fp.close()

    async def _send_chunk(self, con, journal, chunk: pa.Table, prefix: str) -> None:
        hashes = chunk["row_hash"].to_pylist()
        known = self.store.known_hashes(con, hashes, since=self._since())
        if known:  # settled by another run after this delta was computed: never send twice
            self.outcome.settled_since_delta += len(known)
            chunk = chunk.filter(pa.array([h not in known for h in hashes]))
            hashes = chunk["row_hash"].to_pylist()
        if not chunk.num_rows:
            return
        self.outcome.estimated_data_points += int(pc.sum(chunk["data_points"]).as_py() or 0)
        requests = plan_requests(self.spec, chunk["object"].to_pylist(), prefix)
        batch_of = [""] * chunk.num_rows
        for request in requests:
            for i in request.rows:
                batch_of[i] = request.batch_id
        self.store.plan(con, pa.table({
            "row_hash": chunk["row_hash"], "updated_at": chunk["updated_at"],
            "batch_id": pa.array(batch_of, pa.string()), "identifier": chunk["identifier"],
            "run_id": pa.array([self.run_id] * chunk.num_rows, pa.string())}))
        semaphore = asyncio.Semaphore(self.max_in_flight)
        status: list[str | None] = [None] * chunk.num_rows
        messages: list[str | None] = [None] * chunk.num_rows

        async def send(request: _Request) -> None:
            async with semaphore:
                self.store.journal_start(journal, request.batch_id)
                result = await self.client.post(self.spec.endpoint, request.body,
                                                retry_ambiguous=self.policy == "resend")
            self._apply(request, result, status, messages)
            # Known outcomes reach the journal at once, so a crash later in the chunk does not
            # turn answered requests into ambiguous ones.
            self.store.journal_done(journal, request.batch_id,
                                    [(hashes[i], status[i], messages[i]) for i in request.rows])

        results = await asyncio.gather(*(send(r) for r in requests), return_exceptions=True)
        first_error = next((r for r in results if isinstance(r, BaseException)), None)
        identifiers = chunk["identifier"].to_pylist()
        for i, state in enumerate(status):
            if state == "failed" and len(self.outcome.failed_examples) < EXAMPLES_KEPT:
                self.outcome.failed_examples.append(
                    {"row_hash": hashes[i], "identifier": identifiers[i], "message": messages[i]})
        settled = [i for i, s in enumerate(status) if s is not None]
        self.store.append(con, self._ledger_rows(chunk.take(pa.array(settled, pa.int64())),
                                                 [status[i] for i in settled],
                                                 [batch_of[i] for i in settled],
                                                 [messages[i] for i in settled]))
        self.store.clear_planned(con)  # rows without an outcome are sent again by a later run
        if len(settled) < chunk.num_rows:
            updated = chunk["updated_at"].to_pylist()
            earliest = min(updated[i] for i, s in enumerate(status) if s is None)
            if self._earliest_unsettled is None or earliest < self._earliest_unsettled:
                self._earliest_unsettled = earliest
        journal.truncate(0)
        if first_error is not None:
            raise first_error

    def _apply(self, request: _Request, result: RequestOutcome, status: list, messages: list):
        out = self.outcome
        out.requests += 1
        out.attempts += result.attempts
        out.rate_limited += result.rate_limited
        rows = request.rows
        if result.kind == "refused":
            out.not_sent += len(rows)
            return
        if result.kind == "ambiguous":
            out.ambiguous += len(rows)
            if self.policy == "hold":
                out.held += len(rows)
                for i in rows:
                    status[i] = "held"
                    messages[i] = f"outcome unknown after sending ({result.message}); held"
            else:
                out.not_sent += len(rows)  # resend policy: forgotten, sent again next run
            return
        if result.ambiguous_attempts:
            out.ambiguous += len(rows)  # a retried attempt may also have been processed
        if result.kind == "rejected" and result.status == 404:
            raise BrazeRequestError(f"Braze answered 404 for {self.spec.endpoint}: check the "
                                    "REST endpoint URL")
        errors = result.body.get("errors") if isinstance(result.body, dict) else None
        by_index: dict[int, str] = {}
        for error in errors or []:
            index = error.get("index") if isinstance(error, dict) else None
            if isinstance(index, int) and 0 <= index < len(rows):
                by_index[index] = str(error.get("type") or error.get("message") or error)
            else:
                out.unattributed_errors += 1
                self.log(f"{self.manifest.sync}: Braze reported an error without a row index: "
                         f"{str(error)[:200]}")
        for position, i in enumerate(rows):
            message = by_index.get(position)
            if result.kind == "rejected":
                message = message or f"Braze refused the request: {result.message}"
            if message:
                status[i], messages[i] = "failed", message
                out.failed += 1
                self._failed_reasons[reason_key(message)] += 1
            else:
                status[i] = "accepted"
                out.accepted += 1

    def _ledger_rows(self, chunk: pa.Table, status, batch_ids, messages) -> pa.Table:
        return pa.table({
            "row_hash": chunk["row_hash"], "updated_at": chunk["updated_at"],
            "status": pa.array(status, pa.string()), "batch_id": pa.array(batch_ids, pa.string()),
            "identifier": chunk["identifier"], "message": pa.array(messages, pa.string()),
            "run_id": pa.array([self.run_id] * chunk.num_rows, pa.string()),
        })
