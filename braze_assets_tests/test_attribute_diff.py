"""Pay Braze only for what changed: an attributes sync sends only the attributes whose value
differs from what Braze last accepted from it, settles rows with nothing new as `unchanged`, and
remembers only what Braze accepted."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import dagster as dg
import duckdb
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braze_assets.attribute_diff import AttributeDiff, Remembered
from braze_assets.config import ConfigError, parse_syncs
from braze_assets.seed import cdi_row
from braze_assets.state import EmbeddedStateStore
from braze_assets_tests.conftest import Harness, both_backends, sync_config

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)


# ----------------------------------------------------------------------------- the diff itself
def _remembered(payload: dict, diff: AttributeDiff | None = None) -> Remembered:
    trimmed = (diff or AttributeDiff()).trim(payload, None)
    return Remembered("h", trimmed.remember, trimmed.sent)


def test_nothing_remembered_sends_every_attribute():
    trimmed = AttributeDiff().trim({"plan": "gold", "age": 41, "_update_existing_only": False}, None)
    assert trimmed.payload == {"plan": "gold", "age": 41, "_update_existing_only": False}
    assert (trimmed.sent, trimmed.saved, trimmed.unchanged) == (2, 0, False)


def test_only_changed_attributes_are_sent():
    before = _remembered({"plan": "gold", "age": 41, "tags": ["a", "b"], "address": {"city": "Oslo"}})
    trimmed = AttributeDiff().trim(
        {"plan": "gold", "age": 42, "tags": ["a", "b"], "address": {"city": "Oslo"}}, before
    )
    assert trimmed.payload == {"age": 42}
    assert (trimmed.sent, trimmed.saved, trimmed.unchanged) == (1, 3, False)
    same = AttributeDiff().trim({"address": {"city": "Oslo"}, "tags": ["a", "b"], "plan": "gold"}, before)
    assert same.payload == {} and same.unchanged and same.saved == 3


def test_a_null_is_sent_unless_the_last_accepted_value_was_null():
    before = _remembered({"plan": "gold", "coupon": None})
    trimmed = AttributeDiff().trim({"plan": None, "coupon": None, "referrer": None}, before)
    # plan was set: cleared; coupon was null already: saved; referrer never seen: sent to be sure
    assert trimmed.payload == {"plan": None, "referrer": None}
    assert (trimmed.sent, trimmed.saved) == (2, 1)


def test_operators_subscription_groups_and_listed_keys_are_always_sent():
    diff = AttributeDiff(always_send=["last_seen"])
    payload = {
        "visits": {"inc": 1},
        "pets": {"add": ["cat"]},
        "orders": {"$update": [{"$identifier_key": "id", "$identifier_value": 1, "$new_object": {}}]},
        "subscription_groups": [{"subscription_group_id": "g", "subscription_state": "subscribed"}],
        "last_seen": "2026-01-01",
        "plan": "gold",
        "_merge_objects": True,
    }
    before = _remembered(payload, diff)
    trimmed = diff.trim(payload, before)
    assert set(trimmed.payload) == set(payload) - {"plan"}
    assert (trimmed.sent, trimmed.saved, trimmed.unchanged) == (5, 1, False)
    assert set(orjson.loads(trimmed.remember)) == {"plan"}  # what Braze holds of the others is unknown


# ----------------------------------------------------------------------------- end to end
class Spy:
    """What the emulator accepted, object by object (a pass-through on its own store)."""

    def __init__(self, braze) -> None:
        self.objects: list[dict] = []
        original = braze.store.record_track

        def record(accepted, rejected):
            self.objects += [obj for _, obj, _ in accepted]
            return original(accepted, rejected)

        braze.store.record_track = record

    def take(self) -> list[dict]:
        taken, self.objects = self.objects, []
        return taken


def _users(n: int, at: dt.datetime, change: dict[int, dict] | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        payload = {"plan": "silver", "age": 30 + i, "city": "Oslo", "vip": False}
        payload.update((change or {}).get(i, {}))
        rows.append(cdi_row(at.replace(tzinfo=None), json.dumps(payload), external_id=f"user-{i:03d}"))
    return rows


def _attrs(objects: list[dict]) -> dict[str, dict]:
    return {o["external_id"]: {k: v for k, v in o.items() if k not in ("external_id",)} for o in objects}


@both_backends
def test_a_restamped_snapshot_sends_only_what_changed(harness, emulator):
    spy = Spy(emulator)
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(50, NOW - dt.timedelta(hours=3)))
    first = harness.run("users")
    assert first.outcome.accepted == 50 and first.outcome.estimated_data_points == 200
    assert len(spy.take()) == 50

    # every row restamped, nothing changed: nothing goes out, every row is settled as unchanged
    harness.table("users", _users(50, NOW - dt.timedelta(hours=2)))
    instance = dg.DagsterInstance.ephemeral()
    second = harness.run("users", instance=instance)
    assert second.result.success and spy.take() == []
    said = [entry.user_message for entry in instance.all_logs(second.result.run_id)]
    assert any("0 to send, 50 unchanged since Braze accepted them (not sent)" in m for m in said)
    assert (second.outcome.unchanged, second.outcome.accepted) == (50, 0)
    assert second.outcome.data_points_saved == 200 and second.outcome.estimated_data_points == 0
    assert second.outcome.status == "success" and "nothing sent" in second.outcome.status_detail
    assert harness.ledger("users") == {"accepted": 50, "unchanged": 50}

    # restamped again, one attribute changed for three users: three objects of one attribute
    changes = {3: {"plan": "gold"}, 7: {"age": 99}, 9: {"city": None}}
    harness.table("users", _users(50, NOW - dt.timedelta(hours=1), changes))
    third = harness.run("users")
    sent = _attrs(spy.take())
    assert sent == {
        "user-003": {"plan": "gold", "_update_existing_only": False},
        "user-007": {"age": 99, "_update_existing_only": False},
        "user-009": {"city": None, "_update_existing_only": False},
    }
    assert (third.outcome.accepted, third.outcome.unchanged) == (3, 47)
    assert third.outcome.estimated_data_points == 3
    assert third.outcome.data_points_saved == 47 * 4 + 3 * 3
    profiles = {p["external_id"]: p for p in emulator.store.profiles()}
    assert profiles["user-003"]["attributes"]["plan"] == "gold"
    assert profiles["user-009"]["attributes"].get("city") is None
    assert profiles["user-004"]["attributes"] == {"plan": "silver", "age": 34, "city": "Oslo", "vip": False}


@both_backends
def test_only_what_braze_accepted_is_remembered(harness, emulator):
    spy = Spy(emulator)
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(2, NOW - dt.timedelta(hours=3)))
    assert harness.run("users").outcome.accepted == 2
    spy.take()
    # user-000's new plan rides with an increment Braze refuses: the row fails, nothing remembered
    bad = {0: {"plan": "gold", "visits": {"inc": "one"}}}
    harness.table("users", _users(2, NOW - dt.timedelta(hours=2), bad))
    failed = harness.run("users")
    assert failed.outcome.failed == 1 and failed.outcome.unchanged == 1
    spy.take()
    harness.table("users", _users(2, NOW - dt.timedelta(hours=1), {0: {"plan": "gold"}}))
    fixed = harness.run("users")
    assert _attrs(spy.take()) == {"user-000": {"plan": "gold", "_update_existing_only": False}}
    assert fixed.outcome.accepted == 1


@both_backends
def test_after_a_crash_the_users_of_requests_in_flight_go_whole(harness, emulator):
    """A run died with user-000's "gold" request sent and unanswered. The next run's delta comes
    before its delivery recovers that request, and the snapshot is back at "silver", which is
    what the diff remembers: Braze may hold "gold", so the row goes whole, and is not unchanged."""
    import pyarrow as pa

    from braze_assets.attribute_diff import user_key

    spy = Spy(emulator)
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(3, NOW - dt.timedelta(hours=3)))
    assert harness.run("users").outcome.accepted == 3
    spy.take()
    store = harness.delivery_state().store("users")
    with store.session() as ledger:  # the dead run's request, planned and started (journaled)
        ledger.plan(
            pa.table(
                {
                    "row_hash": ["gold-row"],
                    "updated_at": pa.array([NOW - dt.timedelta(hours=2)], pa.timestamp("us", tz="UTC")),
                    "batch_id": ["dead-0-0"],
                    "identifier": ["EXTERNAL_ID=us***"],
                    "run_id": ["dead"],
                    "user_key": [user_key({"EXTERNAL_ID": "user-000"})],
                }
            )
        )

    async def started_then_died():
        async with store.journal() as journal:
            await journal.started("dead-0-0")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(started_then_died())
    harness.table("users", _users(3, NOW - dt.timedelta(hours=1)))  # restamped, back at silver
    after = harness.run("users")
    assert after.outcome.recovered_ambiguous == 1
    assert (after.outcome.accepted, after.outcome.unchanged) == (1, 2)
    assert _attrs(spy.take()) == {
        "user-000": {
            "plan": "silver",
            "age": 30,
            "city": "Oslo",
            "vip": False,
            "_update_existing_only": False,
        }
    }


def test_full_payload_sends_every_row_whole(harness, emulator):
    spy = Spy(emulator)
    harness.syncs = [sync_config("users", "attributes", "main.users", send="full_payload")]
    harness.table("users", _users(5, NOW - dt.timedelta(hours=2)))
    harness.run("users")
    harness.table("users", _users(5, NOW - dt.timedelta(hours=1)))
    again = harness.run("users")
    assert again.outcome.accepted == 5 and again.outcome.unchanged == 0
    assert len(spy.objects) == 10 and all(len(o) == 6 for o in spy.objects)


@both_backends
def test_switching_to_full_payload_and_back_sends_what_braze_no_longer_holds(harness, emulator):
    """`send: full_payload` sends rows whole and remembers nothing: what was remembered before is
    forgotten when such a run sends, so switching back to `changed` cannot take a value Braze
    was since given for one it still holds."""
    spy = Spy(emulator)

    def run(send: str, plan: str, hours: int):
        harness.syncs = [sync_config("users", "attributes", "main.users", send=send)]
        stamp = (NOW - dt.timedelta(hours=hours)).replace(tzinfo=None)
        harness.table("users", [cdi_row(stamp, json.dumps({"plan": plan}), external_id="u-1")])
        return harness.run("users")

    assert run("changed", "X", 3).outcome.accepted == 1
    assert run("full_payload", "A", 2).outcome.accepted == 1
    back = run("changed", "X", 1)
    assert (back.outcome.accepted, back.outcome.unchanged) == (1, 0)
    [profile] = emulator.store.profiles()
    assert profile["attributes"]["plan"] == "X", spy.take()


def test_an_update_only_row_is_sent_again_once_its_user_exists(harness, emulator):
    """With `_update_existing_only`, Braze accepts a row for a user it does not have and applies
    nothing, and nothing in its answer says so: such a row's attributes are not remembered, so
    once the user exists the same values still go."""
    harness.syncs = [
        sync_config("members", "attributes", "main.members", update_existing_only=True),
        sync_config("signups", "attributes", "main.signups"),
    ]

    def members(hours: int) -> None:
        stamp = (NOW - dt.timedelta(hours=hours)).replace(tzinfo=None)
        harness.table("members", [cdi_row(stamp, json.dumps({"plan": "X"}), external_id="u-1")])

    members(3)
    assert harness.run("members").outcome.accepted == 1
    assert emulator.store.profiles() == []  # accepted, applied to nobody
    stamp = (NOW - dt.timedelta(hours=2)).replace(tzinfo=None)
    harness.table("signups", [cdi_row(stamp, json.dumps({"city": "C"}), external_id="u-1")])
    assert harness.run("signups").outcome.accepted == 1
    members(1)
    again = harness.run("members")
    assert (again.outcome.accepted, again.outcome.unchanged) == (1, 0)
    [profile] = emulator.store.profiles()
    assert profile["attributes"] == {"city": "C", "plan": "X"}


@pytest.mark.parametrize("field", ["send", "always_send"])
def test_the_diff_settings_are_refused_on_other_data_types(field):
    value = "changed" if field == "send" else ["x"]
    with pytest.raises(ConfigError, match=f"{field} applies to attributes syncs only"):
        parse_syncs({"syncs": [sync_config("ev", "events", "main.ev", **{field: value})]})


def test_a_user_seen_twice_in_one_run_is_remembered_from_the_newest_row(tmp_path, emulator):
    harness = Harness(tmp_path, emulator)
    spy = Spy(emulator)
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    older, newer = NOW - dt.timedelta(hours=3), NOW - dt.timedelta(hours=2)
    harness.table(
        "users",
        [
            cdi_row(older.replace(tzinfo=None), json.dumps({"plan": "silver"}), external_id="u-1"),
            cdi_row(newer.replace(tzinfo=None), json.dumps({"plan": "gold"}), external_id="u-1"),
        ],
    )
    assert harness.run("users").outcome.accepted == 2
    spy.take()
    harness.table(
        "users",
        [
            cdi_row(
                NOW.replace(tzinfo=None) - dt.timedelta(minutes=30),
                json.dumps({"plan": "gold"}),
                external_id="u-1",
            )
        ],
    )
    again = harness.run("users")
    assert again.outcome.unchanged == 1 and spy.take() == []


@both_backends
def test_a_user_with_several_rows_in_a_run_ends_at_the_newest_row_in_braze(harness, emulator):
    """Rows of one user in one run are not each diffed against what was accepted before the run:
    a value that changes and changes back within the run (X, then A, then X again) ends at the
    newest row's value in Braze, and what is remembered is what Braze then holds."""
    spy = Spy(emulator)
    harness.syncs = [sync_config("users", "attributes", "main.users")]

    def rows(*stamped: tuple[dt.timedelta, dict]) -> list[dict]:
        return [
            cdi_row((NOW - ago).replace(tzinfo=None), json.dumps(payload), external_id="u-1")
            for ago, payload in stamped
        ]

    harness.table("users", rows((dt.timedelta(hours=5), {"plan": "X", "city": "C"})))
    assert harness.run("users").outcome.accepted == 1
    spy.take()
    harness.table(
        "users",
        rows(
            (dt.timedelta(hours=3), {"plan": "A", "city": "D"}),
            (dt.timedelta(hours=2), {"plan": "X", "city": "D"}),
        ),
    )
    second = harness.run("users")
    assert second.result.success
    [profile] = emulator.store.profiles()
    assert profile["attributes"] == {"plan": "X", "city": "D"}, spy.take()
    spy.take()
    harness.table("users", rows((dt.timedelta(hours=1), {"plan": "X", "city": "C"})))
    harness.run("users")
    [profile] = emulator.store.profiles()
    assert profile["attributes"] == {"plan": "X", "city": "C"}


