"""Batches prepared in worker processes (`delta_workers.py`) make the same delta, row for row, as
one process does; a worker that dies loses no batch; the setting is checked."""

from __future__ import annotations

import datetime as dt
import operator
import os
import signal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from braze_assets import delta_writer
from braze_assets.attribute_diff import AttributeDiff, payload_hash, user_key
from braze_assets.datatypes import DATA_TYPES
from braze_assets.delivery import accepted_attributes
from braze_assets.delta import DeltaManifest, compute_delta
from braze_assets.delta_batch import BatchJob, prepare_batch
from braze_assets.delta_workers import WORKERS_ENV, PreparePool, configured_workers
from braze_assets.known_users import identify
from braze_assets.row_identity import batch_hashes
from braze_assets.sources import DuckDBSource
from braze_assets.state import EmbeddedStateStore
from braze_assets_tests.test_hostile_rows import NOW, T0, _cdi_rows, _row, _table

MANIFEST_COUNTS = (
    "rows_read",
    "valid",
    "rejected",
    "rejected_reasons",
    "rejected_examples",
    "duplicate_rows",
    "rows_unprocessable",
    "estimated_data_points",
    "unchanged",
    "data_points_saved",
)


def _run_delta(
    tmp_path: Path,
    table: str,
    data_type: str,
    workers: int,
    name: str,
    diff: bool = False,
    batch_rows: int = 3,  # several batches, so several are in flight at once
) -> DeltaManifest:
    out = tmp_path / name
    manifest = DeltaManifest(
        sync="case",
        data_type=data_type,
        run_id=name,
        window_start=None,
        window_end=NOW.isoformat(),
        reaches_now=True,
        valid_path=str(out / "valid.parquet"),
        rejected_path=str(out / "rejected.parquet"),
        unchanged_path=str(out / "unchanged.parquet") if diff else None,
    )
    return compute_delta(
        source=DuckDBSource(tmp_path / "warehouse.duckdb", table),
        spec=DATA_TYPES[data_type],
        store=EmbeddedStateStore(tmp_path / f"state_{name}", "case"),
        manifest=manifest,
        window_start=None,
        window_end=NOW,
        now=NOW,
        partitions_start=T0 - dt.timedelta(days=30),
        update_existing_only=False,
        diff=AttributeDiff() if diff else None,
        batch_rows=batch_rows,
        workers=workers,
    )


def _files(manifest: DeltaManifest) -> dict[str, list[dict[str, Any]]]:
    paths = {"valid": manifest.valid_path, "rejected": manifest.rejected_path}
    if manifest.unchanged_path:
        paths["unchanged"] = manifest.unchanged_path
    return {name: pq.read_table(path).to_pylist() for name, path in paths.items()}


def _same_delta(one: DeltaManifest, other: DeltaManifest) -> None:
    assert _files(one) == _files(other)
    for name in MANIFEST_COUNTS:
        assert getattr(one, name) == getattr(other, name), name


