"""Files in Amazon S3 as a CDI source (contract §A3 [CDI-S3]).

CDI reads JSON-lines, CSV and Parquet files under a folder (prefix): identifier columns plus a `payload`
JSON string per row, no `UPDATED_AT` ("neither required nor supported"), 512 MB per file at most. So that
the window, watermark and ledger work unchanged, each row gets `UPDATED_AT` = its object's LastModified
(UTC): `scan(start, end)` reads the files modified in [start, end), oldest first, ties by key (keys
nested under the prefix are inside it). Better than CDI, which skips a whole JSON file for one bad line:

* a line that is not a JSON object, a CSV record that does not fit the header, or a line that is not
  UTF-8 is one row with the raw text as PAYLOAD and no identifiers: validation rejects that line alone.
  Every row has `_FILE` (key) and `_LINE` (1-based first line of the record in JSON/CSV, row number in
  Parquet) so reasons can say where it came from;
* files over `S3_MAX_FILE_BYTES` are not read but listed by `oversized_files()`, and unknown extensions
  by `unsupported_files()`, for the caller to report;
* after `check_shape` for a deletion sync, *any* file or JSON line with a payload fails the scan, not
  just the sampled file [CDI-S3][CDI-DEL].

Memory is bounded: batches of at most `batch_rows` rows; JSON/CSV stream line by line from one GET
(lines over `S3_MAX_LINE_BYTES` become bad rows); Parquet by ranged GETs, a row group at a time.
This module lists the folder and answers as a CDI table; reading one file's format into records is
`s3_files.py`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from botocore.exceptions import BotoCoreError, ClientError

from braze_assets.datatypes import DataTypeSpec
from braze_assets.sources.base import CdiSource, SourceError
from braze_assets.sources.s3_files import FORMATS, Record, S3File, S3FileReader, file_format

UTC = dt.UTC
S3_MAX_FILE_BYTES = 512 * 1024 * 1024  # [CDI-S3] larger files fail and are not synced
S3_MAX_LINE_BYTES = 16 * 1024 * 1024  # a PAYLOAD may be 1 MB at most anyway [A2.2]

#: Reading one file (formats, bad records, streaming) lives in `s3_files.py`; its names are importable
#: from here too, where they were first.
__all__ = [
    "FORMATS",
    "S3_MAX_FILE_BYTES",
    "S3_MAX_LINE_BYTES",
    "Record",
    "S3File",
    "S3Source",
    "file_format",
    "oversize_reason",
]


def oversize_reason(file: S3File) -> str:
    limit = S3_MAX_FILE_BYTES
    shown = f"{limit // 2**20} MB" if limit % 2**20 == 0 else f"{limit:,} bytes"
    return f"file {file.key} is {file.size:,} bytes; the limit is {shown}"


class S3Source(CdiSource):
    """The supported files under `s3://bucket/prefix` as one CDI table (see the module doc)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        skip_keys: set[str] | None = None,
        sample_key: str | None = None,
        sample_lines: int = 1000,
        buffer_bytes: int = 1 << 20,
    ):
        """`client`: a boto3 S3 client. `skip_keys`: files known to be fully settled, never read.
        `sample_key`: the file `columns()` reads (default: the newest readable one)."""
        self.client, self.bucket = client, bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.description = f"s3://{bucket}/{self.prefix}"
        self.skip_keys = set(skip_keys or ())
        self.sample_key, self.sample_lines, self.buffer_bytes = sample_key, sample_lines, buffer_bytes
        self._listing: list[S3File] | None = None
        self._types: dict[str, str] | None = None
        self._forbid_payload = False

    @classmethod
    def from_resource(cls, resource: Any, bucket: str, prefix: str, **kwargs: Any) -> S3Source:
        """From a `dagster_aws.s3.S3Resource`, whose `get_client()` is a boto3 S3 client."""
        return cls(resource.get_client(), bucket, prefix, **kwargs)

    # ----------------------------------------------------------------- the listing
    def list_files(self, start: dt.datetime | None = None, end: dt.datetime | None = None) -> list[S3File]:
        """Every object under the prefix with start <= LastModified < end, oldest first. The prefix is
        listed once per instance (so count, scan and max agree): make one per run or sensor tick."""
        if self._listing is None:
            files = []
            try:
                for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix
                ):
                    files += [
                        S3File(o["Key"], o["Size"], o["LastModified"].astimezone(UTC))
                        for o in page.get("Contents", [])
                        if not o["Key"].endswith("/")
                    ]
            except (BotoCoreError, ClientError) as exc:
                raise SourceError(f"{self.description}: cannot list files ({exc})") from None
            self._listing = sorted(files, key=lambda f: (f.last_modified, f.key))
        return [
            f
            for f in self._listing
            if (start is None or f.last_modified >= start) and (end is None or f.last_modified < end)
        ]

    def oversized_files(
        self, start: dt.datetime | None = None, end: dt.datetime | None = None
    ) -> list[S3File]:
        """Supported files over the 512 MB limit [CDI-S3], never read: see `oversize_reason`."""
        return [f for f in self.list_files(start, end) if file_format(f.key) and f.size > S3_MAX_FILE_BYTES]

    def unsupported_files(
        self, start: dt.datetime | None = None, end: dt.datetime | None = None
    ) -> list[S3File]:
        """Files that are not JSON lines, CSV or Parquet by extension, never read."""
        return [f for f in self.list_files(start, end) if not file_format(f.key)]

    def _readable(
        self, start: dt.datetime | None = None, end: dt.datetime | None = None, skip: bool = True
    ) -> list[S3File]:
        return [
            f
            for f in self.list_files(start, end)
            if file_format(f.key) and f.size <= S3_MAX_FILE_BYTES and not (skip and f.key in self.skip_keys)
        ]

    # ----------------------------------------------------------------- CdiSource
    def columns(self) -> dict[str, str]:
        """The sampled file's columns (upper-cased) and types, plus UPDATED_AT, _FILE, _LINE."""
        if self._types is None:
            files = [f for f in self._readable(skip=False) if f.key == (self.sample_key or f.key)]
            if not files:
                raise SourceError(
                    f"{self.description} has no readable JSON-lines, CSV or Parquet "
                    "file (of at most 512 MB) to read columns from"
                )
            self._types = {
                **self._reader().columns(files[-1], self.sample_lines),
                "UPDATED_AT": "TIMESTAMP WITH TIME ZONE (S3 LastModified)",
                "_FILE": "VARCHAR",
                "_LINE": "BIGINT",
            }
        return self._types

    def check_shape(self, spec: DataTypeSpec) -> list[str]:
        """As for a table; for a deletion sync `scan` then refuses any file with a payload too."""
        self._forbid_payload = not spec.has_payload
        return super().check_shape(spec)

    def scan(
        self,
        start: dt.datetime | None,
        end: dt.datetime | None,
        include_null_updated_at: bool,
        batch_rows: int,
        columns: list[str] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """`columns` (default all) of the files modified in [start, end), plus `_FILE` and `_LINE`
        always: text, except UPDATED_AT (timestamp[us, UTC], never NULL) and _LINE (int64)."""
        wanted = [c for c in (columns or self.columns()) if c not in ("_FILE", "_LINE")]
        types = {"UPDATED_AT": pa.timestamp("us", tz="UTC"), "_LINE": pa.int64()}
        schema = pa.schema([(c, types.get(c, pa.string())) for c in [*wanted, "_FILE", "_LINE"]])
        rows: list[dict[str, Any]] = []
        reader = self._reader()
        for file in self._readable(start, end):
            for number, row in reader.records(file, batch_rows, set(wanted)):
                row = {"PAYLOAD": row} if isinstance(row, str) else row  # bad: no identifiers
                rows.append({**row, "UPDATED_AT": file.last_modified, "_FILE": file.key, "_LINE": number})
                if len(rows) >= batch_rows:
                    yield pa.RecordBatch.from_pylist(rows, schema=schema)
                    rows = []
        if rows:
            yield pa.RecordBatch.from_pylist(rows, schema=schema)

    cheap_counts = False

    def fingerprint(self) -> dict:
        """From the listing alone (no file is read): newest LastModified and a digest of it."""
        files = self.list_files()
        digest = hashlib.sha256(
            "\n".join(f"{f.key}|{f.size}|{f.last_modified.isoformat()}" for f in files).encode()
        ).hexdigest()[:16]
        return {
            "newest": files[-1].last_modified.isoformat() if files else None,
            "files": len(files),
            "digest": digest,
        }

    @staticmethod
    def _signature(file: S3File) -> str:
        return f"{file.size}|{file.last_modified.isoformat()}"

    def parts(self, start: dt.datetime | None = None, end: dt.datetime | None = None) -> dict[str, str]:
        return {f.key: self._signature(f) for f in self._readable(start, end)}

    def skip_parts(self, settled: dict[str, str]) -> int:
        """Files whose every row was settled, unchanged since (an overwritten file is read again,
        as CDI re-processes a re-uploaded file)."""
        self.skip_keys = {f.key for f in self.list_files() if settled.get(f.key) == self._signature(f)}
        return len(self.skip_keys)

    def unreadable(self, start: dt.datetime | None = None, end: dt.datetime | None = None) -> list[str]:
        return [oversize_reason(f) for f in self.oversized_files(start, end)] + [
            f"file {f.key} is not JSON lines, CSV or Parquet (by its extension)"
            for f in self.unsupported_files(start, end)
        ]

    def count(self, start: dt.datetime | None = None, end: dt.datetime | None = None) -> int:
        """Rows `scan` gives for [start, end). Unlike a warehouse this READS the files in the window
        (Parquet: its footer only), so keep the window narrow."""
        total, reader = 0, self._reader()
        for file in self._readable(start, end):
            if file_format(file.key) == "parquet":
                with reader.parquet(file) as parquet:
                    total += parquet.metadata.num_rows
            else:
                total += sum(1 for _ in reader.records(file, 1024))
        return total

    def max_updated_at(self) -> dt.datetime | None:
        """The newest LastModified of a readable file, from the listing (no file is read)."""
        files = self._readable(skip=False)
        return files[-1].last_modified if files else None

    def min_updated_at(self) -> dt.datetime | None:
        files = self._readable(skip=False)
        return files[0].last_modified if files else None

    # ----------------------------------------------------------------- reading files
    def _reader(self) -> S3FileReader:
        """What reads this source's files, with its settings as they are now (and the line limit as
        this module has it, so a test can lower it here)."""
        return S3FileReader(
            self.client,
            self.bucket,
            self.description,
            buffer_bytes=self.buffer_bytes,
            max_line_bytes=S3_MAX_LINE_BYTES,
            forbid_payload=self._forbid_payload,
        )