@both_backends
def test_a_restamped_row_with_an_operator_sends_it_again(harness, emulator):
    """A PAYLOAD exactly as Braze last accepted it is unchanged only if all of it is plain values:
    an increment, `subscription_groups` or an `always_send` key in it is sent again, as it is."""
    spy = Spy(emulator)
    harness.syncs = [sync_config("users", "attributes", "main.users", always_send=["last_seen"])]
    payload = json.dumps({"plan": "X", "visits": {"inc": 1}, "last_seen": "2026-01-01"})
    for hours in (3, 2):
        stamp = (NOW - dt.timedelta(hours=hours)).replace(tzinfo=None)
        harness.table("users", [cdi_row(stamp, payload, external_id="u-1")])
        run = harness.run("users")
        assert (run.outcome.accepted, run.outcome.unchanged) == (1, 0)
    sent = _attrs(spy.take())
    assert sent == {"u-1": {"visits": {"inc": 1}, "last_seen": "2026-01-01", "_update_existing_only": False}}
    [profile] = emulator.store.profiles()
    assert profile["attributes"]["visits"] == 2


@both_backends
def test_a_key_added_to_always_send_goes_out_though_the_payload_was_accepted_as_it_is(harness, emulator):
    """A PAYLOAD remembered before `always_send` listed one of its keys is not unchanged for
    matching the last accepted text: the listed key goes out again, the others stay trimmed."""
    spy = Spy(emulator)
    payload = json.dumps({"tier": "X", "city": "Oslo"})
    for hours, always in ((3, []), (2, ["tier"])):
        harness.syncs = [sync_config("users", "attributes", "main.users", always_send=always)]
        stamp = (NOW - dt.timedelta(hours=hours)).replace(tzinfo=None)
        harness.table("users", [cdi_row(stamp, payload, external_id="u-1"), *_users(3, stamp)])
        run = harness.run("users")
        sent = _attrs(spy.take())
    assert (run.outcome.accepted, run.outcome.unchanged) == (1, 3)
    assert sent == {"u-1": {"tier": "X", "_update_existing_only": False}}


