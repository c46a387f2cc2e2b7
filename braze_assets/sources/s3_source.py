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
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import hashlib
import io
import itertools
from collections.abc import Generator, Iterable, Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError

from braze_assets.datatypes import DataTypeSpec
from braze_assets.sources.base import CdiSource, SourceError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

UTC = dt.UTC
S3_MAX_FILE_BYTES = 512 * 1024 * 1024  # [CDI-S3] larger files fail and are not synced
S3_MAX_LINE_BYTES = 16 * 1024 * 1024  # a PAYLOAD may be 1 MB at most anyway [A2.2]
FORMATS = {".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_JSON_TYPES = {str: "VARCHAR", dict: "OBJECT", list: "ARRAY", bool: "BOOLEAN", int: "NUMBER", float: "NUMBER"}
Record = tuple[int, "dict[str, Any] | str"]  # (line or row number, the row or a bad line's text)


class S3File(NamedTuple):
    key: str
    size: int
    last_modified: dt.datetime


def file_format(key: str) -> str | None:
    """'json', 'csv' or 'parquet' by extension; None if unsupported."""
    return FORMATS.get(PurePosixPath(key).suffix.lower())


def oversize_reason(file: S3File) -> str:
    limit = S3_MAX_FILE_BYTES
    shown = f"{limit // 2**20} MB" if limit % 2**20 == 0 else f"{limit:,} bytes"
    return f"file {file.key} is {file.size:,} bytes; the limit is {shown}"


def _cell(value: Any) -> str | None:
    """Text as it is; objects, arrays (a Parquet MAP as an object) and numbers as JSON text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        value = dict(value)
    return orjson.dumps(value, default=str).decode()


class _S3Reader(io.RawIOBase):
    """A seekable view of an object: sequential reads share one streaming GET; after a seek the
    next read opens a ranged GET there (Parquet reads its footer, then column chunks)."""

    def __init__(self, client: Any, bucket: str, file: S3File):
        self.client, self.bucket, self.file, self.pos = client, bucket, file, 0
        self._body: Any | None = None  # botocore's StreamingBody of the open GET

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset + (0, self.pos, self.file.size)[whence]
        if target != self.pos:
            self.close_body()
            self.pos = target
        return self.pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        if self.pos >= self.file.size:
            return 0
        with memoryview(buffer) as view:  # BufferedReader hands a memoryview of bytes already
            try:
                if self._body is None:
                    self._body = self.client.get_object(
                        Bucket=self.bucket, Key=self.file.key, Range=f"bytes={self.pos}-"
                    )["Body"]
                data = self._body.read(len(view))
            except (BotoCoreError, ClientError) as exc:
                raise SourceError(f"cannot read s3://{self.bucket}/{self.file.key} ({exc})") from None
            view[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self.close_body()
        super().close()


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
                **self._file_columns(files[-1]),
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
        for file in self._readable(start, end):
            for number, row in self._records(file, batch_rows, set(wanted)):
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
        total = 0
        for file in self._readable(start, end):
            if file_format(file.key) == "parquet":
                with self._parquet(file) as parquet:
                    total += parquet.metadata.num_rows
            else:
                total += sum(1 for _ in self._records(file, 1024))
        return total

    def max_updated_at(self) -> dt.datetime | None:
        """The newest LastModified of a readable file, from the listing (no file is read)."""
        files = self._readable(skip=False)
        return files[-1].last_modified if files else None

    def min_updated_at(self) -> dt.datetime | None:
        files = self._readable(skip=False)
        return files[0].last_modified if files else None

    # ----------------------------------------------------------------- reading files
    def _open(self, file: S3File) -> io.BufferedReader:
        return io.BufferedReader(_S3Reader(self.client, self.bucket, file), self.buffer_bytes)

    @contextlib.contextmanager
    def _parquet(self, file: S3File) -> Iterator[pq.ParquetFile]:
        with self._open(file) as handle:
            try:  # pre-buffering would fetch every row group before the first batch
                parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=self.buffer_bytes)
            except (pa.ArrowException, OSError) as exc:
                raise SourceError(f"{self.description}: {file.key} is not Parquet ({exc})") from None
            yield parquet

    def _lines(self, file: S3File) -> Generator[tuple[int, str, bool]]:
        """(1-based number, text, ok); not ok: not UTF-8 (text has U+FFFD) or over
        S3_MAX_LINE_BYTES (text is a notice, the rest of the line is skipped)."""
        with self._open(file) as stream:
            for number in itertools.count(1):
                if not (line := stream.readline(S3_MAX_LINE_BYTES)):
                    return
                text, ok = f"line is longer than {S3_MAX_LINE_BYTES:,} bytes\n", False
                if len(line) == S3_MAX_LINE_BYTES and not line.endswith(b"\n"):
                    while (rest := stream.readline(S3_MAX_LINE_BYTES)) and rest[-1:] != b"\n":
                        pass
                else:
                    try:
                        text, ok = line.decode("utf-8-sig" if number == 1 else "utf-8"), True
                    except UnicodeDecodeError:
                        text = line.decode("utf-8", "replace")
                yield number, text, ok

    def _refuse_payload(self, file: S3File, names: Iterable[str], where: str = "") -> None:
        if self._forbid_payload and "PAYLOAD" in {n.upper() for n in names}:
            raise SourceError(
                f"{self.description}: {file.key}{where} has a payload column; a "
                "deletion sync refuses it as a guard against deleting users by mistake"
            )

    def _records(self, file: S3File, batch_rows: int, wanted: set[str] | None = None) -> Iterator[Record]:
        """(number, row with upper-cased keys) per record, or (number, text) for a bad one."""
        kind = file_format(file.key)
        if kind == "csv":
            yield from self._csv_records(file)
        elif kind == "parquet":
            with self._parquet(file) as parquet:
                names = parquet.schema_arrow.names
                self._refuse_payload(file, names)
                read = [n for n in names if wanted is None or n.upper() in wanted] or None
                batches = parquet.iter_batches(batch_rows, columns=read, use_threads=False)  # in file order
                for number, row in enumerate((r for b in batches for r in b.to_pylist()), 1):
                    yield number, {k.upper(): _cell(v) for k, v in row.items()}
        else:
            for number, text, ok in self._lines(file):
                try:
                    value = orjson.loads(text) if ok and text.strip() else None
                except orjson.JSONDecodeError:
                    value = None
                if isinstance(value, dict):
                    self._refuse_payload(file, value, f" line {number}")
                    yield number, {k.upper(): _cell(v) for k, v in value.items()}
                elif not ok or text.strip():  # a blank line is no record
                    yield number, text.rstrip("\r\n")

    def _csv_records(self, file: S3File) -> Iterator[Record]:
        csv.field_size_limit(max(csv.field_size_limit(), S3_MAX_LINE_BYTES))
        seen = {"line": 0, "bad": 0}  # the last line given to the reader, the last bad one

        def text() -> Iterator[str]:
            for number, line, ok in self._lines(file):
                seen["line"], seen["bad"] = number, seen["bad"] if ok else number
                yield line

        reader, header, start = csv.reader(text()), None, 1
        while True:
            try:
                values = next(reader)
                problem = "" if seen["bad"] < start else "line is not UTF-8 or is too long"
            except StopIteration:
                return
            except csv.Error as exc:
                values, problem = [], f"CSV error: {exc}"
            if header is None:
                if problem:
                    yield start, f"CSV header unreadable ({problem}); the file was not read"
                    return
                header = [h.strip().upper() for h in values]
                self._refuse_payload(file, header)
            elif problem or (values and len(values) != len(header)):
                yield start, ",".join(values) or problem
            elif values:  # a blank line is no record; an empty cell is NULL
                yield start, {h: v or None for h, v in zip(header, values, strict=False)}
            start = seen["line"] + 1

    def _file_columns(self, file: S3File) -> dict[str, str]:
        kind = file_format(file.key)
        found: dict[str, str] = {}
        if kind == "parquet":
            with self._parquet(file) as parquet:
                schema = parquet.schema_arrow
                return {n.upper(): str(t) for n, t in zip(schema.names, schema.types, strict=True)}
        with contextlib.closing(self._lines(file)) as lines:
            if kind == "csv":
                header = next(csv.reader(text for _, text, _ in lines), [])
                return {h.strip().upper(): "VARCHAR" for h in header}
            for _, text, _ in itertools.islice(lines, self.sample_lines):  # union over a sample
                try:
                    row = orjson.loads(text)
                except orjson.JSONDecodeError:
                    continue
                for key, value in row.items() if isinstance(row, dict) else ():
                    if found.get(key.upper(), "NULL") == "NULL":
                        found[key.upper()] = _JSON_TYPES.get(type(value), "NULL")
        return found
