"""The Dagster instance side of a sync: its local storage created once, and dead runs reclaimed.

A run killed with `kill -9` stays STARTED in Dagster and keeps the slot it claimed in its sync's
pool (`braze_sync_<name>`, limit 1), so every later run of the sync would wait for it forever.
`reclaim_dead_runs` runs before each launch (the CLI, the schedules and the sensors): it finds the
runs of a sync that hold or wait for its pool, or are in progress, decides from the process that ran
them whether they are still alive, marks the dead ones failed and frees their slots. The sync's
state lock (`StateStore.delivery_lock`: an flock, or a PostgreSQL advisory lock) needs nothing:
the OS or the database server released it when the process died. Runs it cannot judge from here
(another host, a Kubernetes pod) count as alive and are left to Dagster's run monitoring
(`run_monitoring` in dagster.yaml).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

# private: Dagster 1.13 exports neither the SQLite run storage class nor the gRPC-info run tag
from dagster._core.storage.runs import SqliteRunStorage
from dagster._core.storage.tags import GRPC_INFO_TAG

SYNC_TAG = "braze_assets/sync"
#: where the process running a run lives: set by `braze-assets run` on the runs it executes
HOST_TAG = "braze_assets/host"
PID_TAG = "braze_assets/pid"
IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def pool_of(sync_name: str) -> str:
    return f"braze_sync_{sync_name}"


def process_tags() -> dict[str, str]:
    """Tags naming this process as the one that runs a run (for runs executed in process)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` (released by the OS if the process dies); yields whether it was
    taken (always, when blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def initialise_local_instance(dagster_home: Path, config_text: str) -> None:
    """Write dagster.yaml and create the instance's SQLite storages, once, under a lock.

    Dagster creates a missing runs.db / schedules.db / index.db and stamps its alembic revision
    when an instance is first opened; two processes doing it at once leave two alembic heads and
    every later run fails. Here the first process creates them while the others wait, then find
    them ready.
    """
    with file_lock(dagster_home / ".instance.lock"):
        config = dagster_home / "dagster.yaml"
        if not config.exists() or config.read_text() != config_text:
            partial = config.with_name(f".dagster.yaml.{os.getpid()}")
            partial.write_text(config_text)
            os.replace(partial, config)  # readers see the old file or the new one, never half
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            instance.get_runs(limit=1)  # run storage (and the daemon tables)
            instance.event_log_storage.get_pool_limits()  # event log index, concurrency tables
            instance.all_instigator_state()  # schedule storage


# ------------------------------------------------------------------ dead runs
@dataclass(frozen=True)
class RunProcess:
    """What a run's process is known to be, and whether it is alive (None: cannot tell here)."""

    run_id: str
    status: str
    host: str | None
    pid: int | None
    alive: bool | None
    why: str

    def describe(self) -> str:
        where = f"pid {self.pid}" + (f" on {self.host}" if self.host else "")
        return f"run {self.run_id} ({self.status.lower()}, {where if self.pid else self.why})"


@dataclass
class PoolState:
    """What `reclaim_dead_runs` did and found for one sync."""

    sync: str
    reclaimed: list[str] = field(default_factory=list)
    #: runs still in progress, alive or impossible to judge from here: the sync is busy
    busy: list[RunProcess] = field(default_factory=list)

    def busy_message(self) -> str:
        return (
            f"sync {self.sync} is busy: "
            + "; ".join(p.describe() for p in self.busy)
            + f" holds or waits for pool {pool_of(self.sync)}; try again when it ends (a run "
            "that is gone on another host: mark it failed in the UI to free its slot)"
        )


def reclaim_dead_runs(
    instance: dg.DagsterInstance, sync_name: str, log: Callable[[str], None] | None = None
) -> PoolState:
    """Fail the dead runs of a sync and free their pool slots; report the live ones as busy.

    The runs looked at: those holding or waiting for a slot of the sync's pool (whatever job they
    belong to) and those of the sync's job still in progress. A finished run keeps no slot.
    """
    log = log or (lambda message: None)
    state = PoolState(sync_name)
    storage = instance.event_log_storage
    pool = pool_of(sync_name)
    in_pool: set[str] = set()
    if storage.supports_global_concurrency_limits:
        info = storage.get_concurrency_info(pool)
        in_pool = {s.run_id for s in info.claimed_slots} | {p.run_id for p in info.pending_steps}
    records = {
        r.dagster_run.run_id: r
        for r in instance.get_run_records(
            filters=dg.RunsFilter(tags={SYNC_TAG: sync_name}, statuses=IN_PROGRESS)
        )
    }
    others = in_pool - records.keys()
    if others:
        records.update(
            (r.dagster_run.run_id, r)
            for r in instance.get_run_records(filters=dg.RunsFilter(run_ids=sorted(others)))
        )
    for run_id in sorted(in_pool - records.keys()):  # the run was deleted, its slot was not
        storage.free_concurrency_slots_for_run(run_id)
        state.reclaimed.append(_say(log, f"{sync_name}: freed the pool slot of deleted run {run_id}"))
    for run_id, record in records.items():
        run = record.dagster_run
        if run.is_finished:
            if run_id in in_pool:
                storage.free_concurrency_slots_for_run(run_id)
                state.reclaimed.append(
                    _say(
                        log,
                        f"{sync_name}: freed the pool slot of run {run_id}, which ended ({run.status.value})",
                    )
                )
            continue
        process = run_process(instance, record)
        if process.alive is not False:
            state.busy.append(process)
            continue
        current = instance.get_run_by_id(run_id)
        if current is not None and not current.is_finished:
            instance.report_run_failed(
                current,
                message=(
                    f"The process running this run is gone ({process.why}): marked failed by "
                    f"braze_assets before launching {sync_name} again; its pool slots are freed. Rows "
                    "it had in flight are recovered from the sync's journal by the next run."
                ),
            )
        storage.free_concurrency_slots_for_run(run_id)
        gone = f"pid {process.pid} gone" if process.pid else process.why
        state.reclaimed.append(
            _say(
                log,
                (
                    f"{sync_name}: reclaimed the pool slot and locks of dead run {run_id} ({gone}); its "
                    "state lock was released by the OS when it died"
                ),
            )
        )
    return state


def run_process(instance: dg.DagsterInstance, record) -> RunProcess:
    """Find the process of an in-progress run and judge whether it is alive.

    Runs executed by `braze-assets run` carry their host and pid as tags. Other runs are judged by
    the pid in their first engine event that has one: the run worker's ("Started process for run",
    Dagster's DefaultRunLauncher under dg dev or the daemon) or the process executing the
    steps (an in-process or multiprocess executor). That pid is on this machine when the run's
    code server is (`dagster/grpc_info`), or when the instance's storage is SQLite files (every
    run of such an instance runs here). A pid counts only if its process started before the run
    reported it (else the pid was reused by another process).
    """
    run = record.dagster_run
    tags = run.tags
    status = run.status.value
    here = socket.gethostname()
    if PID_TAG in tags:
        host, pid = tags.get(HOST_TAG), int(tags[PID_TAG])
        if host != here:
            return RunProcess(run.run_id, status, host, pid, None, "on another host")
        return _judge(run.run_id, status, host, pid, record.create_timestamp.timestamp())
    grpc = json.loads(tags.get(GRPC_INFO_TAG) or "{}")
    local = (
        bool(grpc.get("socket"))
        or grpc.get("host") in LOCAL_HOSTS | {here}
        or isinstance(instance.run_storage, SqliteRunStorage)
    )
    if local:
        for event in instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=50
        ).records:
            dagster_event = event.event_log_entry.dagster_event
            data = dagster_event.engine_event_data if dagster_event else None
            if data is not None and "pid" in (data.metadata or {}):
                pid = int(str(data.metadata["pid"].value))
                return _judge(run.run_id, status, here, pid, event.event_log_entry.timestamp)
    if run.status == dg.DagsterRunStatus.STARTING:
        launched = instance.get_run_stats(run.run_id).launch_time or record.create_timestamp.timestamp()
        timeout = instance.run_monitoring_start_timeout_seconds
        if time.time() - launched > timeout:
            return RunProcess(
                run.run_id, status, None, None, False, f"no run worker started within {timeout} s"
            )
    return RunProcess(run.run_id, status, None, None, None, "its process is not known here")


def _judge(run_id: str, status: str, host: str, pid: int, alive_at: float) -> RunProcess:
    started = process_start_time(pid)
    if started is None:
        return RunProcess(run_id, status, host, pid, False, f"pid {pid} gone")
    if started > alive_at + 2.0:  # /proc's boot time has a 1 s resolution
        return RunProcess(run_id, status, host, pid, False, f"pid {pid} gone (now another process's)")
    return RunProcess(run_id, status, host, pid, True, "alive")


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), None if there is no such live process (a
    zombie is dead); 0.0 where the start time cannot be read (not Linux)."""
    if not Path("/proc/self/stat").exists():
        return _exists(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return _exists(pid)
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X", "x"):
        return None
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime ")
    )
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _exists(pid: int) -> float | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0.0


def _say(log: Callable[[str], None], message: str) -> str:
    log(message)
    return message
