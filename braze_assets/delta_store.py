"""The storage a sync's delta files and manifests live on: a local directory, or the object store
named by `BRAZE_ASSETS_DELTA_URL` (`s3://bucket/prefix`, `gs://bucket/prefix`, a path or
`file:///path`).

Run pods start with an empty disk, so a delta written by one step must be readable by the next
step and by a later run in another pod: with the setting, every delta goes to shared storage.
Unset, deltas stay under `BRAZE_ASSETS_HOME` exactly as they always have.

Files are opened through pyarrow's own filesystems (`pyarrow.fs`), not fsspec: fsspec's S3
(s3fs) needs aiobotocore, whose every release pins botocore to a narrow range, and none of those
ranges admits the botocore the lock holds for boto3 (which dagster-aws and the S3 source use).
pyarrow is already a dependency and ships S3 and GCS filesystems of its own. S3 takes its
endpoint from `S3_ENDPOINT_URL` (the S3 source's setting) or `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`, its region from `AWS_REGION` / `AWS_DEFAULT_REGION` (else the bucket's own),
and its credentials from the default AWS chain.

A location is a plain string throughout: a local path, or a URI. Failures on an object store are
`DeltaStoreError`s that name the setting and the location (never credentials).
"""

from __future__ import annotations

import functools
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

DELTA_URL_ENV = "BRAZE_ASSETS_DELTA_URL"
#: Object stores, by URI scheme; any other scheme is refused when the setting is read.
REMOTE_SCHEMES = ("s3", "gs", "gcs")
#: Upload in pieces of this size, so memory stays flat whatever the size of the file.
COPY_BYTES = 8 * 1024 * 1024


class DeltaStoreError(OSError):
    """The delta store is misconfigured or cannot be reached; the message names the setting.

    An `OSError`, so readers that skip a file they cannot open (a run's files being pruned) treat
    it like any other unreadable file."""


def delta_url() -> str | None:
    """`BRAZE_ASSETS_DELTA_URL` without a trailing `/`, checked, or None when unset."""
    url = os.environ.get(DELTA_URL_ENV, "").strip().rstrip("/")
    if not url:
        return None
    scheme = _scheme(url)
    if scheme not in (*REMOTE_SCHEMES, "file", ""):
        raise DeltaStoreError(
            f"{DELTA_URL_ENV} must be s3://bucket/prefix, gs://bucket/prefix, a path or "
            f"file:///path; the scheme {scheme!r} of {shown(url)!r} is not supported"
        )
    if scheme in REMOTE_SCHEMES and not urllib.parse.urlsplit(url).hostname:
        raise DeltaStoreError(f"{DELTA_URL_ENV}={shown(url)!r} names no bucket ({scheme}://bucket/prefix)")
    return url


def shown(uri: str) -> str:
    """The location without any credentials written into it, for messages."""
    parsed = urllib.parse.urlsplit(uri)
    if "@" not in parsed.netloc:
        return uri
    return urllib.parse.urlunsplit(parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]))


def _scheme(uri: str) -> str:
    # "C:\..." never occurs (Linux only); a bare path has no "://".
    return urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri else ""


def is_remote(uri: str) -> bool:
    """Whether the location is on an object store (files there are written whole, not in place)."""
    return _scheme(uri) in REMOTE_SCHEMES


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a path or a URI alike."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) if parts else base


def parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def locate(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem a location is on, and its path there."""
    scheme = _scheme(uri)
    if not scheme or scheme == "file":
        path = urllib.parse.urlsplit(uri).path if scheme else uri
        return pafs.LocalFileSystem(), os.path.abspath(path)
    parsed = urllib.parse.urlsplit(uri)
    bucket = parsed.hostname or ""
    path = f"{bucket}{parsed.path}".rstrip("/")
    if scheme == "s3":
        endpoint = _env("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
        if not region and not endpoint:
            region = _bucket_region(uri, bucket)
        return _s3(endpoint, region or "us-east-1"), path
    if scheme in ("gs", "gcs"):
        return _gcs(), path
    raise DeltaStoreError(f"{shown(uri)!r}: the scheme {scheme!r} is not supported (set {DELTA_URL_ENV})")


def _env(*names: str) -> str | None:
    return next((v for v in (os.environ.get(n, "").strip() for n in names) if v), None)


@functools.cache
def _s3(endpoint: str | None, region: str) -> pafs.FileSystem:
    # One client per endpoint and region in a process; credentials come from the AWS chain.
    return pafs.S3FileSystem(endpoint_override=endpoint, region=region)


@functools.cache
def _gcs() -> pafs.FileSystem:
    return pafs.GcsFileSystem()


@functools.cache
def _bucket_region(uri: str, bucket: str) -> str:
    try:
        return str(pafs.resolve_s3_region(bucket))
    except (OSError, pa.ArrowException) as exc:
        raise _error("find the region of the bucket of", uri, exc) from None


def _error(doing: str, uri: str, exc: BaseException) -> DeltaStoreError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DeltaStoreError(
        f"could not {doing} {shown(uri)} ({DELTA_URL_ENV}): {first}; check the setting, the "
        "bucket and the credentials"
    )


def check(root: str) -> None:
    """Fail now, naming the setting, when the bucket of an object-store root is missing or cannot
    be seen: before a warehouse is scanned for a delta that could not be stored."""
    if not is_remote(root):
        return
    try:
        fs, path = locate(root)
        bucket = path.split("/", 1)[0]
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except (OSError, pa.ArrowException) as exc:
        raise _error("reach", root, exc) from None
    if not found:
        raise DeltaStoreError(
            f"{DELTA_URL_ENV}={shown(root)!r}: the bucket {bucket!r} does not exist, or these "
            "credentials cannot see it"
        )


def open_input(uri: str) -> pa.NativeFile:
    """A file opened for random access (Parquet readers fetch only the row groups they read)."""
    fs, path = locate(uri)
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as exc:
        if is_remote(uri):
            raise _error("open", uri, exc) from None
        raise


def parquet_batches(
    source: pa.NativeFile | str, batch_rows: int, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """A delta file's record batches in file order, `batch_rows` rows each, holding about one
    at a time; `columns`: those of them the file has (a delta written by an older release may
    lack one), None: all. pyarrow's reader pre-buffers by default and keeps every buffer it read
    until the file is closed: a delivery reading a 4M-row delta that way held 374 MB more at its
    end than at its start, growing with the delta."""
    file = pq.ParquetFile(source, pre_buffer=False)
    if columns is not None:
        columns = [name for name in columns if name in file.schema_arrow.names]
    return file.iter_batches(batch_size=batch_rows, columns=columns)


def exists(uri: str) -> bool:
    fs, path = locate(uri)
    try:
        return bool(fs.get_file_info(path).type == pafs.FileType.File)
    except (OSError, pa.ArrowException) as exc:
        if is_remote(uri):
            raise _error("look up", uri, exc) from None
        raise


def read_text(uri: str) -> str | None:
    """A small file's text, or None when there is no such file."""
    if not is_remote(uri):
        path = Path(locate(uri)[1])
        return path.read_text() if path.exists() else None
    if not exists(uri):
        return None
    with open_input(uri) as handle:
        return bytes(handle.read()).decode()


def write_text(uri: str, text: str) -> None:
    """Write a small file whole (an object appears only once complete)."""
    fs, path = locate(uri)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    try:
        with fs.open_output_stream(path) as out:
            out.write(text.encode())
    except (OSError, pa.ArrowException) as exc:
        raise _error("write", uri, exc) from None


def upload(local: str, uri: str) -> None:
    """Copy a finished local file to `uri`, a piece at a time."""
    fs, path = locate(uri)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(local, "rb") as source, fs.open_output_stream(path) as out:
            shutil.copyfileobj(source, out, COPY_BYTES)
    except (OSError, pa.ArrowException) as exc:
        if is_remote(uri):
            raise _error("upload to", uri, exc) from None
        raise


def listing(uri: str) -> list[pafs.FileInfo]:
    """Everything under a directory or prefix (files and directories), or [] when it is absent."""
    fs, path = locate(uri)
    try:
        return list(fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)))
    except (OSError, pa.ArrowException) as exc:
        if is_remote(uri):
            raise _error("list", uri, exc) from None
        raise


def delete_dir(uri: str) -> None:
    """Delete a directory or prefix and everything under it; absent is fine."""
    fs, path = locate(uri)
    if not is_remote(uri):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except (OSError, pa.ArrowException) as exc:
        raise _error("delete", uri, exc) from None


def relative(info: pafs.FileInfo, uri: str) -> str:
    """The path of a listed entry below the listed location `uri`."""
    base = locate(uri)[1].rstrip("/") + "/"
    return info.path[len(base) :] if info.path.startswith(base) else info.path
