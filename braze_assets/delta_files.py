"""Where a sync's delta Parquet files live, run by run, and what is read back from them later.

Each run writes `<root>/<sync>/<run_id>/valid.parquet` and `rejected.parquet` (see `delta.py`).
The root is `<state dir>/deltas` on local disk, or `<BRAZE_ASSETS_DELTA_URL>/files` on shared
storage (`delta_root`, `delta_store.py`), where every step of every run finds the same files.
Only the newest few runs' files are kept: every row's outcome is in the ledger, and the files are
needed only by the run that wrote them, by a later run delivering the same delta, and by recovery,
which looks up the objects of rows it holds (what a person's reconcile needs to ask Braze about).

On an object store a run's files are written whole once the delta is complete (`staged`), then a
small `sealed` object records when: object stores have no directories, so no directory time to
order runs by, and object times are only to the second.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from braze_assets import delta_store

#: A run's completion time on an object store (ISO 8601, UTC), written after its files.
SEALED = "sealed"


def delta_root(state_dir: str | Path) -> str:
    """Where delta files live: `<BRAZE_ASSETS_DELTA_URL>/files` when the setting is set, else
    `<state_dir>/deltas` (the local layout)."""
    url = delta_store.delta_url()
    return delta_store.join(url, "files") if url else str(Path(state_dir) / "deltas")


class DeltaFiles:
    """The delta files of one sync under `root` (a local directory, or a URI)."""

    def __init__(self, root: str, sync: str):
        self.root = root
        self.sync = sync

    @property
    def sync_dir(self) -> str:
        return delta_store.join(self.root, self.sync)

    def run_dir(self, run_id: str) -> str:
        return delta_store.join(self.root, self.sync, run_id)

    def check(self) -> None:
        """Fail now, naming the setting, when the store the files go to cannot be reached."""
        delta_store.check(self.root)

    def prune(self, keep: int = 5) -> int:
        """Delete all but the newest `keep` runs' delta files (the ledger keeps every outcome)."""
        runs = self._runs()
        for old in runs[:-keep] if keep else runs:
            delta_store.delete_dir(delta_store.join(self.sync_dir, old))
        return max(0, len(runs) - keep)

    def _runs(self) -> list[str]:
        """This sync's runs, oldest first. A run's time is when it was sealed on an object store,
        else its directory's time (local disk), else its newest file's."""
        sync_dir = self.sync_dir
        own: dict[str, dt.datetime] = {}  # a directory's own time (local disk only)
        newest: dict[str, dt.datetime] = {}  # its newest file's
        sealed: dict[str, dt.datetime] = {}
        for info in delta_store.listing(sync_dir):
            run, _, rest = delta_store.relative(info, sync_dir).partition("/")
            if not run or "/" in rest or info.mtime is None:
                continue
            if not rest:
                own[run] = info.mtime
            elif run not in newest or info.mtime > newest[run]:
                newest[run] = info.mtime
            if rest == SEALED:
                with contextlib.suppress(OSError, ValueError):
                    sealed[run] = dt.datetime.fromisoformat(
                        delta_store.read_text(delta_store.join(sync_dir, run, SEALED)) or ""
                    )
        when = {**newest, **own, **sealed}
        return sorted(when, key=lambda run: (when[run], run))

    def objects(self, hashes: list[str], run_ids: list[str]) -> dict[str, bytes]:
        """The objects of these rows as their runs' delta files hold them (the runs' own files
        first, then the other retained ones, newest first). Files being written or gone are
        skipped: a row whose object is not found gets no details (reconcile leaves it held)."""
        if not hashes:
            return {}
        others: list[str] = [r for r in reversed(self._runs()) if r not in run_ids]
        wanted = set(hashes)
        found: dict[str, bytes] = {}
        for run in [*run_ids, *others]:
            if not wanted:
                break
            try:
                with delta_store.open_input(delta_store.join(self.run_dir(run), "valid.parquet")) as f:
                    table = pq.read_table(
                        f, columns=["row_hash", "object"], filters=[("row_hash", "in", sorted(wanted))]
                    )
            except (OSError, pa.ArrowException):
                continue
            for h, raw in zip(table["row_hash"].to_pylist(), table["object"].to_pylist(), strict=True):
                found[h] = raw
            wanted -= found.keys()
        return found

    def forget(self, lookup: list[str]) -> int:
        """Drop the rows carrying any of these lookup hashes (`lookup.py`) from every retained
        delta file, each rewritten whole; returns how many rows were dropped. Call with the
        sync's delivery lock held: no run reads the files meanwhile."""
        wanted = set(lookup)
        dropped = 0
        for run in self._runs():
            for name in ("valid.parquet", "rejected.parquet", "unchanged.parquet"):
                uri = delta_store.join(self.run_dir(run), name)
                try:
                    with delta_store.open_input(uri) as f:
                        if "identifier_hash" not in pq.read_schema(f).names:
                            continue  # written before lookup hashes were kept: nothing to match
                        hashes = pq.read_table(f, columns=["identifier_hash"])["identifier_hash"].to_pylist()
                except FileNotFoundError:
                    continue
                keep = [not (h and wanted.intersection(h.split(" "))) for h in hashes]
                if all(keep):  # the usual case: only the hash column was read
                    continue
                with delta_store.open_input(uri) as f:
                    table = pq.read_table(f)
                dropped += keep.count(False)
                with tempfile.TemporaryDirectory(prefix="braze-assets-forget-") as scratch:
                    local = os.path.join(scratch, name)
                    pq.write_table(table.filter(pa.array(keep)), local)
                    delta_store.upload(local, uri)
        return dropped


@contextlib.contextmanager
def staged(*uris: str) -> Iterator[tuple[str, ...]]:
    """Local paths to write a run's delta files at (valid, rejected and, for attributes syncs
    sending only what changed, unchanged), then (on an object store) uploaded whole once the
    block ends without error, and the run sealed.

    Written locally first because the delta is rewritten after writing (exact copies dropped, with
    DuckDB, which reads only local files without an extension download), and because an object
    appears only once uploaded whole: no reader ever sees a file half written. A failed delta
    uploads nothing. On local disk the files are written in place, as they always were."""
    if not delta_store.is_remote(uris[0]):
        for uri in uris:
            Path(delta_store.locate(uri)[1]).parent.mkdir(parents=True, exist_ok=True)
        yield uris
        return
    with tempfile.TemporaryDirectory(prefix="braze-assets-delta-") as scratch:
        local = tuple(os.path.join(scratch, f"{n}.parquet") for n in range(len(uris)))
        yield local
        for path, uri in zip(local, uris, strict=True):
            delta_store.upload(path, uri)
        sealed_at = dt.datetime.now(dt.UTC).isoformat()
        delta_store.write_text(delta_store.join(delta_store.parent(uris[0]), SEALED), sealed_at)