#: Hypothesis's settings for hostile rows through a delta (a few derandomized examples each).
_HOSTILE_ROWS = settings(
    max_examples=8,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def pool_from_the_first_row(monkeypatch):
    """Workers from the first batch on (a small delta never starts them otherwise)."""
    monkeypatch.setattr(delta_writer, "POOL_AFTER_ROWS", 0)


@pytest.mark.parametrize("data_type", ["attributes", "events", "purchases", "deletions"])
@_HOSTILE_ROWS
@given(data=st.data())
def test_workers_make_the_same_delta_as_one_process(
    tmp_path_factory, pool_from_the_first_row, data_type, data
):
    """Hostile rows (bad JSON, no identifier, too deep, duplicates, copies) through two workers:
    the same files, row for row and in order, and the same counts and reasons."""
    rows = data.draw(_cdi_rows(data_type))
    tmp_path = tmp_path_factory.mktemp("workers")
    table = _table(tmp_path / "warehouse.duckdb", data_type, rows + rows[:2])  # and exact copies
    _same_delta(
        _run_delta(tmp_path, table, data_type, workers=0, name="inline"),
        _run_delta(tmp_path, table, data_type, workers=2, name="pooled"),
    )


@_HOSTILE_ROWS
@given(data=st.data())
def test_workers_make_the_same_diff_of_hostile_rows(
    tmp_path_factory, pool_from_the_first_row, monkeypatch, data
):
    """Hostile rows through the diff's lookup (the state remembers someone, so every batch is
    hashed for it and looked up, a group behind the scan): the same files as one process."""
    monkeypatch.setattr(delta_writer, "LOOKUP_ROWS", 5)
    rows = data.draw(_cdi_rows("attributes"))
    tmp_path = tmp_path_factory.mktemp("hostile_diff")
    table = _table(tmp_path / "warehouse.duckdb", "attributes", rows + rows[:2])
    results = []
    for name, workers in (("inline", 0), ("pooled", 2)):
        with EmbeddedStateStore(tmp_path / f"state_{name}", "case").session() as ledger:
            ledger.remember(
                pa.table(
                    {
                        "user_key": [user_key({"EXTERNAL_ID": "someone else"})],
                        "payload_hash": ["0" * 32],
                        "attributes": ["{}"],
                        "payload_attributes": pa.array([0], pa.int32()),
                    }
                )
            )
        results.append(_run_delta(tmp_path, table, "attributes", workers, name, diff=True))
    _same_delta(*results)


def _remembered_case(tmp_path: Path) -> tuple[str, pa.Table]:
    """A table of 20 users changed and the same 20 restamped, and what Braze accepted of ten of
    them before (as `remember` takes it)."""
    rows = [_row({"tier": "gold", "n": i % 3}, external_id=f"u{i}") for i in range(20)]
    first = _run_delta(
        tmp_path,
        _table(tmp_path / "warehouse.duckdb", "attributes", rows),
        "attributes",
        0,
        "first",
        diff=True,
    )
    valid = pq.read_table(first.valid_path)
    accepted = accepted_attributes(valid, ["accepted"] * 10 + [None] * (valid.num_rows - 10))
    changed = [
        _row({"tier": "silver" if i % 2 else "gold", "n": i % 3}, external_id=f"u{i}") for i in range(20)
    ]
    restamped = [
        _row({"tier": "gold", "n": i % 3}, T0 + dt.timedelta(hours=1), external_id=f"u{i}") for i in range(20)
    ]
    return _table(tmp_path / "warehouse.duckdb", "attributes", changed + restamped), accepted


def test_workers_make_the_same_attribute_diff(tmp_path, pool_from_the_first_row):
    """With the diff, what the state remembers is looked up by the run's own process and handed
    to the workers: unchanged rows are set aside exactly as one process does."""
    table, accepted = _remembered_case(tmp_path)
    results = []
    for name, workers in (("inline", 0), ("pooled", 2)):
        with EmbeddedStateStore(tmp_path / f"state_{name}", "case").session() as ledger:
            ledger.remember(accepted)  # as if Braze had accepted the first ten users
        results.append(_run_delta(tmp_path, table, "attributes", workers, name, diff=True))
    assert results[0].unchanged > 0 and results[0].data_points_saved > 0
    _same_delta(*results)


@pytest.mark.parametrize(
    ("lookup_rows", "lookup_bytes", "rest_rows"), [(7, 2**30, 20_000), (40, 2**30, 4), (10**6, 1, 5)]
)
def test_workers_make_the_same_diff_with_lookups_behind_the_scan(
    tmp_path, pool_from_the_first_row, monkeypatch, lookup_rows, lookup_bytes, rest_rows
):
    """With workers, a group of batches (closed by rows or by bytes) is looked up while the
    workers hash the next one, the unchanged rows are set aside by the run's own process, and the
    rows left of several batches are prepared together (up to `REST_ROWS`): the same files, row
    for row and in order, as one process makes."""
    monkeypatch.setattr(delta_writer, "LOOKUP_ROWS", lookup_rows)
    monkeypatch.setattr(delta_writer, "LOOKUP_BYTES", lookup_bytes)
    monkeypatch.setattr(delta_writer, "REST_ROWS", rest_rows)
    table, accepted = _remembered_case(tmp_path)
    results = []
    for name, workers in (("inline", 0), ("pooled", 2)):
        with EmbeddedStateStore(tmp_path / f"state_{name}", "case").session() as ledger:
            ledger.remember(accepted)
        results.append(_run_delta(tmp_path, table, "attributes", workers, name, diff=True))
    assert results[0].unchanged > 0 and results[0].valid > 0 and results[0].data_points_saved > 0
    _same_delta(*results)


def test_one_lookup_for_several_batches_makes_the_same_diff(tmp_path, monkeypatch):
    """The run's process looks users up for several scanned batches at once (`LOOKUP_ROWS`), and
    lookups split batches of one scan in any way: each row is diffed as if its batch were alone."""
    table, accepted = _remembered_case(tmp_path)
    results = []
    for name, batch_rows, lookup_rows in (("alone", 1000, 100_000), ("grouped", 3, 7)):
        monkeypatch.setattr(delta_writer, "LOOKUP_ROWS", lookup_rows)
        with EmbeddedStateStore(tmp_path / f"state_{name}", "case").session() as ledger:
            ledger.remember(accepted)
        results.append(_run_delta(tmp_path, table, "attributes", 0, name, diff=True, batch_rows=batch_rows))
    alone, grouped = results
    assert alone.unchanged > 0 and alone.valid > 0 and alone.data_points_saved > 0
    for name in MANIFEST_COUNTS:
        assert getattr(alone, name) == getattr(grouped, name), name
    for kind, rows in _files(alone).items():  # set aside first within a batch: compare as sets
        key = operator.itemgetter("row_hash")
        assert sorted(rows, key=key) == sorted(_files(grouped)[kind], key=key), kind


def _events(batches: int) -> list[tuple[pa.Table, list[str]]]:
    made = []
    for n in range(batches):
        table = pa.table(
            {
                "UPDATED_AT": pa.array([T0] * 5, pa.timestamp("us", tz="UTC")),
                "EXTERNAL_ID": pa.array([f"u{n}-{i}" for i in range(5)], pa.string()),
                "PAYLOAD": pa.array(
                    [orjson.dumps({"name": "opened", "properties": {"n": n}}).decode()] * 5, pa.string()
                ),
            }
        )
        made.append((table, batch_hashes(table, ["EXTERNAL_ID", "UPDATED_AT", "PAYLOAD"])))
    return made


def test_a_worker_that_dies_loses_no_batch(caplog):
    """A worker killed (for memory, say) mid-delta: the batches it held are prepared again in
    the run's own process, which goes on without workers, and says so."""
    job = BatchJob(DATA_TYPES["events"], update_existing_only=False)
    batches = _events(6)
    expected = [part for rows, hashes in batches for part in prepare_batch(job, rows, hashes)]
    pool = PreparePool(job, workers=1)
    try:
        got = list(pool.submit(*batches[0]))
        got += list(pool.submit(*batches[1]))
        # The executor's own table of its processes: the only handle on a worker's pid.
        pids = list(pool._executor._processes) if pool._executor else []
        assert pids, "the worker process started"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for rows, hashes in batches[2:]:
            got += list(pool.submit(rows, hashes))
        got += list(pool.drain())
    finally:
        pool.close()
    assert got == expected
    assert "a delta worker process died" in caplog.text


def test_users_are_hashed_for_the_lookup_in_a_worker_and_again_here_if_it_dies():
    """With the diff, a worker hashes a batch's users and PAYLOADs for the state's lookup (the
    run's own process only looks up): what it gives is what hashing here gives, and a worker
    killed meanwhile costs nothing but doing it here."""
    rows = pa.table(
        {
            "EXTERNAL_ID": ["u1", None, "u3"],
            "EMAIL": [None, "b@example.com", "c@example.com"],
            "PAYLOAD": ['{"plan": "gold"}', None, '{"plan": "free"}'],
        }
    )
    here = identify(rows)
    assert here.payload_hashes is not None and here.payload_hashes.null_count == 1
    pool = PreparePool(BatchJob(DATA_TYPES["attributes"], update_existing_only=False), workers=1)
    try:
        hashing = pool.identify(rows)
        assert hashing is not None, "a worker took the batch"
        assert pool.identified(rows, hashing) == here
        pids = list(pool._executor._processes) if pool._executor else []
        assert pids, "the worker process started"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert pool.identified(rows, pool.identify(rows)) == here
        assert pool.identify(rows) is None, "no worker left: the batch is hashed here"
    finally:
        pool.close()


def test_each_worker_gets_its_job_once(monkeypatch):
    """A worker is handed the delta's job when it starts and keeps it for every batch: what the
    job keeps between batches (the attribute diff's hashes of values seen) stays with it, and
    a batch carries only its rows."""
    sent: list[str] = []
    state = AttributeDiff.__getstate__
    monkeypatch.setattr(AttributeDiff, "__getstate__", lambda self: sent.append("job") or state(self))
    job = BatchJob(DATA_TYPES["attributes"], update_existing_only=False, diff=AttributeDiff())
    batches = []
    for n in range(8):
        table = pa.table(
            {
                "UPDATED_AT": pa.array([T0] * 4, pa.timestamp("us", tz="UTC")),
                "EXTERNAL_ID": pa.array([f"u{n}-{i}" for i in range(4)], pa.string()),
                "PAYLOAD": pa.array([orjson.dumps({"tier": "gold", "n": i}).decode() for i in range(4)]),
            }
        )
        batches.append((table, batch_hashes(table, ["EXTERNAL_ID", "UPDATED_AT", "PAYLOAD"])))
    expected = [part for rows, hashes in batches for part in prepare_batch(job, rows, hashes)]
    sent.clear()
    pool = PreparePool(job, workers=2)
    try:
        got = [part for rows, hashes in batches for part in pool.submit(rows, hashes)]
        got += list(pool.drain())
    finally:
        pool.close()
    assert got == expected
    assert 1 <= len(sent) <= 2, f"the job was sent {len(sent)} times for {len(batches)} batches"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("3", 3), (" 2 ", 2), ("", None)],
)
def test_the_number_of_workers_comes_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(WORKERS_ENV, value)
    cores = len(os.sched_getaffinity(0))
    assert configured_workers() == (expected if expected is not None else (cores if cores > 1 else 0))


