"""Held rows: resend, mark_delivered or reconcile (release_held_job), against the emulator.

Rows are held for real: by the emulator's "process, then fail" fault (Braze stored the event, the
answer was lost), by a connection dropped before processing (Braze never saw it), and by kill -9.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter

import dagster as dg
import pytest

from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
from braze_assets_tests.conftest import (
    API_KEY,
    Harness,
    both_backends,
    cdi_row,
    kill_9_mid_sync,
    sync_config,
)

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)
BASE = (NOW - dt.timedelta(hours=3)).replace(tzinfo=None)


def _event(seq: int, user: str, at: dt.datetime, name: str = "open", time: str | None = None):
    payload = {"name": name, "properties": {"seq": seq}}
    if time:
        payload["time"] = time
    return cdi_row(at, json.dumps(payload), external_id=user)


def _release(harness: Harness, sync: str, mode: str | None = None, row_hashes: list[str] | None = None):
    """Run the release_held_job; returns (result, report, output metadata)."""
    config: dict = {"sync": sync}
    if mode:
        config["mode"] = mode
    if row_hashes:
        config["row_hashes"] = row_hashes
    job = harness.definitions().resolve_job_def("release_held_job")
    result = job.execute_in_process(
        run_config={"ops": {"release_held_rows": {"config": config}}}, raise_on_error=False
    )
    if not result.success:
        return result, None, None
    output = next(e for e in result.all_events if e.event_type_value == "STEP_OUTPUT")
    metadata = {k: v.value for k, v in output.step_output_data.metadata.items()}
    return result, result.output_for_node("release_held_rows"), metadata


def _store(harness: Harness, sync: str):
    return harness.delivery_state().store(sync)


def _seqs(emulator: BrazeEmulator, kind: str = "events") -> Counter:
    items = emulator.store.events() if kind == "events" else emulator.store.purchases()
    return Counter(item["properties"]["seq"] for item in items)


def _failure_text(result) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure)
    data = failure.step_failure_data
    return data.error.to_string() + str(data.user_failure_data)


@both_backends
def test_reconcile_resends_only_what_braze_lacks(harness, emulator):
    """A: 15 events held after Braze stored them (500/504 after processing). B: 9 events held
    after the connection dropped before processing (Braze never saw them). Reconcile, with faults
    on the export requests too, must resend exactly B, settle what Braze shows, and keep the
    undecidable rows held with the reason; after the next run every event is in Braze once."""
    a = [
        _event(
            i,
            f"solo-{i}",
            BASE + dt.timedelta(seconds=i),  # payload time: T is not UPDATED_AT
            time=(BASE - dt.timedelta(minutes=30, seconds=-i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        for i in range(10)
    ]
    a += [_event(10 + k, "trio", BASE + dt.timedelta(seconds=100 * (k + 1))) for k in range(3)]
    a += [_event(13 + k, "twins", BASE + dt.timedelta(seconds=400)) for k in range(2)]
    harness.table("events", a)
    harness.syncs = [sync_config("events", "events", "main.events")]
    harness.braze_overrides = {"timeout_s": 0.5, "max_attempts": 8}
    emulator.set_faults(FaultConfig(rate_5xx_after=1.0))
    held_a = harness.run("events")
    assert held_a.outcome.held == 15 and len(emulator.store.events()) == 15

    later = BASE + dt.timedelta(seconds=1000)
    b = [_event(15 + j, f"solo-{j}", later + dt.timedelta(seconds=j)) for j in range(5)]
    b.append(_event(20, "trio", later, name="close"))
    b += [_event(21 + j, f"fresh-{j}", later) for j in range(3)]
    harness.table("events", b)
    emulator.set_faults(FaultConfig(rate_drop_before=1.0))
    held_b = harness.run("events")
    assert held_b.outcome.held == 9 and len(emulator.store.events()) == 15, "B never reached Braze"
    assert harness.ledger("events") == {"held": 24}

    emulator.set_faults(
        FaultConfig(rate_5xx_before=0.25, rate_drop_after=0.2, rate_timeout_after=0.1, timeout_s=1.0, seed=4)
    )
    result, report, metadata = _release(harness, "events", "reconcile")
    assert result.success
    assert (report["resent"], report["marked_delivered"], report["still_held"]) == (9, 12, 3)
    assert report["still_held_reasons"] == {
        "several held rows share the user, name and second": 2,
        "Braze shows a later occurrence; cannot tell": 1,
    }
    assert (metadata["resent_next_run"], metadata["marked_delivered"], metadata["still_held"]) == (9, 12, 3)
    assert report["export_requests"] >= 1
    by_status = emulator.store.stats()["by_status"]
    assert set(by_status) - {"201"}, f"the export met faults too: {by_status}"
    messages = {r["row_hash"]: r["message"] for r in _store(harness, "events").held_rows()}
    assert sorted(m.split(";")[0] for m in messages.values()) == [
        "2 held rows share this user, open and second, and Braze shows open at that second",
        "2 held rows share this user, open and second, and Braze shows open at that second",
        "Braze shows a later open for this user",
    ]

    emulator.set_faults(FaultConfig())
    rerun = harness.run("events")
    assert rerun.result.success and rerun.outcome.accepted == 9
    assert _seqs(emulator) == Counter(range(24)), "every event in Braze exactly once"
    assert harness.ledger("events") == {"accepted": 21, "held": 3}

    # the undecidable rest: a person who knows better settles them
    result, report, metadata = _release(harness, "events", "mark_delivered", list(messages))
    assert result.success and report["marked_delivered"] == 3
    assert metadata["marked_delivered"] == 3 and metadata["still_held"] == 0
    assert harness.ledger("events") == {"accepted": 24}
    assert harness.run("events").outcome.requests == 0
    assert _seqs(emulator) == Counter(range(24))


@both_backends
def test_reconcile_purchases_by_product_id(harness, emulator):
    def purchase(seq, user, at, product):
        payload = {"product_id": product, "currency": "USD", "price": 3.5, "properties": {"seq": seq}}
        return cdi_row(at, json.dumps(payload), external_id=user)

    harness.table(
        "buys", [purchase(i, f"buyer-{i % 3}", BASE + dt.timedelta(seconds=i), f"sku-{i}") for i in range(6)]
    )
    harness.syncs = [sync_config("buys", "purchases", "main.buys")]
    emulator.set_faults(FaultConfig(rate_drop_after=1.0))  # processed, connection dropped
    assert harness.run("buys").outcome.held == 6
    harness.table("buys", [purchase(6, "buyer-0", BASE + dt.timedelta(seconds=60), "sku-0")])
    emulator.set_faults(FaultConfig(rate_drop_before=1.0))  # dropped before processing
    assert harness.run("buys").outcome.held == 1
    emulator.set_faults(FaultConfig())
    result, report, _ = _release(harness, "buys", "reconcile")
    assert result.success
    assert (report["resent"], report["marked_delivered"], report["still_held"]) == (1, 6, 0)
    assert harness.run("buys").outcome.accepted == 1
    assert _seqs(emulator, "purchases") == Counter(range(7))


@both_backends
def test_reconcile_after_kill_9_leaves_every_event_once(tmp_path, state_url):
    """kill -9 mid-delivery; the next run holds what was in flight (recovery keeps what reconcile
    needs from the crashed run's delta file); reconcile settles what Braze stored and resends the
    rest; every event ends in Braze exactly once and nothing stays held."""
    n = 3000
    rows = [_event(i, f"user-{i % 40}", BASE + dt.timedelta(seconds=i), name=f"step-{i}") for i in range(n)]
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, faults=FaultConfig(latency_ms=60))) as emu:
        harness = Harness(tmp_path, emu, state_url=state_url)
        harness.table("events", rows)
        harness.syncs = [sync_config("events", "events", "main.events", max_in_flight=4)]
        kill_9_mid_sync(tmp_path, emu, events_before_kill=600, state_url=state_url)
        time.sleep(0.3)  # requests already on the wire finish on the server side
        emu.set_faults(FaultConfig())

        rerun = harness.run("events")
        held = harness.ledger("events").get("held", 0)
        assert held == rerun.outcome.recovered_held > 0, "rows were in flight at the kill"
        in_braze = _seqs(emu)
        assert max(in_braze.values()) == 1

        details = _store(harness, "events").held_rows()
        assert all(d["kind"] == "event" for d in details), "recovery kept what reconcile needs"
        held_seqs = [int(d["name"].removeprefix("step-")) for d in details]
        result, report, _ = _release(harness, "events", "reconcile")
        assert result.success and report["held"] == held
        arrived = sum(1 for seq in held_seqs if seq in in_braze)
        assert report["marked_delivered"] == arrived and report["resent"] == held - arrived
        assert report["still_held"] == 0
        final = harness.run("events")
        assert final.result.success and final.outcome.accepted == held - arrived
        assert _seqs(emu) == Counter(range(n)), "every event in Braze exactly once"
        assert harness.ledger("events") == {"accepted": n}


@both_backends
def test_rows_held_before_a_kill_9_are_counted_held_and_can_be_reconciled(tmp_path, state_url):
    """Rows the killed run had already held (Braze's answer was lost, so their request's answer in
    the journal says "held") are held like the rows in flight at the kill: the next run counts
    them as held, not settled, and keeps what reconcile needs to ask Braze about each of them."""
    n = 1500
    rows = [_event(i, f"user-{i % 40}", BASE + dt.timedelta(seconds=i), name=f"step-{i}") for i in range(n)]
    lost = FaultConfig(rate_drop_after=1.0, latency_ms=60)  # stored, then the answer is lost
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, faults=lost)) as emu:
        harness = Harness(tmp_path, emu, state_url=state_url)
        harness.table("events", rows)
        harness.syncs = [sync_config("events", "events", "main.events", max_in_flight=4)]
        kill_9_mid_sync(tmp_path, emu, events_before_kill=600, state_url=state_url)
        time.sleep(0.3)  # requests already on the wire finish on the server side
        emu.set_faults(FaultConfig())

        rerun = harness.run("events")
        held = harness.ledger("events").get("held", 0)
        assert held >= 600, "every request Braze got before the kill lost its answer"
        assert rerun.outcome.recovered_held == rerun.outcome.held_total == held
        assert rerun.outcome.recovered_settled == 0, "no answer was known, so no row was settled"
        [record] = _store(harness, "events").log.runs()
        assert record["recovered_held"] == held, "the sync log counts them held too"

        details = _store(harness, "events").held_rows()
        assert len(details) == held and all(d["kind"] == "event" for d in details)
        in_braze = _seqs(emu)
        held_seqs = [int(d["name"].removeprefix("step-")) for d in details]
        result, report, _ = _release(harness, "events", "reconcile")
        assert result.success and report["held"] == held and report["still_held"] == 0, report
        arrived = sum(1 for seq in held_seqs if seq in in_braze)
        assert report["marked_delivered"] == arrived and report["resent"] == held - arrived
        assert harness.run("events").outcome.accepted == held - arrived
        assert _seqs(emu) == Counter(range(n)), "every event in Braze exactly once"


def test_reconcile_is_refused_for_attributes_and_changes_nothing(harness, emulator):
    harness.table("attrs", [cdi_row(BASE, json.dumps({"plan": "pro"}), external_id="u1")])
    harness.syncs = [sync_config("attrs", "attributes", "main.attrs", ambiguous_policy="hold")]
    emulator.set_faults(FaultConfig(rate_5xx_after=1.0))
    assert harness.run("attrs").outcome.held == 1
    emulator.set_faults(FaultConfig())
    requests = emulator.store.stats()["requests"]
    result, _, _ = _release(harness, "attrs", "reconcile")
    assert not result.success
    assert "reconcile is not supported for attrs (attributes)" in _failure_text(result)
    assert harness.ledger("attrs") == {"held": 1}, "nothing changed"
    assert emulator.store.stats()["requests"] == requests, "Braze was not asked"
    result, report, _ = _release(harness, "attrs", "resend")
    assert result.success and report["resent"] == 1
    assert harness.run("attrs").outcome.accepted == 1


def test_reconcile_with_a_key_lacking_export_says_so_and_changes_nothing(harness, emulator):
    harness.table("events", [_event(0, "u1", BASE)])
    harness.syncs = [sync_config("events", "events", "main.events")]
    emulator.set_faults(FaultConfig(rate_5xx_after=1.0))
    assert harness.run("events").outcome.held == 1
    emulator.set_faults(FaultConfig())
    harness.api_key = "another-key"
    result, _, _ = _release(harness, "events", "reconcile")
    assert not result.success
    text = _failure_text(result)
    assert "401" in text and "users.export.ids" in text and "another-key" not in text
    assert harness.ledger("events") == {"held": 1}


@both_backends
def test_resent_rows_older_than_the_lookback_are_read_again(harness, emulator):
    """Releasing held rows must bring the watermark back before them: the watermark says every
    row up to it is settled, and the next run reads only from it minus the lookback."""
    old = (NOW - dt.timedelta(days=3)).replace(tzinfo=None)
    harness.table("events", [_event(0, "u1", old)])
    harness.syncs = [sync_config("events", "events", "main.events", lookback="PT0S")]
    emulator.set_faults(FaultConfig(rate_drop_before=1.0))  # never reached Braze: held
    assert harness.run("events").outcome.held == 1
    emulator.set_faults(FaultConfig())
    harness.table("events", [_event(1, "u1", (NOW - dt.timedelta(hours=1)).replace(tzinfo=None))])
    assert harness.run("events").outcome.accepted == 1
    watermark = harness.watermark("events")

    result, _, _ = _release(harness, "events")  # the default mode: resend
    assert result.success
    again = harness.run("events")
    assert again.delta.late_outside_lookback == 0
    assert again.outcome.accepted == 1, "the released row was read again and sent"
    assert harness.watermark("events") >= watermark
    assert _seqs(emulator) == Counter([0, 1])
    assert harness.ledger("events") == {"accepted": 2}


@both_backends
def test_mark_delivered_settles_with_a_message_and_never_sends(harness, emulator):
    harness.table("events", [_event(i, "u1", BASE + dt.timedelta(seconds=i)) for i in range(3)])
    harness.syncs = [sync_config("events", "events", "main.events")]
    emulator.set_faults(FaultConfig(rate_timeout_after=1.0, timeout_s=1.0))
    harness.braze_overrides = {"timeout_s": 0.3}
    assert harness.run("events").outcome.held == 3
    emulator.set_faults(FaultConfig())
    store = _store(harness, "events")
    first = store.held_rows()[0]["row_hash"]
    result, report, metadata = _release(harness, "events", "mark_delivered", [first])
    assert result.success and report["held"] == 1 and metadata["marked_delivered"] == 1
    assert harness.ledger("events") == {"accepted": 1, "held": 2}
    [message] = store.log.rows(status="accepted")["message"].to_pylist()
    assert message.startswith("marked delivered by a person (release_held_job run ")
    assert "mode mark_delivered" in message
    assert harness.run("events").outcome.requests == 0
    with pytest.raises(dg.DagsterInvalidConfigError):
        _release(harness, "events", "forget")


def test_release_command_reconciles_from_a_terminal(harness, emulator, monkeypatch, capsys):
    import yaml

    from braze_assets.release import release_command

    harness.table("events", [_event(i, f"u{i}", BASE + dt.timedelta(seconds=i)) for i in range(4)])
    harness.table("deletes", [cdi_row(BASE, external_id="u9")], payload=False)
    harness.syncs = [
        sync_config("events", "events", "main.events"),
        sync_config("deletes", "deletions", "main.deletes"),
    ]
    emulator.set_faults(FaultConfig(rate_5xx_after=1.0))
    assert harness.run("events").outcome.held == 4
    emulator.set_faults(FaultConfig())
    syncs_file = harness.tmp_path / "syncs.yaml"
    syncs_file.write_text(yaml.safe_dump({"syncs": harness.syncs}))
    monkeypatch.setenv("BRAZE_ASSETS_SYNCS", str(syncs_file))
    monkeypatch.setenv("BRAZE_ASSETS_HOME", str(harness.tmp_path))  # state in <home>/state
    monkeypatch.setenv("BRAZE_REST_ENDPOINT", emulator.base_url)
    monkeypatch.setenv("BRAZE_API_KEY", API_KEY)

    assert release_command(["--sync", "deletes", "--mode", "reconcile"]) == 2
    assert "not supported for deletes (deletions)" in capsys.readouterr().out
    assert release_command(["--sync", "events", "--mode", "reconcile"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["marked_delivered"], report["resent"], report["still_held"]) == (4, 0, 0)
    assert harness.ledger("events") == {"accepted": 4}
    with pytest.raises(SystemExit):
        release_command(["--sync", "events", "--mode", "forget"])


def test_a_release_between_a_runs_delta_and_its_delivery_is_kept(harness, emulator):
    """A run commits its watermark against the one its delta was computed from: a release that
    moved the watermark back after the delta was read (a person releasing held rows while a run
    is between its steps) is not undone, and its rows are read again by the next run."""
    from braze_assets.automation import incremental_range, range_tags
    from braze_assets.sources.factory import make_source, resource_key

    old = (NOW - dt.timedelta(days=3)).replace(tzinfo=None)
    harness.table("events", [_event(0, "u1", old)])
    harness.syncs = [sync_config("events", "events", "main.events", lookback="PT0S")]
    emulator.set_faults(FaultConfig(rate_drop_before=1.0))  # never reached Braze: held
    assert harness.run("events").outcome.held == 1
    emulator.set_faults(FaultConfig())
    harness.table("events", [_event(1, "u1", (NOW - dt.timedelta(hours=2)).replace(tzinfo=None))])
    assert harness.run("events").outcome.accepted == 1
    harness.table("events", [_event(2, "u1", (NOW - dt.timedelta(hours=1)).replace(tzinfo=None))])

    resources = harness.resources()
    sync = harness.config("events")
    keys = incremental_range(
        sync,
        resources["delivery_state"],
        dt.datetime.now(UTC),
        make_source(sync, resources[resource_key(sync)]),
    )
    job = harness.definitions().resolve_job_def("events_job")

    def step(asset: str) -> dg.ExecuteInProcessResult:
        return job.execute_in_process(
            instance=dg.DagsterInstance.ephemeral(),
            tags=range_tags(keys),
            asset_selection=[dg.AssetKey(asset)],
            raise_on_error=False,
        )

    assert step("events_delta").success
    result, _, _ = _release(harness, "events")  # resend: the watermark goes back before row 0
    assert result.success
    released = harness.watermark("events")
    assert step("events_sync_results").success
    assert harness.watermark("events") == released, "the release was undone"

    again = harness.run("events")
    assert again.delta.late_outside_lookback == 0
    assert _seqs(emulator) == Counter([0, 1, 2])
    assert harness.ledger("events") == {"accepted": 3}
