"""The sync log: a record per run and the row-level log, in the state backend, searchable by
user (through lookup hashes, never the identifier in clear), exportable, with CDI's retention
and a right-to-be-forgotten purge that never lets a row be sent twice."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from braze_assets.log_cli import log_command
from braze_assets.lookup import LOOKUP_KEY_ENV, lookup_hash
from braze_assets.seed import cdi_row
from braze_assets.state.sync_log import FORGOTTEN
from braze_assets_tests.conftest import Harness, both_backends, events_rows, seqs, sync_config

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)
TS = NOW - dt.timedelta(hours=2)


def _events(harness: Harness, n: int = 40, bad: int = 2, name: str = "ev") -> None:
    """`n` valid events of users user-0..49 and `bad` rows of user-bad-<i> with no event name."""
    invalid = [
        cdi_row(TS.replace(tzinfo=None), json.dumps({"properties": {"seq": -i}}), external_id=f"user-bad-{i}")
        for i in range(bad)
    ]
    harness.table(name, [*events_rows(n, TS), *invalid])
    harness.syncs = [sync_config(name, "events", f"main.{name}")]


def _store(harness: Harness, name: str = "ev"):
    return harness.delivery_state().store(name)


def _materialization_metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    """The metadata of the run's (last) materialization of `asset`."""
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
    return events[-1].materialization.metadata


@both_backends
def test_every_run_is_recorded_with_its_status_counts_and_watermarks(harness):
    _events(harness)
    first = harness.run("ev")
    assert first.result.success
    second = harness.run("ev")  # nothing new
    assert second.result.success

    newest, oldest = _store(harness).log.runs()
    assert oldest["run_id"] == first.result.run_id and newest["run_id"] == second.result.run_id
    assert oldest["status"] == "partial_success"  # 2 rows rejected by validation
    assert (oldest["rows_read"], oldest["rows_rejected"], oldest["accepted"]) == (42, 2, 40)
    assert oldest["watermark_before"] is None and oldest["watermark_after"] is not None
    assert newest["status"] == "success" and newest["watermark_before"] == oldest["watermark_after"]
    for record in (oldest, newest):
        started = dt.datetime.fromisoformat(record["started_at"])
        finished = dt.datetime.fromisoformat(record["finished_at"])
        assert NOW - dt.timedelta(minutes=5) < started <= finished


@both_backends
def test_runs_that_end_before_delivery_are_recorded_as_errors(harness):
    _events(harness, n=10, bad=30)  # 75% of the rows are invalid: row_error_rate blocks delivery
    blocked = harness.run("ev")
    assert not blocked.result.success
    [record] = _store(harness).log.runs()
    assert record["run_id"] == blocked.result.run_id and record["status"] == "error"
    assert "row_error_rate" in record["status_detail"] and "30 of 40 rows rejected" in record["status_detail"]
    assert (record["rows_read"], record["rows_rejected"], record["accepted"]) == (40, 30, 0)

    harness.syncs = [sync_config("ev", "events", "main.no_such_table")]
    missing = harness.run("ev")
    assert not missing.result.success
    latest = _store(harness).log.runs()[0]
    assert latest["run_id"] == missing.result.run_id and latest["status"] == "error"
    assert "no_such_table" in latest["status_detail"]


@both_backends
def test_a_users_rows_are_found_by_their_identifier_which_is_never_stored(harness):
    _events(harness)
    assert harness.run("ev").result.success
    log = _store(harness).log

    mine = log.rows(lookup=[lookup_hash("EXTERNAL_ID", "user-7")])
    assert mine.num_rows == 1 and mine["status"].to_pylist() == ["accepted"]
    assert mine["identifier"].to_pylist() == ["EXTERNAL_ID=***"]  # masked
    rejected = log.rows(lookup=[lookup_hash("EXTERNAL_ID", "user-bad-1")])
    assert rejected["status"].to_pylist() == ["invalid"]
    assert "name" in rejected["message"][0].as_py()
    assert log.rows(lookup=[lookup_hash("EMAIL", "user-7")]).num_rows == 0  # the kind is part of it
    assert log.rows(errors_only=True).num_rows == 2

    everything = log.rows()
    assert everything.num_rows == 42
    shown = json.dumps(everything.to_pylist(), default=str)
    assert "user-7" not in shown and "user-bad-1" not in shown


