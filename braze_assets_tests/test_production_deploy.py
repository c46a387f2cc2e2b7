"""The production shape end to end: Dagster on PostgreSQL, a daemon and a webserver as real
processes, every run in a fresh empty directory of its own (a pod's disk), deltas on S3.

One deployment (braze_assets_tests/production_stack.py) runs four syncs, one per data type, on a
shared DuckDB warehouse file against the Braze emulator, slowed so that delivery takes seconds:

* the attributes sync is started by its sensor, switched on through the webserver's GraphQL API
  and ticked by the daemon;
* the events, purchases and deletions syncs are launched through the GraphQL API (`launchRun`)
  with their asset job, queued by the QueuedRunCoordinator and dequeued by the daemon; so several
  syncs run at once, each step in its own process (the multiprocess executor);
* the events run is killed with `kill -9` (its run worker and step processes) mid-delivery; run
  monitoring fails it and its pool slot is freed; a second events run, in another fresh
  directory, takes over.

The tests before the last check the deployment itself. The last one checks that the outcome is
the one production needs, and is expected to fail until the delivery state honours
BRAZE_ASSETS_STATE_URL and the deltas BRAZE_ASSETS_DELTA_URL: a run's state is still written to its
own directory, which the next run never sees. Select these tests with `-m production`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import dagster as dg
import duckdb
import psycopg2
import pytest
import yaml
from dagster_duckdb import DuckDBResource

from braze_assets.alert_sensors import run_totals
from braze_assets.automation import incremental_range, range_tags
from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
from braze_assets.config import parse_syncs
from braze_assets.instance import SYNC_TAG, pool_of
from braze_assets.resources import DeliveryStateResource
from braze_assets.seed import cdi_row, create_table, insert_rows
from braze_assets.sources.factory import make_source
from braze_assets_tests.conftest import API_KEY
from braze_assets_tests.pod_launcher import RUN_DIR_TAG, RUN_PID_TAG
from braze_assets_tests.production_stack import REPO_ROOT, Stack, kill_group, running

pytestmark = [pytest.mark.production, pytest.mark.timeout(420)]

UTC = dt.UTC
BUCKET = "braze-assets-deltas"
DELTA_PREFIX = "prod"
ATTRIBUTES, EVENTS, PURCHASES, DELETIONS = 300, 1500, 300, 100
#: the events run is killed once the emulator holds this many of its events (of EVENTS)
KILL_AT_EVENTS = 300
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
#: what a run must never leave on its own disk: ledgers, journals, locks, watermarks, run histories,
#: settled-file lists, rate budgets, delta Parquet files and delta manifests
DURABLE_SUFFIXES = (".duckdb", ".journal", ".lock", ".watermark.json", ".runs.jsonl", ".parquet", ".json")


def _syncs_yaml() -> dict:
    def sync(name: str, data_type: str, table: str) -> dict:
        return {
            "name": name,
            "data_type": data_type,
            "source": {"type": "duckdb", "table": table},
            "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
            "sensor": {"enabled": False, "minimum_interval_seconds": 30},
            "partitions_start": "2024-01-01",
            "max_in_flight": 2,
        }

    return {
        "syncs": [
            sync("prod_attributes", "attributes", "main.attributes"),
            sync("prod_events", "events", "main.events"),
            sync("prod_purchases", "purchases", "main.purchases"),
            sync("prod_deletions", "deletions", "main.deletions"),
        ]
    }


def _seed(warehouse: Path, now: dt.datetime) -> None:
    """Valid rows numbered by `seq` (or `gone-<n>` users to delete), and one row per table that
    validation rejects (no identifier)."""
    ts = (now - dt.timedelta(hours=1)).replace(tzinfo=None)

    def at(i: int) -> dt.datetime:
        return ts - dt.timedelta(seconds=i)

    attributes = [
        cdi_row(at(i), json.dumps({"tier": "gold", "seq": i}), external_id=f"attr-{i}")
        for i in range(ATTRIBUTES)
    ]
    events = [
        cdi_row(
            at(i), json.dumps({"name": "app_open", "properties": {"seq": i}}), external_id=f"ev-{i % 100}"
        )
        for i in range(EVENTS)
    ]
    purchase = {"product_id": "sku-tee", "currency": "USD", "price": 12.5, "quantity": 1}
    purchases = [
        cdi_row(at(i), json.dumps({**purchase, "properties": {"seq": i}}), external_id=f"buyer-{i % 50}")
        for i in range(PURCHASES)
    ]
    deletions = [cdi_row(at(i), external_id=f"gone-{i}") for i in range(DELETIONS)]
    bad = cdi_row(ts, json.dumps({"name": "app_open"}))  # no identifier
    with duckdb.connect(str(warehouse)) as con:
        for table, rows in (("attributes", attributes), ("events", events), ("purchases", purchases)):
            create_table(con, f"main.{table}")
            insert_rows(con, f"main.{table}", [*rows, bad])
        create_table(con, "main.deletions", with_payload=False)
        insert_rows(con, "main.deletions", [*deletions, cdi_row(ts)], with_payload=False)


@dataclass
class Deployment:
    """What the scenario did and saw, for the tests to judge."""

    stack: Stack
    emulator: BrazeEmulator
    instance: dg.DagsterInstance
    s3: object
    runs: dict[str, list[str]] = field(default_factory=dict)  # sync -> run ids, in launch order
    killed_run: str = ""
    killed_at_events: int = 0
    sensor_status: str = ""

    def record(self, run_id: str) -> dg.RunRecord:
        records = self.instance.get_run_records(filters=dg.RunsFilter(run_ids=[run_id]))
        assert records, f"no run {run_id}"
        return records[0]

    def run_dir(self, run_id: str) -> Path:
        return Path(self.record(run_id).dagster_run.tags[RUN_DIR_TAG])

    def all_runs(self) -> list[dg.RunRecord]:
        return [self.record(run_id) for ids in self.runs.values() for run_id in ids]


def _wait(predicate, what: str, stack: Stack, timeout: float = 180, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}\n--- daemon:\n{stack.log('daemon')}")


def _wait_finished(deployment: Deployment, run_id: str, timeout: float = 180) -> dg.DagsterRun:
    def finished():
        run = deployment.instance.get_run_by_id(run_id)
        return run if run is not None and run.status in FINISHED else None

    return _wait(finished, f"run {run_id} to finish", deployment.stack, timeout)


def _sync_runs(instance: dg.DagsterInstance, sync: str) -> list[str]:
    records = instance.get_run_records(filters=dg.RunsFilter(tags={SYNC_TAG: sync}), ascending=True)
    return [r.dagster_run.run_id for r in records if r.dagster_run.job_name == f"{sync}_job"]


@pytest.fixture(scope="module")
def deployment(postgres, s3_endpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("production")
    now = dt.datetime.now(UTC)

    # Dagster's storage and the delivery state: one PostgreSQL database
    database = "braze_assets_production"
    admin = psycopg2.connect(
        host=postgres["host"], port=postgres["port"], user=postgres["user"], dbname=postgres["database"]
    )
    admin.autocommit = True  # CREATE DATABASE runs outside a transaction
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {database}")
        cursor.execute(f"CREATE DATABASE {database}")
    admin.close()
    postgres_url = f"postgresql://{postgres['user']}@{postgres['host']}:{postgres['port']}/{database}"

    # the warehouse (the one thing shared outside the pods), the syncs, S3 and Braze
    warehouse = root / "warehouse.duckdb"
    _seed(warehouse, now)
    syncs_file = root / "syncs.yaml"
    syncs_file.write_text(yaml.safe_dump(_syncs_yaml()))
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=BUCKET)
    emulator = BrazeEmulator(EmulatorConfig(api_key=API_KEY))
    emulator.start()
    emulator.set_faults(FaultConfig(latency_ms=300))  # 2 requests in flight: 500 rows a second

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PYTHONWARNINGS": "ignore::dagster.BetaWarning",
        "BRAZE_API_KEY": API_KEY,
        "BRAZE_REST_ENDPOINT": emulator.base_url,
        "BRAZE_ASSETS_SYNCS": str(syncs_file),
        "BRAZE_ASSETS_DUCKDB": str(warehouse),
        "BRAZE_ASSETS_STATE_URL": postgres_url,
        "BRAZE_ASSETS_DELTA_URL": f"s3://{BUCKET}/{DELTA_PREFIX}",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    env.pop("DAGSTER_HOME", None)
    stack = Stack(root, env)
    stack.write_config(postgres_url)
    instance = dg.DagsterInstance.from_config(str(stack.dagster_home))
    deployment = Deployment(stack, emulator, instance, s3)
    try:
        with running(stack):
            stack.wait_until_loaded()
            _scenario(deployment, warehouse, now)
        yield deployment
    finally:
        for record in instance.get_run_records():  # no run worker outlives the test
            pid = record.dagster_run.tags.get(RUN_PID_TAG)
            if pid:
                kill_group(int(pid))
        instance.dispose()
        emulator.stop()


def _ranges(warehouse: Path, now: dt.datetime, scratch: Path) -> dict[str, dict[str, str]]:
    """Each sync's partition range, as its schedule computes it on a first run."""
    duck = DuckDBResource(database=str(warehouse), connection_config={"access_mode": "READ_ONLY"})
    state = DeliveryStateResource(state_dir=str(scratch))
    return {
        sync.name: range_tags(incremental_range(sync, state, now, make_source(sync, duck)))
        for sync in parse_syncs(_syncs_yaml())
    }


