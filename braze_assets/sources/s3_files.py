"""One file in S3 read as CDI records: JSON lines, CSV or Parquet, streamed, bad records kept as text.

Its own module because reading a file's format is a different job from presenting a folder as a CDI
table: `s3_source.S3Source` lists the prefix, picks the files of a window and turns records into
Arrow batches with `UPDATED_AT`, `_FILE` and `_LINE`; this module only knows how one file's bytes
become records. A record is `(number, row)` with upper-cased keys, or `(number, text)` for a line or
CSV record that is not a row (not a JSON object, not UTF-8, too long, not fitting the header), so
validation rejects that record alone. Parquet is read by ranged GETs a row group at a time; JSON
lines and CSV line by line from one GET, so memory stays bounded whatever the file's size.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import itertools
from collections.abc import Generator, Iterable, Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError

from braze_assets.sources.base import SourceError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

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


class S3FileReader:
    """Reads the files of one bucket as records, with the settings of the source that lists them."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        description: str,
        *,
        buffer_bytes: int,
        max_line_bytes: int,
        forbid_payload: bool = False,
    ):
        """`description` names the source in errors. `max_line_bytes`: a longer line is one bad record
        and is never held whole. `forbid_payload`: a deletion sync's guard, any payload column fails."""
        self.client, self.bucket, self.description = client, bucket, description
        self.buffer_bytes, self.max_line_bytes = buffer_bytes, max_line_bytes
        self.forbid_payload = forbid_payload

    def open(self, file: S3File) -> io.BufferedReader:
        return io.BufferedReader(_S3Reader(self.client, self.bucket, file), self.buffer_bytes)

    @contextlib.contextmanager
    def parquet(self, file: S3File) -> Iterator[pq.ParquetFile]:
        with self.open(file) as handle:
            try:  # pre-buffering would fetch every row group before the first batch
                parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=self.buffer_bytes)
            except (pa.ArrowException, OSError) as exc:
                raise SourceError(f"{self.description}: {file.key} is not Parquet ({exc})") from None
            yield parquet

    def lines(self, file: S3File) -> Generator[tuple[int, str, bool]]:
        """(1-based number, text, ok); not ok: not UTF-8 (text has U+FFFD) or over
        `max_line_bytes` (text is a notice, the rest of the line is skipped)."""
        limit = self.max_line_bytes
        with self.open(file) as stream:
            for number in itertools.count(1):
                if not (line := stream.readline(limit)):
                    return
                text, ok = f"line is longer than {limit:,} bytes\n", False
                if len(line) == limit and not line.endswith(b"\n"):
                    while (rest := stream.readline(limit)) and rest[-1:] != b"\n":
                        pass
                else:
                    try:
                        text, ok = line.decode("utf-8-sig" if number == 1 else "utf-8"), True
                    except UnicodeDecodeError:
                        text = line.decode("utf-8", "replace")
                yield number, text, ok

    def _refuse_payload(self, file: S3File, names: Iterable[str], where: str = "") -> None:
        if self.forbid_payload and "PAYLOAD" in {n.upper() for n in names}:
            raise SourceError(
                f"{self.description}: {file.key}{where} has a payload column; a "
                "deletion sync refuses it as a guard against deleting users by mistake"
            )

    def records(self, file: S3File, batch_rows: int, wanted: set[str] | None = None) -> Iterator[Record]:
        """(number, row with upper-cased keys) per record, or (number, text) for a bad one."""
        kind = file_format(file.key)
        if kind == "csv":
            yield from self._csv_records(file)
        elif kind == "parquet":
            with self.parquet(file) as parquet:
                names = parquet.schema_arrow.names
                self._refuse_payload(file, names)
                read = [n for n in names if wanted is None or n.upper() in wanted] or None
                batches = parquet.iter_batches(batch_rows, columns=read, use_threads=False)  # in file order
                for number, row in enumerate((r for b in batches for r in b.to_pylist()), 1):
                    yield number, {k.upper(): _cell(v) for k, v in row.items()}
        else:
            for number, text, ok in self.lines(file):
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
        csv.field_size_limit(max(csv.field_size_limit(), self.max_line_bytes))
        seen = {"line": 0, "bad": 0}  # the last line given to the reader, the last bad one

        def text() -> Iterator[str]:
            for number, line, ok in self.lines(file):
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

    def columns(self, file: S3File, sample_lines: int) -> dict[str, str]:
        """The file's columns (upper-cased) and types: Parquet's schema, a CSV header (all text), or
        for JSON lines the union over the first `sample_lines` lines."""
        kind = file_format(file.key)
        found: dict[str, str] = {}
        if kind == "parquet":
            with self.parquet(file) as parquet:
                schema = parquet.schema_arrow
                return {n.upper(): str(t) for n, t in zip(schema.names, schema.types, strict=True)}
        with contextlib.closing(self.lines(file)) as lines:
            if kind == "csv":
                header = next(csv.reader(text for _, text, _ in lines), [])
                return {h.strip().upper(): "VARCHAR" for h in header}
            for _, text, _ in itertools.islice(lines, sample_lines):  # union over a sample
                try:
                    row = orjson.loads(text)
                except orjson.JSONDecodeError:
                    continue
                for key, value in row.items() if isinstance(row, dict) else ():
                    if found.get(key.upper(), "NULL") == "NULL":
                        found[key.upper()] = _JSON_TYPES.get(type(value), "NULL")
        return found