@pytest.mark.parametrize(("value", "problem"), [("two", "whole number"), ("-1", "from 0"), ("65", "from 0")])
def test_a_bad_number_of_workers_is_refused_naming_the_setting(monkeypatch, value, problem):
    monkeypatch.setenv(WORKERS_ENV, value)
    with pytest.raises(ValueError, match=f"{WORKERS_ENV}.*{problem}"):
        configured_workers()


def _validation_ready() -> bool:
    """In a worker: has pandera's first-validation registration already happened?"""
    import sys

    return "pandera.backends.pandas.builtin_checks" in sys.modules


def test_workers_start_with_validation_loaded():
    """The fork server loads what a worker's first validation would otherwise load on its first
    batch (pandera's backends: 0.6 s measured, per worker and run), before it forks them."""
    pool = PreparePool(BatchJob(DATA_TYPES["events"], update_existing_only=False), workers=1)
    try:
        assert pool._executor is not None
        assert pool._executor.submit(_validation_ready).result(timeout=60)
    finally:
        pool.close()


_MAIN_SCRIPT = """
import os
import sys

if __name__ != "__main__":  # multiprocessing importing this module again in a child
    with open(os.environ["MAIN_IMPORTED"], "a") as marker:
        marker.write(f"{os.getpid()} {__name__}\\n")
else:
    from braze_assets.datatypes import DATA_TYPES
    from braze_assets.delta_batch import BatchJob
    from braze_assets.delta_workers import PreparePool

    pool = PreparePool(BatchJob(DATA_TYPES["events"], update_existing_only=False), workers=1)
    try:
        assert pool._executor is not None
        print("worker", pool._executor.submit(os.getpid).result(timeout=60))
    finally:
        pool.close()
"""