def _scenario(deployment: Deployment, warehouse: Path, now: dt.datetime) -> None:
    stack, instance, emulator = deployment.stack, deployment.instance, deployment.emulator
    tags = _ranges(warehouse, now, stack.root / "scratch")

    # the events run first: it is the one killed mid-delivery
    first_events = stack.launch("prod_events_job", tags["prod_events"])
    deployment.sensor_status = stack.start_sensor("prod_attributes_sensor")
    purchases = stack.launch("prod_purchases_job", tags["prod_purchases"])
    deletions = stack.launch("prod_deletions_job", tags["prod_deletions"])

    def delivering() -> bool:
        run = instance.get_run_by_id(first_events)
        if run is not None and run.status in FINISHED:
            raise AssertionError(f"the events run ended ({run.status}) before it could be killed")
        return len(emulator.store.events()) >= KILL_AT_EVENTS

    _wait(delivering, "events to reach Braze", stack, timeout=150, every=0.05)
    run = instance.get_run_by_id(first_events)
    assert run is not None and run.status == dg.DagsterRunStatus.STARTED, run
    deployment.killed_at_events = len(emulator.store.events())
    kill_group(int(run.tags[RUN_PID_TAG]))
    deployment.killed_run = first_events

    # run monitoring sees the dead worker and fails the run; its pool slot is freed after it ends
    _wait_finished(deployment, first_events, timeout=60)
    second_events = stack.launch("prod_events_job", tags["prod_events"])

    attributes = _wait(lambda: _sync_runs(instance, "prod_attributes"), "the sensor's run", stack)[0]
    for run_id in (purchases, deletions, attributes, second_events):
        _wait_finished(deployment, run_id)
    deployment.runs = {
        "prod_attributes": [attributes],
        "prod_events": [first_events, second_events],
        "prod_purchases": [purchases],
        "prod_deletions": [deletions],
    }
    # the slots of ended runs are freed by run monitoring within free_slots_after_run_end_seconds
    _wait(lambda: not _claimed_slots(instance), "every pool slot to be free", stack, timeout=30)


