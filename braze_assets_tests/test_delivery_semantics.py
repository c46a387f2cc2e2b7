"""Delivery semantics (docs/architecture.md, Delivery guarantees), each against the emulator over
real HTTP with a real DuckDB file."""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg
import pytest

from braze_assets_tests.conftest import both_backends, cdi_row, earlier_today, events_rows, seqs, sync_config

UTC = dt.UTC


def _now() -> dt.datetime:
    return dt.datetime.now(UTC).replace(microsecond=0)


@both_backends
def test_same_updated_at_rows_added_later_are_delivered_once(harness, emulator):
    ts = _now() - dt.timedelta(hours=3)
    harness.table("ev", events_rows(5, ts))
    harness.syncs = [sync_config("ev_sync", "events", "main.ev")]
    first = harness.run("ev_sync")
    assert first.result.success and first.outcome.accepted == 5
    assert harness.watermark("ev_sync") == ts

    harness.table("ev", events_rows(1, ts, start=5))  # same UPDATED_AT as the watermark
    second = harness.run("ev_sync")
    assert second.outcome.accepted == 1, "only the new row goes out, not all rows at that time"
    assert second.delta.already_settled == 5
    assert seqs(emulator) == [0, 1, 2, 3, 4, 5]

    third = harness.run("ev_sync")
    assert third.outcome.accepted == 0 and seqs(emulator) == [0, 1, 2, 3, 4, 5]


@both_backends
def test_late_rows_inside_lookback_go_out_older_ones_are_counted_then_backfilled(harness, emulator):
    now = _now()
    harness.table("ev", events_rows(3, now - dt.timedelta(hours=1)))
    harness.syncs = [sync_config("ev_sync", "events", "main.ev", lookback="P2D")]
    assert harness.run("ev_sync").outcome.accepted == 3
    watermark = harness.watermark("ev_sync")

    late_inside = watermark - dt.timedelta(days=1)
    late_outside = watermark - dt.timedelta(days=6)
    harness.table("ev", events_rows(1, late_inside, start=3) + events_rows(1, late_outside, start=4))
    run = harness.run("ev_sync")
    assert run.outcome.accepted == 1 and 3 in seqs(emulator) and 4 not in seqs(emulator)
    assert run.delta.late_outside_lookback == 1
    assert run.result.success
    # rows left undelivered are said: the run is not a plain success, and says what to do
    assert run.outcome.status == "partial_success"
    assert "1 late rows older than the lookback not sent (backfill their days)" in run.outcome.status_detail
    assert harness.watermark("ev_sync") == watermark, "the watermark does not move past a gap"

    day = late_outside.strftime("%Y-%m-%d")
    backfill = harness.run("ev_sync", keys=dg.PartitionKeyRange(day, day))
    assert backfill.outcome.accepted == 1 and seqs(emulator) == [0, 1, 2, 3, 4]
    assert harness.run("ev_sync").delta.late_outside_lookback == 0


def test_future_rows_are_held_back_and_the_watermark_never_passes_now(harness, emulator):
    now = _now()
    rows = events_rows(2, now - dt.timedelta(minutes=30))
    rows.append(
        cdi_row(
            (now + dt.timedelta(hours=6)).replace(tzinfo=None),
            json.dumps({"name": "app_open", "properties": {"seq": 99}}),
            external_id="from-the-future",
        )
    )
    harness.table("ev", rows)
    harness.syncs = [sync_config("ev_sync", "events", "main.ev")]
    run = harness.run("ev_sync")
    assert run.outcome.accepted == 2 and 99 not in seqs(emulator)
    assert run.delta.future_rows == 1
    assert "future" in run.delta.future_examples[0]["reason"]
    assert run.delta.future_examples[0]["identifier"] == "EXTERNAL_ID=fro***"
    assert harness.watermark("ev_sync") <= dt.datetime.now(UTC)