def test_a_lookup_key_makes_other_keys_hashes_useless(tmp_path, emulator, monkeypatch):
    monkeypatch.setenv(LOOKUP_KEY_ENV, "a secret of this workspace")
    harness = Harness(tmp_path, emulator)
    _events(harness)
    assert harness.run("ev").result.success
    log = _store(harness).log
    assert log.rows(lookup=[lookup_hash("EXTERNAL_ID", "user-7")]).num_rows == 1
    unkeyed = lookup_hash("EXTERNAL_ID", "user-7", key=b"")
    assert log.rows(lookup=[unkeyed]).num_rows == 0


@both_backends
def test_retention_clears_row_details_and_old_runs_but_never_resends(harness, emulator):
    _events(harness)
    assert harness.run("ev").result.success
    assert len(seqs(emulator)) == 40
    store = _store(harness)
    future = dt.datetime.now(UTC) + dt.timedelta(seconds=1)

    assert store.log.clear_row_details(future) == 42
    rows = store.log.rows()
    assert rows.num_rows == 42  # identity and status stay: they are the exactly-once record
    assert set(rows["identifier"].to_pylist()) == {None} and set(rows["message"].to_pylist()) == {None}
    assert store.log.rows(lookup=[lookup_hash("EXTERNAL_ID", "user-7")]).num_rows == 0
    assert store.log.clear_row_details(future) == 0  # nothing left to clear
    assert store.log.delete_runs(future) == 1 and store.log.runs() == []

    # same rows restated: the ledger still knows every one of them
    harness.run("ev", keys=dg.PartitionKeyRange(TS.strftime("%Y-%m-%d"), TS.strftime("%Y-%m-%d")))
    assert len(seqs(emulator)) == 40


def test_retention_keeps_what_is_within_its_days(harness):
    _events(harness)
    run = harness.run("ev")
    assert run.result.success
    store = _store(harness)
    assert store.log.clear_row_details(NOW - dt.timedelta(days=30)) == 0
    assert store.log.delete_runs(NOW - dt.timedelta(days=365)) == 0
    assert store.log.rows(lookup=[lookup_hash("EXTERNAL_ID", "user-7")]).num_rows == 1
    assert [r["run_id"] for r in store.log.runs()] == [run.result.run_id]


@both_backends
def test_forgetting_a_user_clears_them_from_the_log_and_delta_files_only(harness, emulator):
    _events(harness, n=100)  # user-7 has rows 7, 57
    assert harness.run("ev").result.success
    store = _store(harness)
    hashes = [lookup_hash("EXTERNAL_ID", "user-7")]
    theirs = set(store.log.rows(lookup=hashes)["row_hash"].to_pylist())
    assert len(theirs) == 2

    cleared, dropped = store.forget(hashes)
    assert (cleared, dropped) == (2, 2)
    assert store.log.rows(lookup=hashes).num_rows == 0
    after = {r["row_hash"]: r for r in store.log.rows().to_pylist()}
    assert len(after) == 102  # no row left the ledger
    for row_hash in theirs:
        assert after[row_hash]["status"] == "accepted"
        assert after[row_hash]["identifier"] is None and after[row_hash]["message"] == FORGOTTEN
    assert store.log.rows(lookup=[lookup_hash("EXTERNAL_ID", "user-8")]).num_rows == 2  # others kept
    for path in Path(harness.state_dir, "deltas").rglob("*.parquet"):
        kept = pq.read_table(path)
        assert not {h for h in kept["row_hash"].to_pylist()} & theirs, path

    # their rows are still settled: restating the day sends nothing again
    harness.run("ev", keys=dg.PartitionKeyRange(TS.strftime("%Y-%m-%d"), TS.strftime("%Y-%m-%d")))
    assert len(seqs(emulator)) == 100


def _check_metadata(result: dg.ExecuteInProcessResult, check: str) -> dict:
    """The metadata of the run's own evaluation of `check` (not a per-day copy)."""
    [evaluation] = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.event_specific_data.check_name == check
        and e.event_specific_data.partition is None
    ]
    return evaluation.metadata


def test_the_results_show_the_latest_runs_and_this_runs_top_errors(harness):
    _events(harness, n=40, bad=3)
    harness.run("ev")
    second = harness.run("ev")  # from the watermark minus a day's lookback: two days, one place
    assert "sync_log" not in _materialization_metadata(second.result, "ev_sync_results")
    shown = _check_metadata(second.result, "delivery_complete")["sync_log"].value
    runs_table = shown.split("latest runs")[1]
    assert runs_table.count(second.result.run_id[:8]) == 1
    assert "Success" in runs_table and "Partial success" in runs_table
    assert "No row errors." in shown.split("latest runs")[0]  # the second run rejected nothing new

    # "sync now" (the latest partition alone): the materialization itself carries the log
    fresh = Harness(harness.tmp_path / "other", harness.emulator)
    _events(fresh, n=40, bad=3, name="ev")
    today = dt.datetime.now(UTC).strftime("%Y-%m-%d")
    run = fresh.run("ev", keys=dg.PartitionKeyRange(today, today))
    errors = _materialization_metadata(run.result, "ev_sync_results")["sync_log"].value
    top = errors.split("latest runs")[0]
    assert "| 3 | invalid |" in top and "name" in top