def _claimed_slots(instance: dg.DagsterInstance) -> dict[str, list[str]]:
    storage = instance.event_log_storage
    claimed = {}
    for sync in _syncs_yaml()["syncs"]:
        info = storage.get_concurrency_info(pool_of(sync["name"]))
        if info.claimed_slots or info.pending_steps:
            claimed[sync["name"]] = [s.run_id for s in info.claimed_slots] + [
                p.run_id for p in info.pending_steps
            ]
    return claimed


def _step_pids(instance: dg.DagsterInstance, run_id: str) -> dict[str, set[str]]:
    """The pid each step's process reported when it started (the multiprocess executor's
    "Executing step ... in subprocess" events)."""
    pids: dict[str, set[str]] = {}
    started = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_WORKER_STARTED)
    for record in started.records:
        event = record.event_log_entry.dagster_event
        data = event.engine_event_data if event else None
        if event and event.step_key and data is not None and "pid" in (data.metadata or {}):
            pids.setdefault(event.step_key, set()).add(str(data.metadata["pid"].value))
    return pids


# ---------------------------------------------------------------------------------- the deployment
def test_runs_are_queued_dequeued_and_executed_in_fresh_directories(deployment):
    """Every run went through the queue, ran in its own new directory, and the first attempt of
    each sync but events succeeded."""
    dirs = []
    for record in deployment.all_runs():
        run = record.dagster_run
        assert run.tags.get(RUN_DIR_TAG), f"run {run.run_id} was not launched by the pod-like launcher"
        dirs.append(run.tags[RUN_DIR_TAG])
        events = deployment.instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED
        ).records
        assert events, f"run {run.run_id} never went through the QueuedRunCoordinator"
    assert len(set(dirs)) == len(dirs), "a run directory was reused"
    assert all(Path(d).parent == deployment.stack.runs_root for d in dirs)
    for sync, ids in deployment.runs.items():
        final = deployment.instance.get_run_by_id(ids[-1])
        assert final.status == dg.DagsterRunStatus.SUCCESS, (
            f"{sync}: {final.status}\n{deployment.stack.log('daemon')}"
        )


def test_sensor_ticks_through_the_daemon(deployment):
    assert deployment.sensor_status == "RUNNING"
    (run_id,) = deployment.runs["prod_attributes"]
    run = deployment.record(run_id).dagster_run
    assert run.tags.get("dagster/sensor_name") == "prod_attributes_sensor"