def _chunk(rows: list[tuple[str, int, str]]) -> pa.Table:
    """A delivered chunk's diff columns: (user key, hour stamped, remembered text) per row."""
    return pa.table(
        {
            "user_key": [key for key, _, _ in rows],
            "payload_hash": [f"p-{text}" for _, _, text in rows],
            "remember": [text for _, _, text in rows],
            "payload_attributes": pa.array([1] * len(rows), pa.int32()),
            "updated_at": [NOW + dt.timedelta(hours=hour) for _, hour, _ in rows],
            "object": [b"{}"] * len(rows),
        }
    )


def test_a_held_row_leaves_its_user_known_to_hold_nothing():
    """A held row's outcome is unknown: Braze may have applied it. Its user is remembered as
    holding nothing, so the next row goes whole (a row marked delivered later by a person, or by
    a reconcile, then cannot leave the diff judging the warehouse's old value unchanged); a
    failed row changes nothing; a newer row accepted after it still wins."""
    from braze_assets.delivery import accepted_attributes

    rows = [("a", 1, "a1"), ("b", 1, "b1"), ("c", 1, "c1"), ("d", 1, "d1"), ("d", 2, "d2")]
    kept = accepted_attributes(_chunk(rows), ["accepted", "held", "failed", "held", "accepted"]).to_pylist()
    assert [(r["user_key"], r["payload_hash"], r["attributes"]) for r in kept] == [
        ("a", "p-a1", "a1"),
        ("b", None, "{}"),
        ("d", "p-d2", "d2"),
    ]


