"""Prepare a delta's batches on every core, in order.

A delta's scan, ledger probe and Parquet writing are light; preparing each batch (parsing,
validating, diffing, building objects: `delta_batch.py`) is where the CPU goes. `PreparePool`
hands batches to worker processes and gives their results back in the order the batches came,
so the delta's files are the same, row for row, as when one process does everything.

Workers are forked from a fork server that has loaded the preparation code once
(`delta_preload.py`), so a worker starts in milliseconds; the server itself starts only when a
delta is large enough to need it, a little before its pool (`DeltaWriter`). At most two batches
per worker are in flight, and with the attribute diff at most two lookup groups wait for their
hashes (`DeltaWriter`, `LOOKUP_ROWS`, `LOOKUP_BYTES`): memory stays bounded. A worker that dies (killed for
memory, say) loses nothing: the batches it held are prepared again in the run's own process,
which carries on without workers.

`BRAZE_ASSETS_DELTA_WORKERS` sets the number of workers: `0` prepares every batch in the run's
own process; unset, one per core the process may use (none on a single core).
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import logging
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import pyarrow as pa

from braze_assets.delta_batch import BatchJob, Prepared, prepare_batch
from braze_assets.known_users import Identified, KnownUsers, identify

WORKERS_ENV = "BRAZE_ASSETS_DELTA_WORKERS"
_log = logging.getLogger(__name__)


def configured_workers() -> int:
    """Workers from `BRAZE_ASSETS_DELTA_WORKERS`, or one per usable core (0 on a single core)."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if not raw:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cores if cores > 1 else 0
    try:
        workers = int(raw)
    except ValueError:
        raise ValueError(f"{WORKERS_ENV} must be a whole number of worker processes, not {raw!r}") from None
    if not 0 <= workers <= 64:
        raise ValueError(f"{WORKERS_ENV} must be from 0 (no workers) to 64, not {workers}")
    return workers


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["braze_assets.delta_preload"])
    return context


def warm_up() -> None:
    """Start the fork server now, without waiting for it: it loads the preparation code (about
    1.5 s here) beside the run's own work, instead of while the pool's first batches wait for
    their workers. Nothing to do where workers are spawned."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


#: A batch's users being hashed in a worker for the state's lookup (`PreparePool.identify`).
Hashing = concurrent.futures.Future[Identified]


@dataclass
class _Task:
    rows: pa.RecordBatch | pa.Table
    hashes: list[str] | None
    known: KnownUsers | None
    future: concurrent.futures.Future[list[Prepared]] | None = None
    #: what the run's own process prepared of the batch already (its unchanged rows), due first
    ready: Prepared | None = None


#: A worker's job, set once when it starts: what it keeps between batches (the attribute diff's
#: hashes of values seen, which a job pickled with each batch would lose) stays with it.
_worker_job: BatchJob | None = None


def _start_worker(job: BatchJob) -> None:
    global _worker_job
    _worker_job = job
    gc.freeze()  # what the fork server imported is never walked by the worker's collector


def _identify_in_worker(rows: pa.RecordBatch | pa.Table, with_row_hashes: bool) -> Identified:
    if _worker_job is None:
        raise RuntimeError("a delta worker was given a batch before its job")
    return identify_batch(_worker_job, rows, with_row_hashes)


def identify_batch(job: BatchJob, rows: pa.RecordBatch | pa.Table, with_row_hashes: bool) -> Identified:
    """`known_users.identify` of a delta's batch (with its row hashes when it came without)."""
    return identify(rows, job.hash_columns if with_row_hashes else (), job.lookup_key)


def _prepare_in_worker(
    rows: pa.RecordBatch | pa.Table, hashes: list[str] | None, known: KnownUsers | None
) -> list[Prepared]:
    if _worker_job is None:
        raise RuntimeError("a delta worker was given a batch before its job")
    return prepare_batch(_worker_job, rows, hashes, known)


class PreparePool:
    """Batches in, `Prepared` results out in the same order (`submit` yields those now due)."""

    def __init__(self, job: BatchJob, workers: int):
        self.job = job
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=_context(), initializer=_start_worker, initargs=(job,)
        )
        self._executor: concurrent.futures.ProcessPoolExecutor | None = executor
        self._pending: collections.deque[_Task] = collections.deque()
        self._limit = 2 * workers

    def submit(
        self,
        rows: pa.RecordBatch | pa.Table,
        hashes: list[str] | None,
        known: KnownUsers | None = None,
        ready: Prepared | None = None,
    ) -> Iterator[Prepared]:
        """Queue one batch (`ready`: what of it was prepared already, yielded before the rest);
        yield the results of the oldest batches once too many are in flight."""
        task = _Task(rows, hashes, known, ready=ready)
        if self._executor is not None and rows.num_rows:
            try:
                task.future = self._executor.submit(_prepare_in_worker, rows, hashes, known)
            except BrokenProcessPool:
                self._lose_workers()
        self._pending.append(task)
        while len(self._pending) > self._limit or (self._executor is None and self._pending):
            yield from self._next()

    def identify(self, rows: pa.RecordBatch | pa.Table, with_row_hashes: bool = False) -> Hashing | None:
        """Start hashing a batch's users and PAYLOADs in a worker (`known_users.identify`; with
        its row hashes, when it came without them), for the lookup the run's own process makes;
        None when there are no workers left."""
        if self._executor is None:
            return None
        try:
            return self._executor.submit(_identify_in_worker, rows, with_row_hashes)
        except BrokenProcessPool:
            self._lose_workers()
            return None

    def identified(
        self, rows: pa.RecordBatch | pa.Table, hashing: Hashing | None, with_row_hashes: bool = False
    ) -> Identified:
        """What `identify` started gave; done here if it was not started or its worker died."""
        if hashing is not None:
            try:
                return hashing.result()
            except BrokenProcessPool:
                self._lose_workers()
        return identify_batch(self.job, rows, with_row_hashes)

    def drain(self) -> Iterator[Prepared]:
        """The results of every batch still in flight, in order."""
        while self._pending:
            yield from self._next()

    def _next(self) -> Iterator[Prepared]:
        task = self._pending.popleft()
        if task.ready is not None:
            yield task.ready
        if not task.rows.num_rows:
            return
        if task.future is not None:
            try:
                yield from task.future.result()
                return
            except BrokenProcessPool:
                self._lose_workers()
        yield from prepare_batch(self.job, task.rows, task.hashes, task.known)

    def _lose_workers(self) -> None:
        if self._executor is not None:
            _log.warning(
                "a delta worker process died; its batches are prepared again in this process, "
                "which goes on without workers"
            )
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            for task in self._pending:
                task.future = None

    def close(self) -> None:
        """Stop the workers (batches still in flight are dropped: call `drain` first to keep them)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