@pytest.mark.parametrize("how", ["path", "module"])
def test_workers_never_import_the_parent_main_module(tmp_path, how):
    """A worker does not import the run's main module again (multiprocessing does so for every
    child it does not fork from the parent): for `braze-assets run`, `dagster` or the benchmark
    that is all of Dagster and the project, seconds of CPU per worker and delta. Both ways a main
    module is named: a script's path and `python -m`."""
    import subprocess
    import sys

    (tmp_path / "heavy_main.py").write_text(_MAIN_SCRIPT)
    marker = tmp_path / "imported"
    command = [sys.executable, str(tmp_path / "heavy_main.py")]
    if how == "module":
        command = [sys.executable, "-m", "heavy_main"]
    done = subprocess.run(
        command,
        cwd=tmp_path,
        env={**os.environ, "MAIN_IMPORTED": str(marker), "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "worker " in done.stdout  # the worker ran the task
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize("data_type", ["attributes", "events"])
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_with_nothing_settled_in_their_span_skip_the_probe(
    tmp_path, pool_from_the_first_row, monkeypatch, data_type, workers
):
    """A batch stamped where the ledger holds nothing (new rows, a restamped table) is not hashed
    nor probed by the run's process: its rows are hashed where they are prepared. The files are
    the same, row for row, as when every batch is probed; a batch whose span does hold settled
    rows is still probed, and its settled rows dropped."""
    from braze_assets.state.embedded_ledger import DuckDBLedgerSession

    rows = [_row({"n": i}, T0 + dt.timedelta(minutes=i), external_id=f"u{i}") for i in range(12)]
    if data_type == "events":
        rows = [
            _row({"name": "opened", "time": T0.isoformat()}, r["UPDATED_AT"], external_id=r["EXTERNAL_ID"])
            for r in rows
        ]
    table = _table(tmp_path / "warehouse.duckdb", data_type, rows)
    probes: list[int] = []
    probe = DuckDBLedgerSession.known_hashes

    def counted(self, hashes, **kwargs):
        probes.append(len(hashes))
        return probe(self, hashes, **kwargs)

    monkeypatch.setattr(DuckDBLedgerSession, "known_hashes", counted)
    skipped = _run_delta(tmp_path, table, data_type, workers, "skipped")
    assert probes == [] and skipped.valid == 12
    monkeypatch.setattr(DuckDBLedgerSession, "settled_between", lambda self, oldest, newest: True)
    probed = _run_delta(tmp_path, table, data_type, workers, "probed")
    assert len(probes) == 4  # batches of 3 rows
    _same_delta(skipped, probed)

    # rows 0-4 settled: the batches stamped over them are probed, the later ones are not
    monkeypatch.undo()
    monkeypatch.setattr(delta_writer, "POOL_AFTER_ROWS", 0)
    monkeypatch.setattr(DuckDBLedgerSession, "known_hashes", counted)
    probes.clear()
    settled = pq.read_table(skipped.valid_path).slice(0, 5)
    store = EmbeddedStateStore(tmp_path / "state_again", "case")
    with store.session() as ledger:
        ledger.append(
            pa.table(
                {
                    "row_hash": settled["row_hash"],
                    "updated_at": settled["updated_at"],
                    "status": pa.array(["accepted"] * 5),
                    "run_id": pa.array(["before"] * 5),
                }
            )
        )
    again = _run_delta(tmp_path, table, data_type, workers, "again")
    assert probes == [3, 3]  # the two batches holding rows 0-5
    assert again.already_settled == 5 and again.valid == 7


def test_delta_files_store_digest_columns_uncompressed(tmp_path):
    """Hex digests are random text: compressing them costs the run's process far more than the
    bytes it saves, so the delta's files keep them as they are and compress everything else."""
    table, accepted = _remembered_case(tmp_path)
    with EmbeddedStateStore(tmp_path / "state_codecs", "case").session() as ledger:
        ledger.remember(accepted)
    manifest = _run_delta(tmp_path, table, "attributes", 0, "codecs", diff=True)
    digests = {"row_hash", "identifier_hash", "user_key", "payload_hash"}
    assert manifest.valid and manifest.unchanged  # both files hold rows
    for path in (manifest.valid_path, manifest.unchanged_path):
        assert path is not None
        group = pq.ParquetFile(path).metadata.row_group(0)
        columns = [group.column(i) for i in range(group.num_columns)]
        codecs = {column.path_in_schema: column.compression for column in columns}
        assert {name for name, codec in codecs.items() if codec == "UNCOMPRESSED"} == digests & set(codecs)
        assert {codec for name, codec in codecs.items() if name not in digests} == {"SNAPPY"}


def _remembering(tmp_path: Path, payload: str, users: int) -> EmbeddedStateStore:
    """A state that remembers `users` users (u0, u1, ...) as last accepted with `payload`."""
    store = EmbeddedStateStore(tmp_path / "state", "case")
    with store.session() as ledger:
        ledger.remember(
            pa.table(
                {
                    "user_key": [user_key({"EXTERNAL_ID": f"u{i}"}) for i in range(users)],
                    "payload_hash": [payload_hash(payload)] * users,
                    "attributes": ['{"tier":"x"}'] * users,
                    "payload_attributes": pa.array([1] * users, pa.int32()),
                }
            )
        )
    return store


def _written(
    tmp_path: Path, store: EmbeddedStateStore, batches: list[tuple[pa.Table, list[str]]]
) -> DeltaManifest:
    """The delta `DeltaWriter` makes of `batches`, with the diff, against `store`."""
    out = tmp_path / "delta"
    out.mkdir()
    manifest = DeltaManifest(
        sync="case",
        data_type="attributes",
        run_id="r",
        window_start=None,
        window_end=NOW.isoformat(),
        reaches_now=True,
        valid_path=str(out / "valid.parquet"),
        rejected_path=str(out / "rejected.parquet"),
        unchanged_path=str(out / "unchanged.parquet"),
    )
    with store.session() as ledger:
        writer = delta_writer.DeltaWriter(
            manifest,
            DATA_TYPES["attributes"],
            False,
            diff=AttributeDiff(),
            remembered=ledger.remembered_table,
        )
        try:
            for rows, hashes in batches:
                writer.add(rows, hashes)
            writer.finish()
        finally:
            writer.close()
    return manifest


def test_batches_of_different_columns_are_not_prepared_together(tmp_path):
    """The rows left of several batches once their unchanged rows are set aside are prepared
    together, but only batches of one schema (a file source's files may differ in columns)."""
    payload = orjson.dumps({"tier": "gold"}).decode()
    store = _remembering(tmp_path, payload, 4)
    stamp = pa.array([T0, T0], pa.timestamp("us", tz="UTC"))
    changed = orjson.dumps({"tier": "silver"}).decode()
    plain = pa.table({"UPDATED_AT": stamp, "EXTERNAL_ID": ["u0", "u1"], "PAYLOAD": [payload, changed]})
    with_email = pa.table(
        {
            "UPDATED_AT": stamp,
            "EXTERNAL_ID": ["u2", "u3"],
            "EMAIL": pa.nulls(2, pa.string()),
            "PAYLOAD": [payload, changed],
        }
    )
    manifest = _written(tmp_path, store, [(plain, ["h0", "h1"]), (with_email, ["h2", "h3"])])
    assert (manifest.unchanged, manifest.valid, manifest.rejected) == (2, 2, 0)
    assert pq.read_table(manifest.valid_path)["row_hash"].to_pylist() == ["h1", "h3"]
    assert pq.read_table(manifest.unchanged_path)["row_hash"].to_pylist() == ["h0", "h2"]


@pytest.mark.parametrize("hostile", ["long decimal id", "struct payload with a decimal"])
def test_a_row_the_lookup_cannot_hash_stops_no_other_row(tmp_path, hostile):
    """Rows hashed for the diff's lookup (the state remembers someone): a 38-digit NUMBER id, or
    a PAYLOAD of a struct type holding a value JSON has no form for, is prepared and judged on
    its own; the batch's other rows are not stopped by it."""
    import decimal

    payload = orjson.dumps({"tier": "gold"}).decode()
    store = _remembering(tmp_path, payload, 1)
    stamp = pa.array([T0, T0], pa.timestamp("us", tz="UTC"))
    if hostile == "long decimal id":
        ids = [decimal.Decimal(0), decimal.Decimal("12345678901234567890123456789012345678")]
        rows = pa.table(
            {
                "UPDATED_AT": stamp,
                "EXTERNAL_ID": pa.array(ids, pa.decimal128(38, 0)),
                "PAYLOAD": [payload] * 2,
            }
        )
    else:
        values = [
            {"tier": "gold", "n": decimal.Decimal("1.5")},
            {"tier": "gold", "n": decimal.Decimal("2.5")},
        ]
        rows = pa.table(
            {
                "UPDATED_AT": stamp,
                "EXTERNAL_ID": ["u0", "u1"],
                "PAYLOAD": pa.array(values, pa.struct([("tier", pa.string()), ("n", pa.decimal128(5, 1))])),
            }
        )
    manifest = _written(tmp_path, store, [(rows, ["h0", "h1"])])
    assert manifest.valid + manifest.rejected + manifest.unchanged == 2
    if hostile == "long decimal id":  # the whole number is the id: "0" and the 38 digits
        assert manifest.unchanged + manifest.valid == 2


def test_a_batch_the_lookup_cannot_hash_is_prepared_whole_in_scan_order(tmp_path, monkeypatch, caplog):
    """Should hashing a batch for the lookup fail in a way no check foresaw, that batch is
    prepared as if nothing were remembered of its users (sent whole), in its place: the rows of
    one user stay in the order they were read, so Braze ends at the newest."""
    payload = orjson.dumps({"tier": "gold"}).decode()
    store = _remembering(tmp_path, payload, 1)
    real = delta_writer.identify_batch

    def failing(job, rows, *args):
        if "boom" in rows.column("PAYLOAD").to_pylist()[0]:
            raise RuntimeError("a row no check foresaw")
        return real(job, rows, *args)

    monkeypatch.setattr(delta_writer, "identify_batch", failing)

    def batch(hour: int, tier: str) -> pa.Table:
        return pa.table(
            {
                "UPDATED_AT": pa.array([T0 + dt.timedelta(hours=hour)], pa.timestamp("us", tz="UTC")),
                "EXTERNAL_ID": ["u0"],
                "PAYLOAD": [orjson.dumps({"tier": tier}).decode()],
            }
        )

    batches = [(batch(1, "silver"), ["h1"]), (batch(2, "boom"), ["h2"]), (batch(3, "bronze"), ["h3"])]
    with caplog.at_level("WARNING"):
        manifest = _written(tmp_path, store, batches)
    assert pq.read_table(manifest.valid_path)["row_hash"].to_pylist() == ["h1", "h2", "h3"]
    assert "could not be hashed for the diff's lookup (RuntimeError)" in caplog.text


def test_a_row_set_aside_by_the_run_process_that_cannot_be_read_stops_no_other_row(tmp_path):
    """The run's own process sets aside the rows whose PAYLOAD is the one Braze last accepted.
    One whose UPDATED_AT is not a time (a text stamp) cannot be settled so: its batch is then
    prepared as a worker does, that row is rejected with a reason, and the delta goes on."""
    payload = orjson.dumps({"tier": "gold"}).decode()
    store = _remembering(tmp_path, payload, 3)
    rows = pa.table(
        {
            "UPDATED_AT": ["2026-01-01T00:00:00Z", "not a time", "2026-01-01T00:00:00Z"],
            "EXTERNAL_ID": ["u0", "u1", "u2"],
            "PAYLOAD": [payload] * 3,
        }
    )
    manifest = _written(tmp_path, store, [(rows, ["h0", "h1", "h2"])])
    assert manifest.valid + manifest.rejected + manifest.unchanged == 3
    rejected = pq.read_table(manifest.rejected_path).to_pylist()
    assert [r["row_hash"] for r in rejected] == ["h1"]
    assert "could not be processed" in rejected[0]["reasons"]
    assert manifest.unchanged == 2
