"""The state interface, run against both backends: the embedded one (DuckDB and files in a temp
dir) and PostgreSQL (a real server, a schema per test). Each test states one promise delivery and
release rely on; the end-to-end runs on both backends are in test_delivery_semantics.py,
test_release_held.py and test_reliability.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from braze_assets.state import StateStore, SyncBusyError, open_state_store
from braze_assets.state.postgres_schema import (
    HEAD_REVISION,
    StateDatabase,
    StateUnreachableError,
    StateUrlError,
)
from braze_assets_tests.conftest import both_backends, pg_state_url

UTC = dt.UTC
T0 = dt.datetime(2024, 5, 1, tzinfo=UTC)
NOTHING_RECOVERED = dict.fromkeys(
    ("recovered_settled", "recovered_ambiguous", "recovered_held", "recovered_unsent"), 0
)


@pytest.fixture
def store(tmp_path, state_url) -> StateStore:
    return open_state_store(tmp_path / "state", "s1", state_url=state_url)


def ledger_rows(hashes: list[str], status: str, at: dt.datetime = T0, run_id: str = "r1") -> pa.Table:
    n = len(hashes)
    return pa.table(
        {
            "row_hash": pa.array(hashes, pa.string()),
            "updated_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
            "status": pa.array([status] * n, pa.string()),
            "batch_id": pa.array([f"{run_id}-0-0"] * n, pa.string()),
            "identifier": pa.array(["u***"] * n, pa.string()),
            "message": pa.array([None if status == "accepted" else "why"] * n, pa.string()),
            "run_id": pa.array([run_id] * n, pa.string()),
        }
    )


def planned_rows(hashes: list[str], batch_ids: list[str], at: dt.datetime = T0) -> pa.Table:
    n = len(hashes)
    return pa.table(
        {
            "row_hash": pa.array(hashes, pa.string()),
            "updated_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
            "batch_id": pa.array(batch_ids, pa.string()),
            "identifier": pa.array(["u***"] * n, pa.string()),
            "run_id": pa.array(["dead"] * n, pa.string()),
        }
    )


@both_backends
def test_known_hashes_filter_by_settle_time_and_updated_at(store):
    with store.session() as ledger:
        ledger.append(ledger_rows(["a", "b"], "accepted", at=T0))
        ledger.append(ledger_rows(["c"], "failed", at=T0 + dt.timedelta(days=3)))
        probe = ["a", "b", "c", "zz"]
        assert ledger.known_hashes(probe) == {"a", "b", "c"}
        assert ledger.known_hashes([]) == set()
        window = (T0 + dt.timedelta(days=1), T0 + dt.timedelta(days=5))
        assert ledger.known_hashes(probe, between=window) == {"c"}
        later = dt.datetime.now(UTC) + dt.timedelta(minutes=1)
        assert ledger.known_hashes(probe, since=later) == set()
        # the delta's question before it hashes a batch: anything settled in its span?
        assert ledger.settled_between(T0, T0)
        assert ledger.settled_between(*window)
        assert not ledger.settled_between(T0 + dt.timedelta(seconds=1), T0 + dt.timedelta(days=2))
    assert store.log.status_counts() == {"accepted": 2, "failed": 1}
    assert store.settled_count(T0, T0 + dt.timedelta(days=1)) == 2
    assert store.settled_count(None, T0 + dt.timedelta(days=4)) == 3


@both_backends
def test_a_transaction_commits_everything_or_nothing(store):
    with store.session() as ledger:
        ledger.plan(planned_rows(["p1", "p2"], ["r1-0-0", "r1-0-1"]))
        with pytest.raises(RuntimeError, match="boom"), ledger.transaction():
            ledger.append(ledger_rows(["p1"], "accepted"))
            ledger.clear_planned("r1-0")
            raise RuntimeError("boom")
        assert ledger.known_hashes(["p1"]) == set(), "rolled back"
        with ledger.transaction():
            ledger.append(ledger_rows(["p1", "p2"], "accepted"))
            ledger.clear_planned("r1-0")
    assert store.log.status_counts() == {"accepted": 2}
    assert store.recover("hold") == NOTHING_RECOVERED


@both_backends
def test_recovery_settles_answered_holds_ambiguous_and_forgets_unsent(store):
    """Three requests planned by a run that died: one answered (one row failed), one started
    without an answer, one never started."""
    with store.session() as ledger:
        ledger.plan(
            planned_rows(["a1", "a2", "b1", "b2", "c1"], ["d-0-0", "d-0-0", "d-0-1", "d-0-1", "d-0-2"])
        )

    async def journal_then_die():
        async with store.journal() as journal:
            await journal.started("d-0-0")
            await journal.done("d-0-0", [("a2", "failed", "bad email")])
            await journal.started("d-0-1")
            raise KeyboardInterrupt  # the journal stays as the crash left it

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(journal_then_die())
    counts = store.recover("hold")
    assert counts == {
        "recovered_settled": 2,
        "recovered_ambiguous": 2,
        "recovered_held": 2,
        "recovered_unsent": 1,
    }
    assert store.log.status_counts() == {"accepted": 1, "failed": 1, "held": 2}
    held = store.held_rows()
    assert {r["row_hash"] for r in held} == {"b1", "b2"}
    assert all(r["message"].startswith("outcome unknown") for r in held)
    with store.session() as ledger:
        assert ledger.known_hashes(["c1"]) == set(), "never sent: sent again later"
    # recovery emptied planned rows and the journal: running it again changes nothing
    assert store.recover("hold") == NOTHING_RECOVERED
    assert store.log.status_counts() == {"accepted": 1, "failed": 1, "held": 2}


@both_backends
def test_recovery_forgets_what_was_remembered_of_users_braze_may_have_changed(store):
    """A run that died after Braze answered (or with a request in flight) leaves those users'
    rows settled or held by recovery, never remembered: what the diff remembers of them may no
    longer be what Braze holds, so recovery forgets it and their next rows go whole. A user whose
    request never went out keeps what is remembered."""
    keys = {"a1": "user-a", "b1": "user-b", "c1": "user-c"}
    with store.session() as ledger:
        ledger.remember(
            pa.table(
                {
                    "user_key": list(keys.values()),
                    "payload_hash": ["x" * 32] * 3,
                    "attributes": ['{"tier":"0011223344556677"}'] * 3,
                    "payload_attributes": pa.array([1] * 3, pa.int32()),
                }
            )
        )
        ledger.merge_remembered()
        planned = planned_rows(["a1", "b1", "c1"], ["d-0-0", "d-0-1", "d-0-2"])
        ledger.plan(planned.append_column("user_key", pa.array(list(keys.values()), pa.string())))

    async def journal_then_die():
        async with store.journal() as journal:
            await journal.started("d-0-0")
            await journal.done("d-0-0", [])
            await journal.started("d-0-1")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(journal_then_die())
    assert store.recover("hold") == {
        "recovered_settled": 1,
        "recovered_ambiguous": 1,
        "recovered_held": 1,
        "recovered_unsent": 1,
    }
    with store.session() as ledger:
        ledger.merge_remembered()
        found = ledger.remembered_table(pa.array(list(keys.values()), pa.string()), True).to_pylist()
    by_user = {row["user_key"]: (row["payload_hash"], row["attributes"]) for row in found}
    assert by_user["user-a"] == (None, "{}"), "accepted by Braze: what it holds is not remembered"
    assert by_user["user-b"] == (None, "{}"), "held: Braze may have applied it"
    assert by_user["user-c"] == ("x" * 32, '{"tier":"0011223344556677"}'), "never sent"


@both_backends
def test_recovery_with_the_resend_policy_forgets_ambiguous_rows(store):
    with store.session() as ledger:
        ledger.plan(planned_rows(["b1"], ["d-0-1"]))

    async def started():
        async with store.journal() as journal:
            await journal.started("d-0-1")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(started())
    assert store.recover("resend")["recovered_ambiguous"] == 1
    assert store.log.status_counts() == {}


@both_backends
def test_a_request_braze_refused_unprocessed_is_sent_again_unless_it_went_out_again(store):
    """A refusal Braze documents as not processed (a 429 while the run waits out its Retry-After)
    leaves nothing of the request on the wire: killed then, its rows are sent again, not held. A
    retry that went out after the refusal is in flight again, so ambiguous; an answer still wins."""
    with store.session() as ledger:
        ledger.plan(planned_rows(["w1", "f1", "a1"], ["d-0-0", "d-0-1", "d-0-2"]))

    async def journal_then_die():
        async with store.journal() as journal:
            for batch in ("d-0-0", "d-0-1", "d-0-2"):
                await journal.started(batch)
                await journal.refused(batch)
            await journal.started("d-0-1")  # its retry went out, and the process died
            await journal.started("d-0-2")
            await journal.done("d-0-2", [])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(journal_then_die())
    assert store.recover("hold") == {
        "recovered_settled": 1,
        "recovered_ambiguous": 1,
        "recovered_held": 1,
        "recovered_unsent": 1,
    }
    assert store.log.status_counts() == {"accepted": 1, "held": 1}
    assert [r["row_hash"] for r in store.held_rows()] == ["f1"]
    with store.session() as ledger:
        assert ledger.known_hashes(["w1"]) == set(), "refused unprocessed: sent again later"


@both_backends
def test_rows_a_dead_run_held_itself_are_counted_held_not_settled(store):
    """The dead run's journaled answer lists rows as held (their answer was lost before the
    crash): recovery counts them held, as the ledger holds them, and only the accepted ones as
    settled; a row listed without a status is sent again."""
    with store.session() as ledger:
        ledger.plan(planned_rows(["h1", "u1", "a1"], ["d-0-0"] * 3))

    async def journal_then_die():
        async with store.journal() as journal:
            await journal.started("d-0-0")
            await journal.done("d-0-0", [("h1", "held", "outcome unknown"), ("u1", None, None)])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(journal_then_die())
    assert store.recover("hold") == {
        "recovered_settled": 1,
        "recovered_ambiguous": 1,
        "recovered_held": 1,
        "recovered_unsent": 1,
    }
    assert store.log.status_counts() == {"accepted": 1, "held": 1}


@both_backends
def test_a_journal_that_ends_cleanly_is_emptied(store):
    with store.session() as ledger:
        ledger.plan(planned_rows(["a1"], ["d-0-0"]))

    async def clean():
        async with store.journal() as journal:
            await asyncio.gather(*(journal.started(f"d-0-{i}") for i in range(50)))

    asyncio.run(clean())
    # planned without a journal record: never sent, so forgotten rather than held
    assert store.recover("hold") == {**NOTHING_RECOVERED, "recovered_unsent": 1}


@both_backends
def test_held_rows_keep_details_and_release_moves_the_watermark_back(store):
    event = b'{"external_id":"u1","name":"open","time":"2024-05-01T00:00:00Z"}'
    with store.session() as ledger:
        rows = ledger_rows(["h1", "h2"], "held", at=T0 + dt.timedelta(hours=2))
        ledger.append(rows.append_column("object", pa.array([event, None], pa.binary())))
        ledger.append(ledger_rows(["ok"], "accepted", at=T0 + dt.timedelta(hours=5)))
    store.commit_watermark(None, T0 + dt.timedelta(hours=6), "r1")
    details = {r["row_hash"]: r for r in store.held_rows()}
    assert details["h1"]["kind"] == "event" and details["h1"]["id_value"] == "u1"
    assert details["h2"]["kind"] is None, "an object that was not kept: no details"
    assert store.mark_held_delivered({"h2": "seen in Braze"}) == 1
    assert store.note_held({"h1": "still unsure"}) == 1
    assert [r["message"] for r in store.held_rows()] == ["still unsure"]
    assert store.log.rows(status="accepted", limit=5)["message"][0].as_py() in ("seen in Braze", None)
    assert store.release_held() == 1
    assert store.read_watermark().value == T0 + dt.timedelta(hours=2) - dt.timedelta(microseconds=1)
    assert store.read_watermark().updated_by_run == "release_held"
    assert store.log.status_counts() == {"accepted": 2}


@both_backends
def test_a_run_never_commits_its_watermark_past_a_release_made_while_it_delivered(store):
    store.commit_watermark(None, T0, "r0")
    before = store.read_watermark().value
    # while run r1 delivers, a person releases held rows: the watermark moves back
    store._write_watermark(type(store.read_watermark())(T0 - dt.timedelta(days=2), "release_held"))
    committed, why = store.commit_watermark(before, T0 + dt.timedelta(days=1), "r1")
    assert committed.value == T0 - dt.timedelta(days=2) and why and "changed while the run delivered" in why
    # no interference: the watermark moves as computed
    committed, why = store.commit_watermark(committed.value, T0 + dt.timedelta(days=1), "r2")
    assert committed.value == T0 + dt.timedelta(days=1) and why is None
    assert store.read_watermark().updated_by_run == "r2"


@both_backends
def test_parts_and_run_history(store):
    assert store.settled_parts() == {} and store.log.last_run() is None
    store.add_settled_parts({"s3://b/a.csv": "etag1"})
    store.add_settled_parts({"s3://b/a.csv": "etag2", "s3://b/b.csv": "etag3"})
    assert store.settled_parts() == {"s3://b/a.csv": "etag2", "s3://b/b.csv": "etag3"}
    store.release_held([])  # nothing released: the files stay settled
    assert len(store.settled_parts()) == 2
    store.release_held()  # released rows' files are read again
    assert store.settled_parts() == {}
    store.log.record_run({"run_id": "r1", "data_type": "events", "accepted": 3})
    store.log.record_run({"run_id": "r2", "data_type": "events", "accepted": 5})
    assert store.log.last_run() == {"run_id": "r2", "data_type": "events", "accepted": 5}


_HOLD_LOCK = """
import sys, time
from braze_assets.state import open_state_store
store = open_state_store(sys.argv[1], "s1", state_url=sys.argv[2] or None)
with store.delivery_lock():
    print("locked", flush=True)
    time.sleep(600)