def test_steps_run_in_their_own_processes(deployment):
    """The multiprocess executor: the delta and the delivery of a run ran in different processes,
    neither of them the run worker."""
    for sync, ids in deployment.runs.items():
        run_id = ids[-1]
        pids = _step_pids(deployment.instance, run_id)
        delta, results = pids.get(f"{sync}_delta"), pids.get(f"{sync}_sync_results")
        assert delta and results, f"{sync}: steps reported no pid: {pids}"
        worker = deployment.record(run_id).dagster_run.tags[RUN_PID_TAG]
        assert delta.isdisjoint(results) and worker not in delta | results, (sync, pids, worker)


def test_syncs_run_at_once(deployment):
    """Runs of different syncs overlapped in time (each sync's own pool keeps only its own runs apart)."""
    spans = {}
    for sync, ids in deployment.runs.items():
        record = deployment.record(ids[-1])
        spans[sync] = (record.start_time, record.end_time)
    overlapping = [
        (a, b)
        for a in spans
        for b in spans
        if a < b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
    ]
    assert overlapping, spans


def test_killed_run_is_failed_by_run_monitoring_and_frees_its_slot(deployment):
    killed = deployment.instance.get_run_by_id(deployment.killed_run)
    assert killed.status == dg.DagsterRunStatus.FAILURE
    failures = deployment.instance.get_records_for_run(
        deployment.killed_run, of_type=dg.DagsterEventType.RUN_FAILURE
    ).records
    said = " ".join(r.event_log_entry.dagster_event.message or "" for r in failures)
    assert "Detected run worker status" in said, f"not failed by run monitoring: {said}"
    assert deployment.killed_at_events < EVENTS, "the kill came after delivery had finished"
    second = deployment.runs["prod_events"][1]
    assert deployment.run_dir(second) != deployment.run_dir(deployment.killed_run)
    assert deployment.instance.get_run_by_id(second).status == dg.DagsterRunStatus.SUCCESS
    assert not _claimed_slots(deployment.instance)


# ---------------------------------------------------------------------------------- the outcome
def test_outcome_equals_a_single_process_run(deployment):
    """What production needs: every valid row in Braze, no event or purchase twice, what the
    killed run left ambiguous counted by the run that took over, no pool slot left claimed, and
    nothing that must outlive a run on any run's (or the code location's) disk."""
    store, instance = deployment.emulator.store, deployment.instance

    events = Counter(e["properties"]["seq"] for e in store.events())
    purchases = Counter(p["properties"]["seq"] for p in store.purchases())
    assert [s for s, n in events.items() if n > 1] == [], "events delivered twice"
    assert [s for s, n in purchases.items() if n > 1] == [], "purchases delivered twice"
    assert set(purchases) == set(range(PURCHASES))

    second = deployment.runs["prod_events"][1]
    # the run's totals, where the product keeps them for any run (one day or several)
    metadata = run_totals(instance, second, "prod_events")
    assert metadata, "the resumed events run reported no results"
    missing = set(range(EVENTS)) - set(events)
    # rows of requests in flight at the kill that never reached Braze: ambiguous, and held
    assert len(missing) <= metadata["recovered_from_crash_ambiguous"], (len(missing), metadata)
    assert len(missing) <= metadata["rows_held_ambiguous"], (len(missing), metadata)
    # The killed run's answered requests were settled from its journal (in PostgreSQL) and not
    # sent again; the resumed run sent only the rest.
    assert metadata["recovered_from_crash_settled"] > 0, metadata
    assert metadata["rows_settled_by_another_run"] > 0, metadata
    assert metadata["rows_accepted"] == EVENTS - metadata["rows_settled_by_another_run"], metadata

    profiles = {p.get("external_id"): p["attributes"] for p in store.profiles()}
    assert all(profiles.get(f"attr-{i}", {}).get("seq") == i for i in range(ATTRIBUTES))
    deleted = {d["id"] for d in store.deletions() if d["type"] == "external_id"}
    assert deleted == {f"gone-{i}" for i in range(DELETIONS)}

    assert not _claimed_slots(instance)

    left = {
        str(path)
        for directory in [
            *(deployment.run_dir(r.dagster_run.run_id) for r in deployment.all_runs()),
            *(deployment.stack.root / "pods").iterdir(),
        ]
        for path in directory.rglob("*")
        if path.is_file() and path.name.endswith(DURABLE_SUFFIXES)
    }
    assert not left, f"state left on a pod's disk: {sorted(left)[:20]}"

    listed = deployment.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{DELTA_PREFIX}/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert any(k.endswith(".parquet") for k in keys), f"no delta files on S3: {keys[:10]}"
    assert any(k.endswith(".json") for k in keys), f"no delta manifests on S3: {keys[:10]}"