def test_a_row_sent_again_for_an_unknown_outcome_leaves_its_user_known_to_hold_nothing():
    """With the `resend` policy a request whose outcome is unknown is not settled (its rows go
    again next run), yet Braze may have applied it: its users are remembered as holding nothing,
    as after a held row, so a warehouse that goes back to the old value still sends it."""
    from braze_assets.braze.client import RequestOutcome
    from braze_assets.delivery import accepted_attributes
    from braze_assets.delivery_answers import AnswerReader
    from braze_assets.request_plan import PlannedRequest
    from braze_assets.sync_outcome import SyncOutcome

    reader = AnswerReader(SyncOutcome("s", "attributes", "r"), "/users/track", False, lambda _: None)
    status: list[str | None] = [None, None, None]
    messages: list[str | None] = [None, None, None]
    unknown = RequestOutcome("ambiguous")
    reader.apply(PlannedRequest("b", b"", [1, 2], "attributes"), unknown, status, messages)
    status[0] = "accepted"
    assert status == ["accepted", None, None], "not settled: sent again next run"
    kept = accepted_attributes(_chunk([("a", 1, "a1"), ("b", 1, "b1"), ("c", 1, "c1")]), status, messages)
    assert [(r["user_key"], r["payload_hash"], r["attributes"]) for r in kept.to_pylist()] == [
        ("a", "p-a1", "a1"),
        ("b", None, "{}"),
        ("c", None, "{}"),
    ]