@both_backends
def test_partial_success_fails_only_the_rows_braze_names(harness, emulator):
    ts = (_now() - dt.timedelta(hours=2)).replace(tzinfo=None)
    rows = [
        cdi_row(ts, json.dumps({"email": f"u{i}@example.com", "n": i}), external_id=f"u{i}")
        for i in range(10)
    ]
    rows[3] = cdi_row(ts, json.dumps({"email": "not-an-email", "n": 3}), external_id="u3")
    harness.table("attrs", rows)
    harness.syncs = [sync_config("attr_sync", "attributes", "main.attrs")]
    run = harness.run("attr_sync")
    assert run.outcome.accepted == 9 and run.outcome.failed == 1
    assert run.outcome.failed_examples[0]["message"] == (
        "The value provided for the 'email' field is not a valid email."
    )
    profiles = {p.get("external_id") for p in emulator.store.profiles()}
    assert "u3" not in profiles and {"u0", "u9"} <= profiles
    assert harness.ledger("attr_sync") == {"accepted": 9, "failed": 1}
    assert harness.run("attr_sync").outcome.requests == 0, "a definitive failure is not resent"


@both_backends
def test_bad_rows_are_reported_with_reasons_and_never_sent(harness, emulator):
    ts = (_now() - dt.timedelta(hours=2)).replace(tzinfo=None)
    good = json.dumps({"product_id": "sku", "currency": "EUR", "price": 3.5, "properties": {"seq": 1}})
    rows = [
        cdi_row(ts, good, external_id="ok"),
        cdi_row(
            ts, json.dumps({"product_id": "sku", "currency": "EURO", "price": 1}), external_id="bad-currency"
        ),
        cdi_row(
            ts,
            json.dumps({"product_id": "sku", "currency": "EUR", "price": 1, "quantity": 101}),
            external_id="bad-qty",
        ),
    ]
    harness.table("pur", rows)
    harness.syncs = [sync_config("pur_sync", "purchases", "main.pur", max_row_error_rate=0.9)]
    run = harness.run("pur_sync")
    assert run.delta.rejected == 2 and run.outcome.accepted == 1
    assert run.delta.rejected_reasons == {
        "purchase 'currency' is not an ISO 4217 currency code": 1,
        "purchase 'quantity' must be a whole number from 1 to 100": 1,
    }
    assert seqs(emulator, "purchases") == [1]
    assert harness.ledger("pur_sync") == {"accepted": 1, "invalid": 2}
    again = harness.run("pur_sync")
    assert again.delta.rejected == 0, "a rejected row is reported once, not on every run"


@both_backends
def test_row_error_rate_check_blocks_delivery_and_changes_no_state(harness, emulator):
    ts = earlier_today(dt.timedelta(hours=2)).replace(tzinfo=None)
    rows = events_rows(20, ts) + [cdi_row(ts, "{broken", external_id=f"b{i}") for i in range(20)]
    harness.table("ev", rows)
    harness.syncs = [sync_config("ev_sync", "events", "main.ev", max_row_error_rate=0.2)]
    run = harness.run("ev_sync")
    assert not run.result.success and run.outcome is None
    failed = [e for e in run.result.get_asset_check_evaluations() if not e.passed]
    assert {e.check_name for e in failed} >= {"row_error_rate"}
    [check] = [e for e in failed if e.check_name == "row_error_rate"]
    assert check.description == "20 of 40 rows rejected (50.0%); threshold 20%"
    assert emulator.store.stats()["events"] == 0
    assert harness.ledger("ev_sync") == {} and harness.watermark("ev_sync") is None


def test_row_error_rate_does_not_judge_a_tiny_sample(harness, emulator):
    """1 bad row of 3 is 33%, but no trend: below min_rows_for_error_rate the check passes and
    says why; the bad row is still rejected and listed, the good ones go out."""
    ts = earlier_today(dt.timedelta(hours=2)).replace(tzinfo=None)
    harness.table("ev", events_rows(2, ts) + [cdi_row(ts, "{broken", external_id="b0")])
    harness.syncs = [sync_config("ev_sync", "events", "main.ev", max_row_error_rate=0.2)]
    run = harness.run("ev_sync")
    assert run.result.success and run.outcome.accepted == 2
    [check] = [e for e in run.result.get_asset_check_evaluations() if e.check_name == "row_error_rate"]
    assert check.passed
    assert check.description == (
        "1 of 3 rows rejected (33.3%); threshold 20%; not judged below 20 rows "
        "(min_rows_for_error_rate): the rejected rows are listed, never sent"
    )


