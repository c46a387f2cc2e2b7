"""Shared fixtures: a real DuckDB warehouse on tmp_path, the Braze emulator over loopback HTTP, and a
harness that runs a sync's real Dagster job on an ephemeral instance."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from braze_assets.automation import incremental_range, range_tags
from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
from braze_assets.config import parse_syncs
from braze_assets.definitions import build_definitions
from braze_assets.resources import (
    BrazeResource,
    DeliveryStateResource,
    DeltaIOManager,
    WatermarkIOManager,
    manifest_root,
)
from braze_assets.seed import cdi_row, create_table, insert_rows
from braze_assets.sources.factory import make_source, resource_key
from braze_assets_tests.postgres_server import PostgresMissing, throwaway_postgres

API_KEY = "test-key-7f3a9c"
UTC = dt.UTC


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.fixture(scope="module")
def server() -> Iterator[BrazeEmulator]:
    """One emulator per test module over loopback HTTP (starting one per test is slow); take it
    through `braze`, which hands each test a clean one."""
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emulator:
        yield emulator


@pytest.fixture
def braze(server: BrazeEmulator) -> BrazeEmulator:
    """The module's emulator, emptied, with no faults and no rate limits."""
    server.store.reset()
    server.set_faults(FaultConfig())
    server.set_rate_limit(None)
    server.set_export_rate_limit(None)
    return server


@pytest.fixture
def emulator():
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emu:
        yield emu


def sync_config(name: str, data_type: str, table: str, **extra) -> dict:
    return {
        "name": name,
        "data_type": data_type,
        "source": {"type": "duckdb", "table": table},
        "partitions_start": "2024-01-01",
        **extra,
    }


@dataclass
class RunOutcome:
    result: dg.ExecuteInProcessResult
    delta: object | None
    outcome: object | None


@dataclass
class Harness:
    """One project: a warehouse file, a state dir, syncs, and the emulator it talks to."""

    tmp_path: Path
    emulator: BrazeEmulator
    syncs: list[dict] = field(default_factory=list)
    api_key: str = API_KEY
    braze_overrides: dict = field(default_factory=dict)
    extra_resources: dict = field(default_factory=dict)
    #: The PostgreSQL state backend's URL; None: the embedded backend under `state_dir`.
    state_url: str | None = None

    @property
    def warehouse(self) -> Path:
        return self.tmp_path / "warehouse.duckdb"

    @property
    def state_dir(self) -> Path:
        return self.tmp_path / "state"

    def table(self, name: str, rows: list[dict], payload: bool = True) -> None:
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        with duckdb.connect(str(self.warehouse)) as con:
            create_table(con, name, with_payload=payload)
            insert_rows(con, name, rows, with_payload=payload)

    def resources(self) -> dict:
        braze = {
            "rest_endpoint": self.emulator.base_url,
            "api_key": self.api_key,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.2,
            "timeout_s": 5.0,
            "state_dir": str(self.state_dir),
            **self.braze_overrides,
        }
        return {
            "braze": BrazeResource(**braze),
            "duckdb": DuckDBResource(
                database=str(self.warehouse), connection_config={"access_mode": "READ_ONLY"}
            ),
            **self.extra_resources,
            "delivery_state": self.delivery_state(),
            "delta_io_manager": DeltaIOManager(base_dir=manifest_root(self.tmp_path)),
            "watermark_io_manager": WatermarkIOManager(
                state_dir=str(self.state_dir), state_url=self.state_url
            ),
        }

    def definitions(self) -> dg.Definitions:
        return build_definitions(parse_syncs({"syncs": self.syncs}), self.resources())

    def config(self, name: str):
        return next(s for s in parse_syncs({"syncs": self.syncs}) if s.name == name)

    def run(
        self, name: str, keys: dg.PartitionKeyRange | None = None, instance: dg.DagsterInstance | None = None
    ) -> RunOutcome:
        """Run the sync's job like its schedule does (incremental range) or for `keys`."""
        resources = self.resources()
        sync = self.config(name)
        if keys is None:
            keys = incremental_range(
                sync,
                resources["delivery_state"],
                dt.datetime.now(UTC),
                make_source(sync, resources[resource_key(sync)]),
            )
        job = self.definitions().resolve_job_def(f"{name}_job")
        result = job.execute_in_process(
            instance=instance or dg.DagsterInstance.ephemeral(), tags=range_tags(keys), raise_on_error=False
        )
        return RunOutcome(result, _output(result, f"{name}_delta"), _output(result, f"{name}_sync_results"))

    def ledger(self, name: str) -> dict[str, int]:
        return self.delivery_state().store(name).log.status_counts()

    def watermark(self, name: str):
        return self.delivery_state().store(name).read_watermark().value

    def delivery_state(self) -> DeliveryStateResource:
        return DeliveryStateResource(state_dir=str(self.state_dir), state_url=self.state_url)


def _output(result, node):
    try:
        return result.output_for_node(node)
    except Exception:
        return None


#: Runs a test once per state backend (it must take `harness`, `state_url` or `state_backend`).
both_backends = pytest.mark.parametrize("state_backend", ["embedded", "postgres"], indirect=True)


@pytest.fixture
def state_backend(request) -> str:
    """Which state backend a test runs on: "embedded" unless parametrized (indirect=True)."""
    return getattr(request, "param", "embedded")