@pytest.mark.parametrize("repeated", [False, True])
def test_a_chunk_remembers_each_accepted_user_once_from_the_newest_row(repeated):
    from braze_assets.delivery import accepted_attributes

    rows = [("a", 1, "a1"), ("b", 1, "b1"), ("c", 1, "c1")]
    if repeated:  # a newer row accepted, a newest one not; a tie goes to the later row
        rows += [("a", 2, "a2"), ("a", 3, "a3"), ("b", 1, "b1-later")]
    status = ["accepted", "accepted", None] + (["accepted", "failed", "accepted"] if repeated else [])
    kept = accepted_attributes(_chunk(rows), status).to_pylist()
    assert sorted((r["user_key"], r["attributes"]) for r in kept) == (
        [("a", "a2"), ("b", "b1-later")] if repeated else [("a", "a1"), ("b", "b1")]
    )


@both_backends
def test_forgetting_a_user_forgets_what_braze_holds_of_them(harness, emulator):
    from braze_assets.attribute_diff import user_key
    from braze_assets.lookup import lookup_hash

    spy = Spy(emulator)
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(3, NOW - dt.timedelta(hours=2)))
    harness.run("users")
    spy.take()
    store = harness.delivery_state().store("users")
    store.forget([lookup_hash("EXTERNAL_ID", "user-001")], [user_key({"EXTERNAL_ID": "user-001"})])
    harness.table("users", _users(3, NOW - dt.timedelta(hours=1)))
    again = harness.run("users")
    assert [o["external_id"] for o in spy.take()] == ["user-001"]  # sent whole again
    assert (again.outcome.accepted, again.outcome.unchanged) == (1, 2)
    assert again.outcome.estimated_data_points == 4


def test_user_keys_of_a_batch_are_those_of_each_row():
    from braze_assets.attribute_diff import column_user_keys, user_key
    from braze_assets.datatypes import RowBatch

    rows = [
        cdi_row(NOW, "{}", external_id="u-1"),
        cdi_row(NOW, "{}", email="a@example.com", phone="+14155550100"),
        cdi_row(NOW, "{}", alias_name="anon", alias_label="web"),
        cdi_row(NOW, "{}", braze_id="b-1"),
        cdi_row(NOW, "{}"),
    ]
    batch = RowBatch.from_rows(rows)
    expected = [user_key(batch.identifiers(i)) for i in range(batch.num_rows)]
    assert column_user_keys(batch.columns, batch.num_rows) == expected
    assert len(set(expected)) == 5


_IDENTIFIER_TEXT = st.one_of(
    st.none(),
    st.sampled_from(["", " ", "\u2003", "\x1c", "\x1f", "a\x1fb", "/", "=", "é", "用户", " x ", "x\n"]),
    st.text(max_size=6),
)


@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "EXTERNAL_ID": _IDENTIFIER_TEXT,
                "ALIAS_NAME": _IDENTIFIER_TEXT,
                "ALIAS_LABEL": _IDENTIFIER_TEXT,
                "EMAIL": _IDENTIFIER_TEXT,
                "PHONE": st.one_of(st.none(), st.integers(-(10**12), 10**12)),
            }
        ),
        min_size=1,
        max_size=30,
    )
)
@settings(max_examples=200, deadline=None)
def test_user_keys_built_column_wise_from_arrow_match_each_rows(rows):
    """The run's process keys a batch from its Arrow columns: blank text (Python's `isspace`,
    which Arrow does not share), non-ASCII text and whole numbers as each row would have them."""
    from braze_assets.attribute_diff import column_user_keys, user_key
    from braze_assets.datatypes import RowBatch, identifier_arrays

    table = pa.Table.from_pylist(rows)
    arrays, _ = identifier_arrays(table)
    each = RowBatch.from_rows(rows)
    assert column_user_keys(arrays, table.num_rows) == [
        user_key(each.identifiers(i)) for i in range(len(rows))
    ]


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([2**63 - 1, -(2**63)]),  # the ends of 64 bits (validation rejects beyond)
    st.sampled_from([0.0, -0.0, 1.0, 1.5]),
    st.sampled_from(["", "gold", "Gold", "x" * 80, "é", '"quoted"']),
    st.sampled_from([{"inc": 1}, {"$add": ["a"]}, {"remove": [1]}, {"nested": {"b": 1, "a": 2}}, [1, "a"]]),
)
_KEYS = ["plan", "points", "city", "_update_existing_only", "subscription_groups", "listed", 'quo"te']