@pytest.fixture
def cli_env(harness, monkeypatch, tmp_path, state_url):
    """The `braze-assets log` command pointed at the harness's project."""
    syncs_file = tmp_path / "syncs.yaml"
    monkeypatch.setenv("BRAZE_ASSETS_HOME", str(tmp_path))
    monkeypatch.setenv("BRAZE_ASSETS_SYNCS", str(syncs_file))
    if state_url:
        monkeypatch.setenv("BRAZE_ASSETS_STATE_URL", state_url)
    else:
        monkeypatch.delenv("BRAZE_ASSETS_STATE_URL", raising=False)

    def write() -> None:
        syncs_file.write_text(yaml.safe_dump({"syncs": harness.syncs}))

    return write


@both_backends
def test_the_log_command_shows_searches_and_exports(harness, cli_env, tmp_path, capsys):
    _events(harness)
    cli_env()
    assert harness.run("ev").result.success

    assert log_command(["runs", "--sync", "ev"]) == 0
    assert "Partial success" in capsys.readouterr().out

    assert log_command(["rows", "--sync", "ev", "--external-id", "user-bad-0"]) == 0
    out = capsys.readouterr().out
    assert out.count("| invalid |") == 1 and "user-bad-0" not in out

    csv_path, parquet_path = tmp_path / "errors.csv", tmp_path / "all.parquet"
    assert (
        log_command(["export", "--sync", "ev", "--format", "csv", "--output", str(csv_path), "--errors"]) == 0
    )
    errors = pacsv.read_csv(csv_path)
    assert errors.num_rows == 2 and set(errors["status"].to_pylist()) == {"invalid"}
    assert "identifier_hash" not in errors.column_names
    assert log_command(["export", "--sync", "ev", "--format", "parquet", "--output", str(parquet_path)]) == 0
    assert pq.read_table(parquet_path).num_rows == 42

    assert log_command(["forget", "--external-id", "user-3"]) == 0
    assert "ev: cleared the details of 1 log rows" in capsys.readouterr().out
    assert log_command(["purge"]) == 0
    assert "ev: cleared the details of 0 rows, deleted 0 run records" in capsys.readouterr().out


def test_the_log_command_names_an_unknown_sync(harness, cli_env, capsys):
    _events(harness)
    cli_env()
    with pytest.raises(SystemExit) as exit_:
        log_command(["runs", "--sync", "nope"])
    assert exit_.value.code == 2
    assert "no sync named 'nope'; syncs: ev" in capsys.readouterr().err


def test_a_state_database_of_the_first_schema_is_upgraded_with_its_rows(postgres):
    from alembic import command
    from alembic.config import Config

    from braze_assets.state import open_state_store
    from braze_assets.state.postgres_schema import StateDatabase, _connect
    from braze_assets_tests.conftest import pg_state_url

    url = pg_state_url(postgres)
    db = StateDatabase.from_url(url)
    import sqlalchemy as sa

    engine = sa.create_engine(
        "postgresql+psycopg2://",
        creator=lambda: _connect(db, "test", autocommit=False),
        poolclass=sa.pool.NullPool,
    )
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{db.schema}"'))
        config = Config()
        config.set_main_option(
            "script_location", str(Path(__file__).parents[1] / "braze_assets" / "state" / "migrations")
        )
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            sa.text(
                "INSERT INTO ledger (sync, row_hash, updated_at, status, identifier, message, run_id, "
                "changed_at) VALUES ('s', 'h1', now(), 'accepted', 'EXTERNAL_ID=use***', NULL, 'r', now())"
            )
        )
        connection.commit()
    engine.dispose()

    store = open_state_store("/nonexistent", "s", state_url=url)
    assert store.log.status_counts() == {"accepted": 1}
    [row] = store.log.rows().to_pylist()
    assert row["row_hash"] == "h1" and row["identifier"] == "EXTERNAL_ID=use***"
    with store.session() as ledger:
        assert ledger.known_hashes(["h1", "h2"]) == {"h1"}