"""


@both_backends
def test_the_delivery_lock_excludes_other_processes_and_dies_with_its_holder(store, tmp_path, state_url):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLD_LOCK), str(tmp_path / "state"), state_url or ""],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        with pytest.raises(SyncBusyError, match="being delivered by another run"), store.delivery_lock():
            pass
        started = time.monotonic()
        with pytest.raises(SyncBusyError), store.delivery_lock(wait_s=0.5):
            pass
        assert time.monotonic() - started >= 0.5, "waited as asked"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with store.delivery_lock(wait_s=10):  # released by the OS / the server when its holder died
        pass


def test_a_bad_state_url_is_refused_with_a_clear_message():
    with pytest.raises(StateUrlError, match=r"must be a postgresql:// URL.*mysql://u@h/db"):
        StateDatabase.from_url("mysql://u:secret@h/db")
    with pytest.raises(StateUrlError, match="schema 'Bad-Name'"):
        StateDatabase.from_url("postgresql://u@h/db?schema=Bad-Name")


def test_a_state_database_that_cannot_be_reached_is_named_without_its_password():
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StateUnreachableError) as caught:
        open_state_store(
            "/nonexistent", "s1", state_url=f"postgresql://u:hunter2@127.0.0.1:{port}/db"
        ).read_watermark()
    message = str(caught.value)
    assert message.startswith("BRAZE_ASSETS_STATE_URL: cannot connect to the state database"), message
    assert f"127.0.0.1:{port}" in message and "hunter2" not in message


def test_migrations_run_once_when_processes_start_together(postgres):
    url = pg_state_url(postgres)
    script = (
        "import sys; from braze_assets.state import open_state_store; "
        "print(open_state_store('/nonexistent', 'x', state_url=sys.argv[1]).log.status_counts())"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e.decode()[-2000:] for _, e in outputs]
    db = StateDatabase.from_url(url)
    connection = db.connect("test")
    with connection.cursor() as cursor:
        cursor.execute("SELECT version_num FROM alembic_version")
        assert cursor.fetchall() == [(HEAD_REVISION,)]
        cursor.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
            (db.schema,),
        )
        tables = [r[0] for r in cursor.fetchall()]
    connection.close()
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from braze_assets.state import postgres_schema

    config = Config()
    config.set_main_option("script_location", str(Path(postgres_schema.__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head == postgres_schema.HEAD_REVISION, "HEAD_REVISION names the newest migration"
    assert tables == [
        "alembic_version",
        "held_details",
        "journal",
        "ledger",
        "planned",
        "rate_budget",
        "remembered_attributes",
        "runs",
        "settled_parts",
        "watermarks",
    ]


def test_a_journal_written_before_refusals_were_recorded_is_recovered_after_the_upgrade(postgres):
    """A state schema at revision 0004 (no `R` records) holding a dead run's journal: the next
    process migrates it and recovery reads the old records as before."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    from braze_assets.state import postgres_schema

    url = pg_state_url(postgres)
    db = StateDatabase.from_url(url)
    engine = sa.create_engine(
        "postgresql+psycopg2://",
        creator=lambda: postgres_schema._connect(db, "test", autocommit=False),
        poolclass=sa.pool.NullPool,
    )
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{db.schema}"'))
        config = Config()
        config.set_main_option("script_location", str(Path(postgres_schema.__file__).parent / "migrations"))
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        connection.execute(
            sa.text(
                "INSERT INTO journal (sync, batch_id, kind, record) VALUES "
                "('s1', 'd-0-0', 'S', NULL), ('s1', 'd-0-1', 'S', NULL), ('s1', 'd-0-0', 'D', "
                """'{"batch": "d-0-0", "rows": [["a2", "failed", "bad"]], "others": "accepted"}')"""
            )
        )
        connection.commit()
    engine.dispose()

    store = open_state_store("/nonexistent", "s1", state_url=url)
    with store.session() as ledger:
        ledger.plan(planned_rows(["a1", "a2", "b1"], ["d-0-0", "d-0-0", "d-0-1"]))
    assert store.recover("hold") == {
        "recovered_settled": 2,
        "recovered_ambiguous": 1,
        "recovered_held": 1,
        "recovered_unsent": 0,
    }
    assert store.log.status_counts() == {"accepted": 1, "failed": 1, "held": 1}


