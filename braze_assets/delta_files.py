"""Where a sync's delta Parquet files live, run by run, and what is read back from them later.

Each run writes `<root>/<sync>/<run_id>/valid.parquet` and `rejected.parquet` (see `delta.py`).
Only the newest few runs' files are kept: every row's outcome is in the ledger, and the files are
needed only by the run that wrote them, by a later run delivering the same delta, and by recovery,
which looks up the objects of rows it holds (what a person's reconcile needs to ask Braze about).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class DeltaFiles:
    """The delta files of one sync under `root`."""

    def __init__(self, root: str | Path, sync: str):
        self.root = Path(root)
        self.sync = sync

    @property
    def sync_dir(self) -> Path:
        return self.root / self.sync

    def run_dir(self, run_id: str) -> Path:
        return self.sync_dir / run_id

    def prune(self, keep: int = 5) -> int:
        """Delete all but the newest `keep` runs' delta files (the ledger keeps every outcome)."""
        root = self.sync_dir
        runs = sorted(root.iterdir(), key=lambda p: p.stat().st_mtime) if root.exists() else []
        for old in runs[:-keep] if keep else runs:
            shutil.rmtree(old, ignore_errors=True)
        return max(0, len(runs) - keep)

    def objects(self, hashes: list[str], run_ids: list[str]) -> dict[str, bytes]:
        """The objects of these rows as their runs' delta files hold them (the runs' own files
        first, then the other retained ones, newest first). Files being written or gone are
        skipped: a row whose object is not found gets no details (reconcile leaves it held)."""
        if not hashes:
            return {}
        root = self.sync_dir
        own = [self.run_dir(r) / "valid.parquet" for r in run_ids]
        others = (
            sorted(
                (p for p in root.glob("*/valid.parquet") if p not in own),
                key=lambda p: p.stat().st_mtime,
                reverse=True,
            )
            if root.exists()
            else []
        )
        wanted = set(hashes)
        found: dict[str, bytes] = {}
        for path in own + others:
            if not wanted:
                break
            try:
                table = pq.read_table(
                    path, columns=["row_hash", "object"], filters=[("row_hash", "in", sorted(wanted))]
                )
            except (OSError, pa.ArrowException):
                continue
            for h, raw in zip(table["row_hash"].to_pylist(), table["object"].to_pylist(), strict=True):
                found[h] = raw
            wanted -= found.keys()
        return found