@given(
    keys=st.lists(st.sampled_from(_KEYS), min_size=0, max_size=5, unique=True),
    columns=st.lists(st.lists(_VALUES, min_size=1, max_size=3), min_size=5, max_size=5),
    rows=st.integers(0, 40),
    odd=st.lists(st.integers(0, 39), max_size=3),
)
@settings(max_examples=300, deadline=None)
def test_first_rows_hashed_a_column_at_a_time_remember_what_each_row_would(keys, columns, rows, odd):
    """A first sync's rows are hashed a column at a time, each distinct value once: what is
    remembered and counted must be what the per-row diff gives, whatever the values' types."""
    diff = AttributeDiff(always_send=["listed"])
    payloads = [{key: columns[k][i % len(columns[k])] for k, key in enumerate(keys)} for i in range(rows)]
    for i in odd:  # a few rows with keys of their own
        if i < rows:
            payloads[i] = {**payloads[i], "extra": i}
    remember, sent, volatile = diff.first_rows(payloads)
    each = [AttributeDiff(always_send=["listed"]).trim(p, None) for p in payloads]
    assert [orjson.loads(text) for text in remember] == [orjson.loads(t.remember) for t in each]
    assert sent == [t.sent for t in each]
    assert volatile == [diff._sends_always(p) for p in payloads]


def test_exact_copies_of_an_unchanged_row_are_settled_once(tmp_path, emulator):
    harness = Harness(tmp_path, emulator)
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    harness.table("users", _users(3, NOW - dt.timedelta(hours=2)))
    harness.run("users")
    restamped = _users(3, NOW - dt.timedelta(hours=1))
    harness.table("users", [*restamped, dict(restamped[0])])  # an exact copy of one row
    again = harness.run("users")
    assert again.delta.unchanged == 3 and again.outcome.unchanged == 3
    assert again.outcome.data_points_saved == 12
    assert harness.ledger("users") == {"accepted": 3, "unchanged": 3}


# ----------------------------------------------------------------------------- where it is kept
def _accepted(*rows: tuple[str, str, int]) -> pa.Table:
    return pa.table(
        {
            "user_key": [r[0] for r in rows],
            "payload_hash": [r[1] for r in rows],
            "attributes": ['{"plan": "x"}'] * len(rows),
            "payload_attributes": pa.array([r[2] for r in rows], pa.int32()),
        }
    )


def test_embedded_memory_is_set_aside_per_chunk_and_folded_once(tmp_path):
    """A chunk's accepted users are appended (an upsert per chunk grew with the table); what is
    set aside is already what a lookup sees, and folding keeps one row per user, the newest."""
    store = EmbeddedStateStore(tmp_path, "diffed")
    with store.session() as ledger:
        ledger.remember(_accepted(("u1", "old", 1), ("u2", "h2", 2)))
        ledger.merge_remembered()
        ledger.remember(_accepted(("u1", "new", 3)))  # a later chunk, not yet folded
        assert ledger.remembered(["u1", "u2", "u3"]) == {
            "u1": Remembered("new", '{"plan": "x"}', 3),
            "u2": Remembered("h2", '{"plan": "x"}', 2),
        }
        ledger.merge_remembered()
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM remembered_pending").fetchall() == [(0,)]
        assert sorted(con.execute("SELECT user_key, payload_hash FROM remembered_attributes").fetchall()) == [
            ("u1", "new"),
            ("u2", "h2"),
        ]


@both_backends
def test_a_state_tells_whether_it_remembers_anyone(harness):
    """A first sync's delta skips the lookups only while nothing is remembered, folded or not."""
    store = harness.delivery_state().store("users")
    with store.session() as ledger:
        assert not ledger.remembers_anyone()
        ledger.remember(_accepted(("u1", "h1", 1)))  # set aside, not folded yet
        assert ledger.remembers_anyone()
        ledger.merge_remembered()
        assert ledger.remembers_anyone()
    with harness.delivery_state().store("others").session() as other:  # another sync's state
        assert not other.remembers_anyone()