def test_a_batch_of_unsent_rows_goes_straight_into_the_embedded_ledger_file(tmp_path):
    """Delivery settles the rows it never sends (invalid, unchanged: a restamped snapshot's
    nearly every row) `UNSENT_BATCH_ROWS` at a time. The embedded ledger (DuckDB) writes an
    append that big straight into its file; a smaller one would go through its write-ahead log
    and be written a second time when the log is folded."""
    from braze_assets.delivery import UNSENT_BATCH_ROWS
    from braze_assets.delivery_rows import unsent_rows
    from braze_assets.state import EmbeddedStateStore

    n = UNSENT_BATCH_ROWS
    stamp = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = pa.table(
        {
            "row_hash": pa.array([f"{i:032x}" for i in range(n)]),
            "updated_at": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
            "identifier": pa.array(["EXTERNAL_ID=m***"] * n),
            "identifier_hash": pa.array([f"{i:016x}" for i in range(n)]),
        }
    )
    store = EmbeddedStateStore(tmp_path / "state", "unsent")
    with store.session() as ledger:
        ledger.append(unsent_rows(rows, "unchanged", pa.nulls(n, pa.string()), "run-1"))
        wal = Path(f"{store.db_path}.wal")
        logged = wal.stat().st_size if wal.exists() else 0
        assert logged < 1_000_000, f"{logged:,} bytes of {n:,} rows went through the write-ahead log"
    assert store.settled_count(None, stamp + dt.timedelta(seconds=1)) == n  # all of them, once
