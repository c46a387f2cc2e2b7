"""A run killed with `kill -9` must not block its sync: the next launch (the CLI, a schedule or a
sensor) reclaims the dead run's pool slot; a live run makes the CLI say the sync is busy instead of
spinning; concurrent first runs initialise Dagster's local storage once."""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter

import dagster as dg
import pytest
import yaml

from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
from braze_assets.sync_outcome import EXIT_CODES
from braze_assets_tests.cli_project import ROOT, CliProject, cli_project, summaries
from braze_assets_tests.conftest import API_KEY, events_rows, sync_config

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)
POOL = "braze_sync_events"
ROWS = 6000  # 80 requests of 75 events; 4 in flight at 100 ms each: about 2 s of delivery


def _events_project(tmp_path, emu) -> CliProject:
    project = cli_project(tmp_path, emu, [sync_config("events", "events", "main.events", max_in_flight=4)])
    project.harness.table("events", events_rows(ROWS, NOW - dt.timedelta(hours=1)))
    return project


def _wait_for_journal(project: CliProject, proc: subprocess.Popen, lines: int) -> None:
    deadline = time.monotonic() + 120
    journal = project.journal("events")
    while not journal.exists() or len(journal.read_text().splitlines()) < lines:
        if proc.poll() is not None:
            pytest.fail(
                "the run ended before the kill: " + proc.stdout.read()[-2000:] + proc.stderr.read()[-3000:]
            )
        assert time.monotonic() < deadline, "the sync never got going"
        time.sleep(0.02)


def _kill_mid_delivery(project: CliProject, launcher: str = "cli") -> tuple[int, str]:
    """Start `braze-assets run --sync events` (or the job from another script), kill -9 it
    mid-delivery; its pid and run id."""
    proc = (
        project.start("run", "--sync", "events", "--json") if launcher == "cli" else project.start_elsewhere()
    )
    _wait_for_journal(project, proc, 100)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    time.sleep(0.3)  # requests already on the wire finish on the server side
    with project.instance() as instance:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"braze_assets/sync": "events"}))
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.STARTED
        claimed = instance.event_log_storage.get_concurrency_info(POOL).claimed_slots
        assert [s.run_id for s in claimed] == [runs[0].run_id], "the dead run holds the slot"
    return proc.pid, runs[0].run_id


def _assert_reclaimed(project: CliProject, dead_run: str) -> None:
    with project.instance() as instance:
        assert instance.get_run_by_id(dead_run).status == dg.DagsterRunStatus.FAILURE
        info = instance.event_log_storage.get_concurrency_info(POOL)
        assert dead_run not in {s.run_id for s in info.claimed_slots}
        assert dead_run not in {p.run_id for p in info.pending_steps}


def _assert_one_copy(project: CliProject, emu: BrazeEmulator) -> int:
    counts = Counter(e["properties"]["seq"] for e in emu.store.events())
    assert max(counts.values()) == 1, "no event reached Braze twice"
    held = project.harness.ledger("events").get("held", 0)
    assert len(set(range(ROWS)) - set(counts)) <= held, "a row is in Braze once or held"
    return held


def test_kill_9_mid_run_then_the_next_cli_run_reclaims_the_pool_slot_and_finishes(tmp_path):
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, faults=FaultConfig(latency_ms=100))) as emu:
        project = _events_project(tmp_path, emu)
        dead_pid, dead_run = _kill_mid_delivery(project)

        try:
            rerun = project.run("run", "--sync", "events", "--json", timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the run after a kill -9 never finished (blocked on the dead run's slot)")
        output = rerun.stdout + rerun.stderr
        assert f"reclaimed the pool slot and locks of dead run {dead_run} (pid {dead_pid} gone)" in output, (
            output[-3000:]
        )
        _assert_reclaimed(project, dead_run)
        [summary] = summaries(rerun)
        held = _assert_one_copy(project, emu)
        # The rows in flight at the kill are parked by the recovery: counted as held, and the
        # status and exit code say so.
        assert held > 0 and summary["held"] == held, summary
        assert summary["status"] == "held" and rerun.returncode == EXIT_CODES["held"], summary
        assert dead_run in summary["reclaimed"][0]


@pytest.mark.parametrize(
    "launcher,dead", [("schedule", "cli"), ("sensor", "script"), ("reclaim_dead_runs", "cli")]
)
def test_a_dead_runs_slot_is_reclaimed_before_a_schedule_or_sensor_requests_a_run(tmp_path, launcher, dead):
    """The dead run was executed by `braze-assets run` (its pid in its tags) or by a script (its
    pid in Dagster's engine events, as for runs dagster dev launches)."""
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, faults=FaultConfig(latency_ms=100))) as emu:
        project = _events_project(tmp_path, emu)
        dead_pid, dead_run = _kill_mid_delivery(project, dead)
        defs = project.harness.definitions()
        with project.instance() as instance:
            if launcher == "schedule":
                with dg.build_schedule_context(
                    instance=instance, resources=project.harness.resources()
                ) as context:
                    result = defs.resolve_schedule_def("events_schedule").evaluate_tick(context)
            elif launcher == "reclaim_dead_runs":  # the always-on sensor: Materialize, backfills
                with dg.build_sensor_context(instance=instance) as context:
                    result = defs.resolve_sensor_def("reclaim_dead_runs").evaluate_tick(context)
                assert f"reclaimed the pool slot and locks of dead run {dead_run}" in (
                    result.skip_message or ""
                )
                assert not result.run_requests  # it launches nothing itself
            else:
                with dg.build_sensor_context(
                    instance=instance, resources=project.harness.resources()
                ) as context:
                    result = defs.resolve_sensor_def("events_sensor").evaluate_tick(context)
            if launcher != "reclaim_dead_runs":
                assert len(result.run_requests) == 1, result.skip_message
            messages = [
                e.message for e in instance.all_logs(dead_run, of_type=dg.DagsterEventType.RUN_FAILURE)
            ]
        assert any(f"pid {dead_pid}" in m for m in messages), messages
        _assert_reclaimed(project, dead_run)