@pytest.fixture
def state_url(request, state_backend) -> str | None:
    """None for the embedded backend; for PostgreSQL, a URL with a schema of this test's own."""
    if state_backend == "embedded":
        return None
    pg = request.getfixturevalue("postgres")
    return pg_state_url(pg)


def pg_state_url(pg: dict, schema: str | None = None) -> str:
    import uuid

    schema = schema or f"t_{uuid.uuid4().hex[:12]}"
    return f"postgresql://{pg['user']}@{pg['host']}:{pg['port']}/{pg['database']}?schema={schema}"


@pytest.fixture
def harness(tmp_path, emulator, state_url) -> Harness:
    return Harness(tmp_path, emulator, state_url=state_url)


def earlier_today(before: dt.timedelta, now: dt.datetime | None = None) -> dt.datetime:
    """`now - before`, or today's midnight (UTC) when that falls on yesterday: rows stamped so make a
    first sync's run cover today only, at any time of day. A run over two days reports each day
    apart (its checks once per day), which a test of a one-day run must not depend on."""
    now = now or dt.datetime.now(UTC).replace(microsecond=0)
    return max(now - before, now.replace(hour=0, minute=0, second=0, microsecond=0))


def events_rows(n: int, ts: dt.datetime, start: int = 0, prefix: str = "user") -> list[dict]:
    """`n` distinct valid events at `ts` (naive UTC in the table), numbered by `seq`."""
    return [
        cdi_row(
            ts.replace(tzinfo=None),
            json.dumps({"name": "app_open", "properties": {"seq": start + i}}),
            external_id=f"{prefix}-{(start + i) % 50}",
        )
        for i in range(n)
    ]


def seqs(emulator: BrazeEmulator, kind: str = "events") -> list[int]:
    items = emulator.store.events() if kind == "events" else emulator.store.purchases()
    return sorted(item["properties"]["seq"] for item in items)


_KILL_SCRIPT = """
import sys, pathlib
from braze_assets_tests.conftest import Harness, sync_config

class Remote:  # the emulator lives in the test process; only its URL crosses over
    base_url = sys.argv[2]

harness = Harness(pathlib.Path(sys.argv[1]), Remote(), state_url=sys.argv[3] or None)
harness.syncs = [sync_config("events", "events", "main.events", max_in_flight=4)]
harness.run("events")
"""


def kill_9_mid_sync(
    tmp_path: Path,
    emulator: BrazeEmulator,
    events_before_kill: int,
    state_url: str | None = None,
    until: Callable[[], bool] | None = None,
) -> None:
    """Run the `events` sync (main.events, 4 requests in flight) in another process and kill -9
    it once the emulator holds `events_before_kill` events (or, given `until`, once it says so:
    a crash while nothing reaches Braze): the crash a recovery must survive."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), emulator.base_url, state_url or ""],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    reached = until or (lambda: len(emulator.store.events()) >= events_before_kill)
    while not reached():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
        assert time.monotonic() < deadline, "the sync never got going"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


__all__ = [
    "API_KEY",
    "FaultConfig",
    "Harness",
    "both_backends",
    "cdi_row",
    "events_rows",
    "seqs",
    "sync_config",
    "utc",
]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback (port 0: the OS picks one), one per test module."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server on loopback (the Redshift stand-in and the state backend);
    `make test` installs the binaries (scripts/ensure-postgres)."""
    try:
        with throwaway_postgres() as server:
            yield server
    except PostgresMissing as exc:
        pytest.fail(str(exc))


# ------------------------------------------------------------------ Snowflake stand-in (fakesnow)
# Captured now: fakesnow.server() imports its submodule fakesnow.server, which then shadows the
# function on the package, so a second module-scoped server would find a module there.
from fakesnow import server as _FAKESNOW_SERVER  # noqa: E402


def _with_nulls(to_struct):
    """fakesnow 0.12.1's server sends a NULL timestamp as 1970-01-01: it builds Snowflake's
    (epoch, fraction) struct without the validity mask. Give the struct the column's nulls."""
    import pyarrow as pa

    def convert(ts):
        ts = ts.combine_chunks() if isinstance(ts, pa.ChunkedArray) else ts
        struct = to_struct(ts)
        return pa.StructArray.from_arrays(struct.flatten(), fields=list(struct.type), mask=ts.is_null())

    return convert


@pytest.fixture(scope="module")
def snowflake_server():
    """fakesnow's server on loopback: the real connector talks to it over HTTP."""
    import fakesnow.arrow

    with pytest.MonkeyPatch.context() as patch, _FAKESNOW_SERVER() as kwargs:
        patch.setattr(
            fakesnow.arrow, "timestamp_to_sf_struct", _with_nulls(fakesnow.arrow.timestamp_to_sf_struct)
        )
        yield kwargs


def snowflake_resource(server: dict, password: str = "snow"):
    from dagster_snowflake import SnowflakeResource

    extra = {k: server[k] for k in ("host", "port", "protocol", "session_parameters", "network_timeout")}
    return SnowflakeResource(
        account=server["account"],
        user=server["user"],
        password=password,
        database="CDI_DB",
        schema="PUBLIC",
        additional_snowflake_connection_args=extra,
    )


def process_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members