def test_an_embedded_memory_with_the_first_layout_is_kept_without_its_key(tmp_path):
    """The first layout upserted through a primary key; opened now, the same rows, no key."""
    tmp_path.mkdir(exist_ok=True)
    with duckdb.connect(str(tmp_path / "diffed.duckdb")) as con:
        con.execute(
            "CREATE TABLE remembered_attributes (user_key VARCHAR PRIMARY KEY, payload_hash VARCHAR, "
            "attributes VARCHAR NOT NULL, payload_attributes INTEGER NOT NULL, "
            "changed_at TIMESTAMPTZ NOT NULL)"
        )
        con.execute("INSERT INTO remembered_attributes VALUES ('u1', 'h1', '{}', 4, now())")
    store = EmbeddedStateStore(tmp_path, "diffed")
    with store.session() as ledger:
        assert ledger.remembered(["u1"]) == {"u1": Remembered("h1", "{}", 4)}
        ledger.remember(_accepted(("u1", "h2", 5)))
        ledger.merge_remembered()  # deletes and inserts one key in one transaction
        assert ledger.remembered(["u1"]) == {"u1": Remembered("h2", '{"plan": "x"}', 5)}
    with store.connect() as con:
        keys = con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'remembered_attributes' "
            "AND constraint_type = 'PRIMARY KEY'"
        ).fetchall()
    assert keys == [(0,)]


def test_kept_value_hashes_tell_a_flag_from_a_number():
    """Hashes of repeated values are kept per diff, keyed by type: `True` and `1` are one dict key
    but different JSON, so a flag that became a number (or `0.0` that became `-0.0`) is a change."""
    diff = AttributeDiff()
    first = diff.trim({"a": True, "b": 1, "c": "x", "d": 0.0}, None)
    again = diff.trim({"a": 1, "b": True, "c": "x", "d": -0.0}, Remembered("h", first.remember, 4))
    assert again.payload == {"a": 1, "b": True, "d": -0.0}
    assert (again.sent, again.saved) == (3, 1)
    assert AttributeDiff().trim({"a": True, "b": 1, "c": "x", "d": 0.0}, None).remember == first.remember


def test_a_row_whose_identifier_has_no_text_form_is_never_matched_as_unchanged():
    """An identifier with no exact text form (a float) is keyed by a placeholder (its type's
    name), which a real user may share: such a row is never set aside as unchanged, so the
    schema rejects it as it would without the diff."""
    from braze_assets.attribute_diff import column_user_keys, payload_hash
    from braze_assets.known_users import KnownUsers

    payload = '{"plan": "gold"}'
    rows = pa.table({"EXTERNAL_ID": pa.array([1.5, 2.0], pa.float64()), "PAYLOAD": [payload, payload]})
    placeholder = column_user_keys({"EXTERNAL_ID": ["float"]}, 1)[0]

    def remembered(keys: pa.Array, attributes: bool) -> pa.Table:  # the real user "float"
        found = {
            "user_key": [placeholder],
            "payload_hash": [payload_hash(payload)],
            "payload_attributes": [1],
        }
        return pa.table(found | ({"attributes": ['{"plan": "x"}']} if attributes else {}))

    [known] = KnownUsers.find([rows], remembered)
    assert known.unchanged == {} and known.before == {}


def test_a_later_row_of_a_user_is_told_from_a_copy_across_lookups():
    """Within a lookup and across a delta's lookups: a user's row is repeated when an earlier row
    of theirs differs from it; exact copies (same PAYLOAD and UPDATED_AT) are one row."""
    from braze_assets.known_users import SeenUsers

    seen = SeenUsers()
    try:

        def rows(*parts: tuple[str, int]) -> pa.Table:  # (PAYLOAD hash, stamp) per row
            return pa.table(
                {"payload": [p for p, _ in parts], "stamp": pa.array([t for _, t in parts], pa.int64())}
            )

        # a: the same PAYLOAD restamped is not another row; p3 after p1 (newer) is
        first = seen.repeated(
            pa.array(["a", "b", "a", "a", "c"]), rows(("p1", 1), ("p2", 5), ("p1", 2), ("p3", 3), ("p9", 1))
        )
        assert first is not None and first.to_pylist() == [False, False, False, True, False]
        # b: p4 is older than the p2 seen, so it is diffed as before (it must not come after p2);
        # a: p1 again, newer than p3: goes whole
        later = seen.repeated(pa.array(["a", "b", "c"]), rows(("p1", 4), ("p4", 4), ("p9", 9)))
        assert later is not None and later.to_pylist() == [True, False, False]
        assert seen.repeated(pa.array(["d"]), rows(("p5", 1))) is None
    finally:
        seen.close()


