"""The production shape of braze_assets on one machine, for `test_production_deploy.py` and the
steps of deploy/README.md.

What runs, as in deploy/dagster.yaml and deploy/helm/values.yaml:

* Dagster's storage (runs, event logs, pool slots, schedules and sensors) in PostgreSQL, which is
  also BRAZE_ASSETS_STATE_URL, the delivery state's home;
* the code location as its own process (`dagster code-server start -m braze_assets.definitions`,
  the image's command) and a workspace.yaml that points at it (`grpc_server`), as the Helm chart
  wires the webserver and the daemon to the user deployment;
* `dagster-webserver` and `dagster-daemon run` on that instance: the QueuedRunCoordinator, the
  pools (`default_limit: 1`), run monitoring, and the `PodLikeRunLauncher`, which starts every run
  in a fresh empty directory of its own (braze_assets_tests/pod_launcher.py);
* BRAZE_ASSETS_DELTA_URL on an S3 bucket (moto's server in tests).

Each process gets its own empty BRAZE_ASSETS_HOME, like a pod's disk. Only the warehouse file is
shared, as a real warehouse is.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCATION = "braze_assets"
REPOSITORY = "__repository__"  # the repository Dagster makes of a Definitions object


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def instance_yaml(postgres_url: str, runs_root: Path) -> str:
    """deploy/dagster.yaml with the same coordinator, pools and monitoring, timed for a test: the
    daemon dequeues every second and checks run workers every 2 s. Dagster's storage connects
    through psycopg2 (SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, not installed)."""
    driver_url = postgres_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    return f"""\
storage:
  postgres:
    postgres_url: "{driver_url}"
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
run_launcher:
  module: braze_assets_tests.pod_launcher
  class: PodLikeRunLauncher
  config:
    runs_root: "{runs_root}"
concurrency:
  runs:
    max_concurrent_runs: 10
  pools:
    default_limit: 1   # pool braze_sync_<name>: one delivery per sync at a time
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  cancel_timeout_seconds: 60
  max_resume_run_attempts: 0
  poll_interval_seconds: 2
  free_slots_after_run_end_seconds: 2
compute_logs:
  module: dagster.core.storage.noop_compute_log_manager
  class: NoOpComputeLogManager
telemetry:
  enabled: false
"""


@dataclass
class Stack:
    """The processes of one deployment: code server, webserver and daemon, in their own sessions."""

    root: Path
    env: dict[str, str]
    code_port: int = field(default_factory=free_port)
    web_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def runs_root(self) -> Path:
        return self.root / "runs"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def write_config(self, postgres_url: str) -> None:
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        (self.dagster_home / "dagster.yaml").write_text(instance_yaml(postgres_url, self.runs_root))
        (self.root / "workspace.yaml").write_text(
            "load_from:\n"
            f"  - grpc_server: {{host: 127.0.0.1, port: {self.code_port}, location_name: {LOCATION}}}\n"
        )

    def _start(self, name: str, command: list[str]) -> None:
        """Start one process in a fresh empty directory (its pod's disk), output to a log file."""
        home = self.root / "pods" / name
        home.mkdir(parents=True)
        env = {**self.env, "BRAZE_ASSETS_HOME": str(home), "DAGSTER_HOME": str(self.dagster_home)}
        with open(self.root / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start(self) -> None:
        bin_dir = Path(sys.executable).parent
        workspace = str(self.root / "workspace.yaml")
        self._start(
            "code_server",
            [
                str(bin_dir / "dagster"),
                *("code-server", "start", "-h", "127.0.0.1", "-p", str(self.code_port)),
                *("-m", "braze_assets.definitions", "--location-name", LOCATION),
                # runs start as `<this python> -m dagster api execute_run`: the venv is not on PATH
                "--use-python-environment-entry-point",
            ],
        )
        self._start(
            "webserver",
            [
                str(bin_dir / "dagster-webserver"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.web_port),
                "-w",
                workspace,
            ],
        )
        self._start("daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", workspace])

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name)}")

    # ------------------------------------------------------------------ the webserver's GraphQL API
    def graphql(self, query: str, variables: dict | None = None) -> dict:
        answer = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60
        )
        answer.raise_for_status()
        body = answer.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def wait_until_loaded(self, timeout: float = 150) -> None:
        """Until the webserver answers and has loaded the code location from the code server."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                data = self.graphql(
                    "{ workspaceOrError { __typename ... on Workspace { locationEntries { name "
                    "loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"
                )
                entries = data["workspaceOrError"].get("locationEntries") or []
                last = json.dumps(entries)
                if entries and all(
                    e["loadStatus"] == "LOADED"
                    and e["locationOrLoadError"]
                    and e["locationOrLoadError"]["__typename"] == "RepositoryLocation"
                    for e in entries
                ):
                    return
                # the code server may still be starting: ask the webserver to reload it
                if (
                    entries
                    and entries[0]["locationOrLoadError"]
                    and (entries[0]["locationOrLoadError"]["__typename"] == "PythonError")
                ):
                    self.graphql(
                        "mutation R($n: String!) { reloadRepositoryLocation(repositoryLocationName: $n) "
                        "{ __typename } }",
                        {"n": LOCATION},
                    )
            time.sleep(1)
        raise AssertionError(
            f"the code location never loaded: {last}\n{self.log('code_server')}\n{self.log('webserver')}"
        )

    def launch(self, job: str, tags: dict[str, str]) -> str:
        """Launch a job as the UI's Launch/Materialize does; the QueuedRunCoordinator queues it."""
        data = self.graphql(
            """mutation Launch($params: ExecutionParams!) {
                 launchRun(executionParams: $params) {
                   __typename
                   ... on LaunchRunSuccess { run { runId status } }
                   ... on Error { message }
                   ... on RunConfigValidationInvalid { errors { message } }
                 }
               }""",
            {
                "params": {
                    "selector": {
                        "repositoryLocationName": LOCATION,
                        "repositoryName": REPOSITORY,
                        "jobName": job,
                    },
                    "runConfigData": {},
                    "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
                }
            },
        )["launchRun"]
        if data["__typename"] != "LaunchRunSuccess":
            raise AssertionError(f"launching {job} failed: {data}")
        return data["run"]["runId"]

    def start_sensor(self, name: str) -> str:
        data = self.graphql(
            """mutation Start($selector: SensorSelector!) {
                 startSensor(sensorSelector: $selector) {
                   __typename
                   ... on Sensor { sensorState { status } }
                   ... on Error { message }
                 }
               }""",
            {
                "selector": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": REPOSITORY,
                    "sensorName": name,
                }
            },
        )["startSensor"]
        if data["__typename"] != "Sensor":
            raise AssertionError(f"starting sensor {name} failed: {data}")
        return data["sensorState"]["status"]

    # ------------------------------------------------------------------ stopping
    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to each process group this stack started, SIGKILL to what is left after the grace."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def kill_group(pid: int) -> None:
    """`kill -9` of a run's whole process group: its run worker and step processes, like a pod dying."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
