"""A project driven through the `braze-assets` command, as a user or cron would: real subprocesses
on a home in tmp_path, a syncs file through BRAZE_ASSETS_SYNCS, and the Braze emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import yaml

from braze_assets.braze.emulator import BrazeEmulator
from braze_assets_tests.conftest import API_KEY, Harness

ROOT = Path(__file__).resolve().parents[1]
#: a run of the first sync launched another way than `braze-assets run` (like a script or the UI
#: would): the job executed on the home's Dagster instance, with no braze_assets process tags
OTHER_LAUNCHER = """
import datetime as dt
import dagster as dg
from braze_assets.automation import incremental_range, range_tags
from braze_assets.config import load_syncs
from braze_assets.definitions import build_definitions, default_resources
from braze_assets.sources.factory import make_source, resource_key
syncs = load_syncs()
resources = default_resources(syncs)
sync = syncs[0]
keys = incremental_range(sync, resources["delivery_state"], dt.datetime.now(dt.timezone.utc),
                         make_source(sync, resources[resource_key(sync)]))
job = build_definitions(syncs, resources).resolve_job_def(f"{sync.name}_job")
print("starting", flush=True)
job.execute_in_process(instance=dg.DagsterInstance.get(), tags=range_tags(keys))
"""


@dataclass
class CliProject:
    """`home` is BRAZE_ASSETS_HOME; the warehouse and the state (`home/state`) are the harness's."""

    harness: Harness
    env: dict

    @property
    def home(self) -> Path:
        return self.harness.tmp_path

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster_home"

    def journal(self, sync: str) -> Path:
        return self.home / "state" / f"{sync}.journal"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "braze_assets.cli", *args]

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def start_elsewhere(self) -> subprocess.Popen:
        """The first sync's job run by a plain script on the home's instance (initialised as
        `braze-assets` does), not by `braze-assets run`."""
        from braze_assets.cli import DAGSTER_YAML
        from braze_assets.instance import initialise_local_instance

        self.dagster_home.mkdir(parents=True, exist_ok=True)
        initialise_local_instance(self.dagster_home, DAGSTER_YAML)
        return subprocess.Popen(
            [sys.executable, "-c", OTHER_LAUNCHER],
            env={**self.env, "DAGSTER_HOME": str(self.dagster_home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args), env=self.env, capture_output=True, text=True, check=False, timeout=timeout
        )

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.dagster_home))


def cli_project(
    tmp_path: Path, emulator: BrazeEmulator, syncs: list[dict], endpoint: str | None = None
) -> CliProject:
    harness = Harness(tmp_path, emulator)
    harness.syncs = syncs
    tmp_path.mkdir(parents=True, exist_ok=True)
    syncs_file = tmp_path / "syncs.yaml"
    syncs_file.write_text(yaml.safe_dump({"syncs": syncs}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "DAGSTER_"))}
    env.update(
        BRAZE_ASSETS_HOME=str(tmp_path),
        BRAZE_ASSETS_SYNCS=str(syncs_file),
        BRAZE_ASSETS_DUCKDB=str(harness.warehouse),
        BRAZE_API_KEY=API_KEY,
        BRAZE_REST_ENDPOINT=endpoint or emulator.base_url,
        PYTHONPATH=str(ROOT),
    )
    return CliProject(harness, env)


def summaries(proc: subprocess.CompletedProcess) -> list[dict]:
    """The `--json` summaries of `braze-assets run`."""
    out = proc.stdout
    assert "[" in out, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out[out.index("[") :])
