"""Dagster resources and IO managers: Braze, the delivery state, and where deltas and watermarks live."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from braze_assets.braze.client import BrazeClient
from braze_assets.delivery import SyncOutcome
from braze_assets.delta import DeltaManifest
from braze_assets.state import StateStore, Watermark


def home_dir() -> Path:
    """Where local state lives: $BRAZE_ASSETS_HOME, else ./.braze_assets."""
    return Path(os.environ.get("BRAZE_ASSETS_HOME") or ".braze_assets").resolve()


class BrazeResource(dg.ConfigurableResource):
    """The Braze REST API of one workspace. The key comes from an environment variable
    (`dg.EnvVar("BRAZE_API_KEY")`) and is never logged or shown."""

    rest_endpoint: str = Field(description="e.g. https://rest.iad-01.braze.com, or the emulator")
    api_key: str = Field(description="REST API key with users.track and users.delete")
    allow_custom_host: bool = Field(default=False, description="Allow a non-Braze HTTPS host")
    timeout_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=20)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)

    def client(self, max_in_flight: int) -> BrazeClient:
        return BrazeClient(
            self.rest_endpoint,
            self.api_key,
            max_connections=max_in_flight,
            timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            allow_custom_host=self.allow_custom_host,
        )


class DatabricksResource(dg.ConfigurableResource):
    """A Databricks SQL warehouse (databricks-sql-connector, personal access token)."""

    server_hostname: str
    http_path: str
    access_token: str

    def connect(self):
        from databricks import sql

        return sql.connect(
            server_hostname=self.server_hostname, http_path=self.http_path, access_token=self.access_token
        )


class DeliveryStateResource(dg.ConfigurableResource):
    """The durable store of ledgers, journals and watermarks (a directory of DuckDB files)."""

    state_dir: str

    def store(self, sync_name: str) -> StateStore:
        return StateStore(self.state_dir, sync_name)


def _partition_suffix(context: dg.OutputContext | dg.InputContext) -> str:
    if context.has_asset_partitions:
        window = context.asset_partition_key_range
        return window.start if window.start == window.end else f"{window.start}__{window.end}"
    return "all"


class DeltaIOManager(dg.ConfigurableIOManager):
    """Stores each `<sync>_delta` manifest as JSON beside its Parquet files.

    Kept per producing run (what the same run's checks and `<sync>_sync_results` load) and per
    partition range (what a later run materializing only the results loads).
    """

    base_dir: str

    def _dir(self, context) -> Path:
        return Path(self.base_dir, *context.asset_key.path)

    def handle_output(self, context: dg.OutputContext, obj: DeltaManifest) -> None:
        text = json.dumps(obj.to_dict())
        for path in (
            self._dir(context) / "runs" / f"{context.run_id}.json",
            self._dir(context) / f"{_partition_suffix(context)}.json",
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def load_input(self, context: dg.InputContext) -> DeltaManifest:
        candidates = [self._dir(context) / "runs" / f"{context.step_context.run_id}.json"]
        if context.has_asset_partitions:
            candidates.append(self._dir(context) / f"{_partition_suffix(context)}.json")
        for path in candidates:
            if path.exists():
                return DeltaManifest(**json.loads(path.read_text()))
        raise FileNotFoundError(
            f"no delta materialized for {context.asset_key.to_user_string()} in this run or for "
            "these partitions; materialize the delta first"
        )


class WatermarkIOManager(dg.ConfigurableIOManager):
    """Commits a sync's watermark once its results are in, and keeps the run history.

    The watermark moves only after Braze accepted or definitively rejected the rows it covers
    (the delivery already wrote each row's outcome to the ledger); a run that dies before this
    point leaves the old watermark, and the ledger keeps the rerun from sending anything twice.
    """

    state_dir: str

    def handle_output(self, context: dg.OutputContext, obj: SyncOutcome) -> None:
        store = StateStore(self.state_dir, obj.sync)
        if obj.watermark_after and obj.watermark_after != obj.watermark_before:
            store.write_watermark(
                Watermark(dt.datetime.fromisoformat(obj.watermark_after), updated_by_run=obj.run_id)
            )
        history = Path(self.state_dir, f"{obj.sync}.runs.jsonl")
        with history.open("a") as handle:
            handle.write(json.dumps(obj.to_dict()) + "\n")

    def load_input(self, context: dg.InputContext) -> SyncOutcome:
        sync = context.asset_key.path[-1].removesuffix("_sync_results")  # the upstream asset
        history = Path(self.state_dir, f"{sync}.runs.jsonl")
        last = history.read_text().strip().splitlines()[-1]
        return SyncOutcome(**json.loads(last))