@pytest.mark.parametrize("holder", ["cli", "script"])
def test_a_live_run_makes_the_cli_say_busy_instead_of_waiting_on_the_pool(tmp_path, holder):
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, faults=FaultConfig(latency_ms=600))) as emu:
        project = cli_project(
            tmp_path, emu, [sync_config("events", "events", "main.events", max_in_flight=1)]
        )
        project.harness.table("events", events_rows(ROWS, NOW - dt.timedelta(hours=1)))
        # one request at a time: about 50 s of delivery (killed once the second run returns)
        first = project.start("run", "--sync", "events") if holder == "cli" else project.start_elsewhere()
        try:
            _wait_for_journal(project, first, 4)
            second = project.run("run", "--sync", "events", "--json", timeout=60)
            assert first.poll() is None, "the second run returned only after the first ended"
        finally:
            first.kill()
            first.communicate()
        output = second.stdout + second.stderr
        assert second.returncode == EXIT_CODES["error"], output[-3000:]
        [summary] = summaries(second)
        assert summary["status"] == "error" and "is busy" in summary["status_detail"], summary
        assert summary["run_id"] is None
        with project.instance() as instance:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"braze_assets/sync": "events"}))
            assert len(runs) == 1, "the busy invocation launched no run"
        if holder == "script":  # not a braze-assets run: told apart by its live pid
            assert f"run {runs[0].run_id} (started, pid {first.pid}" in summary["status_detail"]


def test_local_instance_monitors_runs_and_frees_the_slots_of_ended_runs(tmp_path):
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emu:
        project = cli_project(tmp_path, emu, [sync_config("events", "events", "main.events")])
        project.harness.table("events", events_rows(3, NOW - dt.timedelta(hours=1)))
        done = project.run("run", "--json")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        with project.instance() as instance:
            assert instance.run_monitoring_enabled
            settings = instance.run_monitoring_settings
            assert settings["free_slots_after_run_end_seconds"] > 0
            assert 0 < settings["poll_interval_seconds"] <= 60
            assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    prod = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    assert prod["run_monitoring"]["enabled"] is True
    assert prod["run_monitoring"]["free_slots_after_run_end_seconds"] > 0


# ------------------------------------------------------------------ concurrent first runs
INIT_SCRIPT = """
import pathlib, sys, tempfile, time
import dagster as dg
from braze_assets import cli
with tempfile.TemporaryDirectory() as warm:  # every module an instance needs, imported
    with dg.DagsterInstance.from_config(warm) as instance:
        instance.get_runs(limit=1)
go = pathlib.Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.0005)
cli._prepare_home(pathlib.Path(sys.argv[1]))  # what `braze-assets run` does first
instance = dg.DagsterInstance.get()            # then run_syncs
instance.get_runs(limit=1)
print("ok")
"""


def _heads(db) -> list:
    with sqlite3.connect(db) as con:
        return con.execute("select version_num from alembic_version").fetchall()


def test_first_runs_started_together_initialise_the_local_storage_once(tmp_path):
    """Four processes create the instance of a fresh home at the same moment: the race that left
    two alembic heads in runs.db or schedules.db (without the lock it loses nearly every time)."""
    home, go = tmp_path / "home", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRAZE_", "DAGSTER_"))}
    env["PYTHONPATH"] = str(ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", INIT_SCRIPT, str(home), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-3000:]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0 and out.strip() == "ok", err[-3000:]
    dagster_home = home / "dagster_home"
    for db in (dagster_home / "history" / "runs.db", dagster_home / "schedules" / "schedules.db"):
        assert len(_heads(db)) == 1, f"{db.name} has several alembic heads"


def test_concurrent_first_cli_runs_of_different_syncs_all_succeed(tmp_path):
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emu:
        names = ["s0", "s1", "s2"]
        project = cli_project(tmp_path, emu, [sync_config(n, "events", f"main.{n}") for n in names])
        for i, name in enumerate(names):
            project.harness.table(name, events_rows(5, NOW - dt.timedelta(hours=1), start=i * 5))
        procs = [project.start("run", "--sync", name, "--json") for name in names]
        results = [p.communicate(timeout=180) for p in procs]
        for proc, (out, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, out[-2000:] + err[-3000:]
        assert len(emu.store.events()) == 15
        again = project.run("run", "--json")
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
        assert [s["status"] for s in summaries(again)] == ["success"] * 3
        dagster_home = project.dagster_home
        for db in (dagster_home / "history" / "runs.db", dagster_home / "schedules" / "schedules.db"):
            assert len(_heads(db)) == 1