def test_mass_deletion_guard_blocks_then_passes_within_ceiling(harness, emulator):
    ts = (_now() - dt.timedelta(hours=2)).replace(tzinfo=None)
    harness.table("del", [cdi_row(ts, external_id=f"gone-{i}") for i in range(8)], payload=False)
    harness.syncs = [sync_config("del_sync", "deletions", "main.del", max_deletions=5)]
    blocked = harness.run("del_sync")
    assert not blocked.result.success and emulator.store.deletions() == []
    assert harness.ledger("del_sync") == {}
    harness.syncs = [sync_config("del_sync", "deletions", "main.del", max_deletions=8)]
    ok = harness.run("del_sync")
    assert ok.outcome.accepted == 8
    assert sorted(d["id"] for d in emulator.store.deletions()) == sorted(f"gone-{i}" for i in range(8))


def test_old_delta_files_are_pruned_but_outcomes_stay_in_the_ledger(harness, emulator):
    ts = _now() - dt.timedelta(hours=2)
    harness.syncs = [sync_config("ev_sync", "events", "main.ev")]
    for n in range(7):
        harness.table("ev", events_rows(1, ts, start=n))
        assert harness.run("ev_sync").outcome.accepted == 1
    runs = list((harness.state_dir / "deltas" / "ev_sync").iterdir())
    assert len(runs) == 5
    assert harness.ledger("ev_sync") == {"accepted": 7} and seqs(emulator) == list(range(7))


def test_a_ledger_of_the_keyed_layout_is_migrated_with_its_planned_rows(tmp_path):
    """Ledgers kept a PRIMARY KEY with `planned` rows inline; opening one moves them to the
    append-only layout, and recovery still settles what the journal knows."""
    import duckdb

    from braze_assets.state import EmbeddedStateStore

    store = EmbeddedStateStore(tmp_path, "old")
    with duckdb.connect(str(store.db_path)) as con:
        con.execute(
            "CREATE TABLE ledger (row_hash VARCHAR PRIMARY KEY, updated_at TIMESTAMPTZ, "
            "status VARCHAR NOT NULL, batch_id VARCHAR, identifier VARCHAR, message VARCHAR, "
            "run_id VARCHAR, changed_at TIMESTAMPTZ NOT NULL)"
        )
        con.execute(
            "INSERT INTO ledger VALUES ('a', now(), 'accepted', 'r-0', 'x', NULL, 'r', now()),"
            " ('b', now(), 'planned', 'r-1', 'y', NULL, 'r', now()),"
            " ('c', now(), 'planned', 'r-2', 'z', NULL, 'r', now())"
        )
    store.journal_path.write_text('S r-1\nD {"batch": "r-1", "rows": [["b", "failed", "bad"]]}\nS r-2\n')
    with store.delivery_lock():
        counts = store.recover("hold")
    assert counts == {
        "recovered_settled": 1,
        "recovered_ambiguous": 1,
        "recovered_held": 1,
        "recovered_unsent": 0,
    }
    assert store.log.status_counts() == {"accepted": 1, "failed": 1, "held": 1}
    with store.connect() as con:
        assert con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'ledger' "
            "AND constraint_type = 'PRIMARY KEY'"
        ).fetchall() == [(0,)]
        assert sorted(con.execute("SELECT row_hash FROM ledger").fetchall()) == [("a",), ("b",), ("c",)]


