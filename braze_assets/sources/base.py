"""The interface every warehouse adapter implements.

The delta is computed in the warehouse: adapters push the `UPDATED_AT` window down as bound
parameters and stream Arrow record batches back, never a full-table pull.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Iterator

import pyarrow as pa

from braze_assets.datatypes import IDENTIFIER_COLUMNS, DataTypeSpec


class SourceError(RuntimeError):
    """A global (sync-level) source error: connection, permissions, missing table or column."""


class CdiSource(abc.ABC):
    """A CDI-shaped table: `UPDATED_AT`, identifier columns, and (except deletions) `PAYLOAD`."""

    #: e.g. "duckdb table main.braze_events": used in every error message
    description: str
    #: whether counting rows in a window is a cheap pushdown (false for files, which must be read)
    cheap_counts: bool = True

    @abc.abstractmethod
    def columns(self) -> dict[str, str]:
        """Upper-cased column name -> warehouse type; raises SourceError if the table is missing."""

    @abc.abstractmethod
    def scan(
        self,
        start: dt.datetime | None,
        end: dt.datetime | None,
        include_null_updated_at: bool,
        batch_rows: int,
        columns: list[str] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Rows with start <= UPDATED_AT < end (UTC; either bound optional), streamed in Arrow
        batches: `columns` (upper-case names, default all) with UPDATED_AT as timestamp[us, UTC],
        plus the rows whose UPDATED_AT is NULL when asked."""

    @abc.abstractmethod
    def count(self, start: dt.datetime | None = None, end: dt.datetime | None = None) -> int:
        """Rows with start <= UPDATED_AT < end (either bound optional)."""

    @abc.abstractmethod
    def max_updated_at(self) -> dt.datetime | None:
        """The newest UPDATED_AT in the table (UTC), None when empty."""

    @abc.abstractmethod
    def min_updated_at(self) -> dt.datetime | None:
        """The oldest UPDATED_AT in the table (UTC), None when empty."""

    def fingerprint(self) -> dict:
        """A cheap summary that changes when rows are added or changed (sensors compare it)."""
        newest = self.max_updated_at()
        return {"newest": newest.isoformat() if newest else None, "rows": self.count()}

    def parts(self, start: dt.datetime | None, end: dt.datetime | None) -> dict[str, str]:
        """Independently settled pieces in the window with a version signature (files: key ->
        size|LastModified). Tables have none."""
        return {}

    def skip_parts(self, settled: dict[str, str]) -> int:
        """Do not read parts already settled at the same version; returns how many are skipped."""
        return 0

    def unreadable(self, start: dt.datetime | None, end: dt.datetime | None) -> list[str]:
        """Reasons why parts of the source in the window cannot be read (files only)."""
        return []

    def preview(self, rows: int = 10) -> pa.Table:
        """The first rows of the table (test connection)."""
        for batch in self.scan(None, None, True, rows):
            return pa.Table.from_batches([batch]).slice(0, rows)
        return pa.table({})

    def check_shape(self, spec: DataTypeSpec) -> list[str]:
        """Validate the table against the data type; return the columns to read."""
        columns = self.columns()
        missing = [c for c in spec.required_columns if c not in columns]
        if missing:
            raise SourceError(
                f"{self.description} lacks required column(s) {', '.join(missing)} for a {spec.name} sync"
            )
        stamp = columns.get("UPDATED_AT", "")
        if not any(word in stamp.upper() for word in ("TIME", "DATE")):
            # compared with the window's instants, any other type fails every run in the query
            raise SourceError(
                f"{self.description}: UPDATED_AT is {stamp or 'of an unknown type'}; it must be a "
                "timestamp column (as CDI requires), with or without a time zone"
            )
        if spec.name == "catalogs":  # items: ID, not user identifiers
            return ["UPDATED_AT", "ID", "PAYLOAD", *(["DELETED"] if "DELETED" in columns else [])]
        if not spec.has_payload and "PAYLOAD" in columns:
            raise SourceError(
                f"{self.description} has a PAYLOAD column; a deletion sync refuses such a table "
                "as a guard against deleting users by mistake (as Braze CDI does)"
            )
        identifiers = [c for c in IDENTIFIER_COLUMNS if c in columns]
        if not identifiers:
            raise SourceError(
                f"{self.description} has no identifier column (EXTERNAL_ID, ALIAS_NAME+ALIAS_LABEL, "
                "BRAZE_ID, EMAIL or PHONE)"
            )
        return ["UPDATED_AT", *identifiers, *(["PAYLOAD"] if spec.has_payload else [])]
