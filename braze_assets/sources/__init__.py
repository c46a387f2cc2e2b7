"""Warehouse adapters behind one small interface (see `base.CdiSource`)."""

from braze_assets.sources.base import CdiSource, SourceError
from braze_assets.sources.duckdb_source import DuckDBSource

__all__ = ["CdiSource", "DuckDBSource", "SourceError"]