def test_planned_rows_of_a_ledger_without_user_keys_are_recovered(tmp_path):
    """Ledgers written before planned rows kept the diff's user key: the column is added when
    one is opened, and recovery settles their planned rows as before."""
    import duckdb

    from braze_assets.state import EmbeddedStateStore
    from braze_assets.state.embedded_ledger import SCHEMA

    store = EmbeddedStateStore(tmp_path, "older")
    with duckdb.connect(str(store.db_path)) as con:
        con.execute(
            SCHEMA.replace(
                ",\n    user_key   VARCHAR  -- the diff's user (attributes syncs), forgotten by recovery", ""
            )
        )
        assert "user_key" not in [c[0] for c in con.execute("DESCRIBE planned").fetchall()]
        con.execute(
            "INSERT INTO planned VALUES ('b', now(), 'r-1', 'y', 'r', NULL), "
            "('c', now(), 'r-2', 'z', 'r', NULL)"
        )
    store.journal_path.write_text('S r-1\nD {"batch": "r-1", "rows": [], "others": "accepted"}\nS r-2\n')
    with store.delivery_lock():
        assert store.recover("hold") == {
            "recovered_settled": 1,
            "recovered_ambiguous": 1,
            "recovered_held": 1,
            "recovered_unsent": 0,
        }
    assert store.log.status_counts() == {"accepted": 1, "held": 1}
    with store.connect() as con:
        assert "user_key" in [c[0] for c in con.execute("DESCRIBE planned").fetchall()]


@both_backends
def test_materializing_the_latest_partition_syncs_everything_pending(harness, emulator):
    """The UI's default Materialize selects only the latest partition: like CDI's "Sync now" it
    delivers every pending row (watermark minus lookback .. now), not only today's."""
    now = _now()
    older = [(now - dt.timedelta(days=d)).replace(tzinfo=None) for d in (5, 3, 1)]
    harness.table("ev", [row for n, ts in enumerate(older) for row in events_rows(10, ts, start=10 * n)])
    harness.syncs = [sync_config("ev_sync", "events", "main.ev")]
    today = now.strftime("%Y-%m-%d")
    run = harness.run("ev_sync", keys=dg.PartitionKeyRange(today, today))
    assert run.result.success and run.outcome.accepted == 30
    assert len(emulator.store.events()) == 30
    # a date range picked on purpose (a backfill) still re-evaluates only those days
    harness.table("ev", events_rows(5, older[0], start=100))  # late rows, 5 days back
    day = (now - dt.timedelta(days=3)).strftime("%Y-%m-%d")
    backfill = harness.run("ev_sync", keys=dg.PartitionKeyRange(day, today))
    assert backfill.delta.rows_read == 20 and backfill.outcome.accepted == 0


def test_a_run_without_a_partition_fails_with_what_to_do(harness, emulator):
    """Launched from the Launchpad without choosing a partition: a clear message saying how to
    launch it, not an internal check error, and nothing sent."""
    harness.table("events", events_rows(3, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)))
    harness.syncs = [sync_config("ev_sync", "events", "main.events")]
    job = harness.definitions().resolve_job_def("ev_sync_job")
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.step_failure_data.error.message
    assert "ev_sync" in message and "partition" in message and "CheckError" not in message
    assert "Materialize" in message
    assert emulator.store.events() == [] and harness.ledger("ev_sync") == {}


def test_sync_now_reads_from_the_same_day_a_scheduled_tick_does(harness, emulator):
    """A tick runs over whole days, from the day of (watermark minus lookback): "sync now" reads
    from the start of that day too, so a late row earlier that day is sent by either."""
    now = _now()
    harness.syncs = [sync_config("ev_sync", "events", "main.ev", lookback="P1D")]
    harness.table("ev", events_rows(3, now - dt.timedelta(minutes=30)))
    today = now.strftime("%Y-%m-%d")
    assert harness.run("ev_sync", keys=dg.PartitionKeyRange(today, today)).outcome.accepted == 3
    start = harness.watermark("ev_sync") - dt.timedelta(days=1)  # yesterday, after midnight
    late = start.replace(hour=0, minute=0, second=1)
    if late >= start:
        pytest.skip("the watermark minus the lookback is the start of its day: nothing to tell apart")
    harness.table("ev", events_rows(1, late, start=3))
    run = harness.run("ev_sync", keys=dg.PartitionKeyRange(today, today))
    assert run.delta.late_outside_lookback == 0
    assert run.outcome.accepted == 1 and len(emulator.store.events()) == 4
