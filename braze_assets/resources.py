"""Dagster resources and IO managers: Braze, the delivery state, and where deltas and watermarks live."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, field_validator

from braze_assets import delta_store
from braze_assets.braze.budget_stores import budget_store_from_environment
from braze_assets.braze.client import BrazeClient
from braze_assets.delta import DeltaManifest
from braze_assets.state import STATE_URL_ENV, StateStore, open_state_store, state_url_from_environment
from braze_assets.sync_outcome import SyncOutcome


def home_dir() -> Path:
    """Where local state lives: $BRAZE_ASSETS_HOME, else ./.braze_assets."""
    return Path(os.environ.get("BRAZE_ASSETS_HOME") or ".braze_assets").resolve()


def manifest_root(home: str | Path) -> str:
    """Where delta manifests live: `<BRAZE_ASSETS_DELTA_URL>/manifests` when the setting is set,
    beside the delta files, else `<home>/deltas` (the local layout)."""
    url = delta_store.delta_url()
    return delta_store.join(url, "manifests") if url else str(Path(home) / "deltas")


#: Sets `BrazeResource.max_rate_share` for the definitions and commands built from the environment.
MAX_RATE_SHARE_ENV = "BRAZE_MAX_RATE_SHARE"


def rate_share_from_environment() -> dict[str, Any]:
    """`max_rate_share` from $BRAZE_MAX_RATE_SHARE when it is set. Checked here, not only by
    BrazeResource: the resource's own error names its field, never the variable to fix, and
    comes as a traceback; a `ConfigError` is one line that `braze-assets` prints as such."""
    from braze_assets.config import ConfigError

    value = os.environ.get(MAX_RATE_SHARE_ENV, "").strip()
    if not value:
        return {}
    try:
        share = float(value)
    except ValueError:
        share = float("nan")
    if not 0 < share <= 1:  # nan and inf fail too
        raise ConfigError(
            f"{MAX_RATE_SHARE_ENV} must be a number above 0 and at most 1 (the share of Braze's rate "
            f"limit the syncs may use), got {value!r}"
        )
    return {"max_rate_share": share}


class BrazeResource(dg.ConfigurableResource):
    """The Braze REST API of one workspace. The key comes from an environment variable
    (`dg.EnvVar("BRAZE_API_KEY")`) and is never logged or shown.

    Every client shares one request budget per workspace and endpoint with every other process
    and pod using the same endpoint and key (`braze/budget.py`), kept in files under `state_dir`
    or, when `BRAZE_ASSETS_STATE_URL` is set, in PostgreSQL.
    """

    rest_endpoint: str = Field(description="e.g. https://rest.iad-01.braze.com, or the emulator")
    api_key: str = Field(description="REST API key with users.track and users.delete")
    allow_custom_host: bool = Field(default=False, description="Allow a non-Braze HTTPS host")
    timeout_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=20)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    state_dir: str | None = Field(
        default=None,
        description="The shared rate budget's files go in <state_dir>/budgets (default "
        "$BRAZE_ASSETS_HOME/state); unused when BRAZE_ASSETS_STATE_URL is set",
    )
    max_rate_share: float = Field(
        default=0.8,
        description=(
            "Share of Braze's announced rate limit (X-RateLimit-Limit per window) that all syncs "
            "together may use, 0 < share <= 1. The default 0.8 leaves a fifth of the workspace's "
            "limit to your own backend's API calls; 1.0 when nothing else uses the key's workspace."
        ),
    )

    @field_validator("max_rate_share")
    @classmethod
    def _share_of_the_limit(cls, share: float) -> float:
        """The limit is shared with the customer's own backend, which Braze will not tell apart:
        0.8 by default (not 1.0) because a sync is batch work that can wait a little, while the
        customer's own calls are often live (a sign-up, a purchase) and a 429 there is a
        user-facing failure. A workspace that only syncs use can set 1.0."""
        if not 0 < share <= 1:
            raise ValueError(
                f"max_rate_share must be above 0 and at most 1 (the share of Braze's rate limit the "
                f"syncs may use), got {share!r}"
            )
        return share

    def announced_rate_per_s(self, path: str) -> float | None:
        """Requests per second Braze last announced for this workspace's `path` budget
        (X-RateLimit-Limit over the window the syncs measured), None before any sync sent."""
        from braze_assets.braze.budget import BudgetStoreError, workspace_id
        from braze_assets.braze.client import check_endpoint

        state_dir = Path(self.state_dir) if self.state_dir else home_dir() / "state"
        store = budget_store_from_environment(state_dir)
        endpoint = check_endpoint(self.rest_endpoint, self.allow_custom_host)
        try:
            state = store.peek(workspace_id(endpoint, self.api_key), path)
        except BudgetStoreError:  # the budget is unreadable: the bill falls back to the documented rate
            return None
        if state is None or not state.limit or not state.window_s:
            return None
        return state.limit / state.window_s

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
            budget_store=budget_store_from_environment(
                Path(self.state_dir) if self.state_dir else home_dir() / "state"
            ),
            max_rate_share=self.max_rate_share,
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
    """Where each sync's delivery state lives: ledger, journal, watermark, locks, held rows and run
    history (`state/`). In PostgreSQL when `state_url` is set (production: runs in fresh pods),
    else in DuckDB files under `state_dir` (the embedded default)."""

    state_dir: str = Field(description="The embedded backend's directory (and local delta files)")
    state_url: str | None = Field(
        default=None,
        description="postgresql://user@host:port/db[?schema=name]; from BRAZE_ASSETS_STATE_URL",
    )

    def store(self, sync_name: str) -> StateStore:
        return open_state_store(self.state_dir, sync_name, state_url=self.state_url)


def delivery_state_from_environment(state_dir: str, *, in_definitions: bool = True) -> DeliveryStateResource:
    """The delivery state as the environment chooses it (`BRAZE_ASSETS_STATE_URL`). In
    Definitions the URL stays a `dg.EnvVar`, resolved when a run starts and never shown in the UI
    (it may hold a password); a command using the resource directly gets the value."""
    url = state_url_from_environment()
    if url and in_definitions:
        return DeliveryStateResource(state_dir=state_dir, state_url=dg.EnvVar(STATE_URL_ENV))
    return DeliveryStateResource(state_dir=state_dir, state_url=url)


def _partition_suffix(context: dg.OutputContext | dg.InputContext) -> str:
    if context.has_asset_partitions:
        window = context.asset_partition_key_range
        return window.start if window.start == window.end else f"{window.start}__{window.end}"
    return "all"


class DeltaIOManager(dg.ConfigurableIOManager):
    """Stores each `<sync>_delta` manifest as JSON beside its Parquet files, under `base_dir` (a
    local directory, or a URI on an object store: see `manifest_root`).

    Kept per producing run (what the same run's checks and `<sync>_sync_results` load) and per
    partition range (what a later run materializing only the results loads, in whichever pod).
    Each is written whole, so a reader finds a complete manifest or none.
    """

    base_dir: str

    def _dir(self, context: dg.OutputContext | dg.InputContext) -> str:
        return delta_store.join(self.base_dir, *context.asset_key.path)

    def handle_output(self, context: dg.OutputContext, obj: DeltaManifest) -> None:
        text = json.dumps(obj.to_dict())
        for uri in (
            delta_store.join(self._dir(context), "runs", f"{context.run_id}.json"),
            delta_store.join(self._dir(context), f"{_partition_suffix(context)}.json"),
        ):
            delta_store.write_text(uri, text)

    def load_input(self, context: dg.InputContext) -> DeltaManifest:
        candidates = [delta_store.join(self._dir(context), "runs", f"{context.step_context.run_id}.json")]
        if context.has_asset_partitions:
            candidates.append(delta_store.join(self._dir(context), f"{_partition_suffix(context)}.json"))
        for uri in candidates:
            text = delta_store.read_text(uri)
            if text is not None:
                return DeltaManifest(**json.loads(text))
        raise FileNotFoundError(
            f"no delta materialized for {context.asset_key.to_user_string()} in this run or for "
            "these partitions; materialize the delta first"
        )


class WatermarkIOManager(dg.ConfigurableIOManager):
    """Commits a sync's watermark once its results are in, and keeps the run history.

    The watermark moves only after Braze accepted or definitively rejected the rows it covers
    (the delivery already wrote each row's outcome to the ledger); a run that dies before this
    point leaves the old watermark, and the ledger keeps the rerun from sending anything twice.
    The commit itself is `StateStore.commit_watermark`, the one place a run moves it.
    """

    state_dir: str
    state_url: str | None = None

    def _store(self, sync: str) -> StateStore:
        return open_state_store(self.state_dir, sync, state_url=self.state_url)

    def handle_output(self, context: dg.OutputContext, obj: SyncOutcome) -> None:
        store = self._store(obj.sync)
        before = dt.datetime.fromisoformat(obj.watermark_before) if obj.watermark_before else None
        after = dt.datetime.fromisoformat(obj.watermark_after) if obj.watermark_after else None
        committed, why = store.commit_watermark(before, after, obj.run_id)
        if why:
            context.log.warning(f"{obj.sync}: watermark {why}")
            obj.watermark_after = committed.value.isoformat() if committed.value else None
        store.log.record_run(obj.to_dict())

    def load_input(self, context: dg.InputContext) -> SyncOutcome:
        sync = context.asset_key.path[-1].removesuffix("_sync_results")  # the upstream asset
        last = self._store(sync).log.last_run()
        if last is None:
            raise FileNotFoundError(f"{sync} has no recorded run yet; materialize its results first")
        return SyncOutcome(**last)
