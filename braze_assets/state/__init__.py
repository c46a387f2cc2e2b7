"""Delivery state: one interface (`StateStore`, base.py), an embedded backend (DuckDB and files,
the default) and a PostgreSQL backend (`BRAZE_ASSETS_STATE_URL`), chosen by `open_state_store`."""

from __future__ import annotations

from pathlib import Path

from braze_assets.delta_files import DeltaFiles, delta_root
from braze_assets.state.base import LedgerSession, StateStore, SyncBusyError, Watermark
from braze_assets.state.embedded import EmbeddedStateStore
from braze_assets.state.held import alias_key, held_detail
from braze_assets.state.postgres_schema import STATE_URL_ENV, state_url_from_environment

__all__ = [
    "STATE_URL_ENV",
    "EmbeddedStateStore",
    "LedgerSession",
    "StateStore",
    "SyncBusyError",
    "Watermark",
    "alias_key",
    "held_detail",
    "open_state_store",
    "state_url_from_environment",
]


def open_state_store(
    state_dir: str | Path, sync: str, *, state_url: str | None = None, deltas: DeltaFiles | None = None
) -> StateStore:
    """The state of `sync`: in PostgreSQL when a state URL is given, else under `state_dir`. Its
    delta files are on shared storage when BRAZE_ASSETS_DELTA_URL is set, else beside the state."""
    deltas = deltas or DeltaFiles(delta_root(state_dir), sync)
    if state_url:
        from braze_assets.state.postgres import PostgresStateStore

        return PostgresStateStore(state_url, sync, deltas=deltas)
    return EmbeddedStateStore(state_dir, sync, deltas=deltas)