@pytest.mark.parametrize("error", ["EMAIL_BAD_FORMAT", {"type": "bad nested value", "index": 2}])
def test_rows_of_a_request_with_errors_are_not_remembered(error):
    """Braze documents a partial success's errors only as messages; one that names no row may
    concern any row of the request, and one invalid nested value drops every nested update of
    the request. Its other rows stay accepted (delivered, not sent again) but what Braze holds
    of their users is unknown: the next run sends them whole, and says why."""
    from braze_assets.braze.client import RequestOutcome
    from braze_assets.delivery_answers import AnswerReader
    from braze_assets.delivery_rows import accepted_attributes
    from braze_assets.request_plan import PlannedRequest
    from braze_assets.sync_outcome import SyncOutcome

    reader = AnswerReader(SyncOutcome("s", "attributes", "r"), "/users/track", False, lambda _: None)
    status: list[str | None] = [None, None, None]
    messages: list[str | None] = [None, None, None]
    answer = RequestOutcome("answered", 201, {"message": "success", "errors": [error]})
    reader.apply(PlannedRequest("b", b"", [0, 1, 2], "attributes"), answer, status, messages)
    assert status[:2] == ["accepted", "accepted"]
    assert all(m and "not remembered" in m for m in messages[:2]), messages
    chunk = pa.table(
        {
            "user_key": ["k0", "k1", "k2"],
            "payload_hash": ["p0", "p1", "p2"],
            "remember": ['{"email":"h0"}', '{"plan":"h1"}', '{"plan":"h2"}'],
            "payload_attributes": pa.array([1, 1, 1], pa.int32()),
            "updated_at": [NOW, NOW, NOW],
        }
    )
    kept = accepted_attributes(chunk, status, messages).to_pylist()
    if status[2] == "accepted":  # the error named no row: the third is as unsure as the others
        assert kept[2:] == [
            {"user_key": "k2", "payload_hash": None, "attributes": "{}", "payload_attributes": 1}
        ]
        kept = kept[:2]
    assert [(r["user_key"], r["payload_hash"], r["attributes"]) for r in kept] == [
        ("k0", None, "{}"),
        ("k1", None, "{}"),
    ]


def test_arrays_of_objects_are_billed_per_attribute_of_each_object(harness, emulator):
    """Braze bills creating an array of objects one data point per attribute of each object (and
    adding or updating them per property): the run's data points and the diff's savings count so."""
    harness.syncs = [sync_config("users", "attributes", "main.users")]
    pets = [{"id": 1, "name": "Rex", "age": 2}, {"id": 2, "name": "Tom"}]
    payload = {"plan": "gold", "pets": pets, "visits": {"$add": [{"id": 3, "day": "mon"}]}}

    def table(hours: int, plan: str) -> None:
        stamp = (NOW - dt.timedelta(hours=hours)).replace(tzinfo=None)
        rows = [cdi_row(stamp, json.dumps(payload | {"plan": plan}), external_id=f"u-{i}") for i in range(20)]
        harness.table("users", rows)

    table(2, "gold")
    first = harness.run("users")
    assert first.outcome.accepted == 20
    assert first.outcome.estimated_data_points == 20 * (1 + 5 + 2)
    table(1, "silver")  # only plan changed; the $add goes again as it is
    second = harness.run("users")
    assert second.outcome.estimated_data_points == 20 * (1 + 2)
    assert second.outcome.data_points_saved == 20 * 5


def test_an_update_only_row_leaves_its_user_known_to_hold_nothing_remembered():
    """An accepted update-only row is not remembered, and neither is what came before it: Braze
    may hold its values (the user existed) or not, so the user's next row goes whole."""
    from braze_assets.delivery_rows import accepted_attributes

    chunk = _chunk([("a", 1, '{"a":"h1"}'), ("b", 1, '{"b":"h1"}')]).set_column(
        5, "object", pa.array([b'{"_update_existing_only":true,"a":2}', b'{"b":1}'], pa.binary())
    )
    kept = {
        r["user_key"]: (r["payload_hash"], r["attributes"])
        for r in accepted_attributes(chunk, ["accepted"] * 2).to_pylist()
    }
    assert kept == {"a": (None, "{}"), "b": ('p-{"b":"h1"}', '{"b":"h1"}')}


def test_a_payload_that_may_hold_an_always_sent_key_is_told_whatever_its_column_type():
    """Only the sync's own keys are looked for (a PAYLOAD with `subscription_groups` is never
    remembered by its hash), so a sync without `always_send` keeps the shortcut for every row."""
    from braze_assets.known_users import may_hold

    texts = ['{"vip": 1}', '{"v\\u0069p": 1}', '{"a": "x\\ny"}', '{"a": 1}', None]
    rows = pa.table({"PAYLOAD": pa.array(texts)})
    assert may_hold(rows, frozenset({"vip"})).to_pylist() == [True, True, False, False, False]
    binary = pa.table({"PAYLOAD": pa.array([t.encode() if t else None for t in texts], pa.binary())})
    assert may_hold(binary, frozenset({"vip"})).to_pylist() == [True, True, False, False, False]
    struct = pa.table({"PAYLOAD": pa.array([{"vip": 1}, {"vip": None}])})
    assert may_hold(struct, frozenset({"vip"})).to_pylist() == [True, True]
    assert may_hold(struct, frozenset({"plan"})) is None
    assert may_hold(rows, AttributeDiff().listed) is None
