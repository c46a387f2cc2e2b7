"""`braze-assets run` tells the truth: each sync's CDI-style status and why, the underlying cause of
a step error, every held row, and an exit code per status (0, 3 partial_success, 4 held, 1 error)."""

from __future__ import annotations

import datetime as dt
import json
import socket

import pytest

from braze_assets import cli
from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
from braze_assets.sync_outcome import EXIT_CODES
from braze_assets_tests.cli_project import cli_project, summaries
from braze_assets_tests.conftest import (
    API_KEY,
    cdi_row,
    earlier_today,
    events_rows,
    pg_state_url,
    sync_config,
)

UTC = dt.UTC
HOUR_AGO = earlier_today(dt.timedelta(hours=1))  # every run here covers one day


def _bad_rows(n: int, ts: dt.datetime = HOUR_AGO) -> list[dict]:
    return [cdi_row(ts.replace(tzinfo=None), "{not json", external_id=f"bad-{i}") for i in range(n)]


def test_each_sync_reports_its_status_and_the_run_exits_with_the_worst(tmp_path, emulator):
    project = cli_project(
        tmp_path,
        emulator,
        [
            sync_config("ok", "events", "main.ok"),
            sync_config("partial", "events", "main.partial"),
            sync_config("missing", "events", "main.nope"),
            sync_config("blocked", "events", "main.blocked", min_rows_for_error_rate=0),
        ],
    )
    project.harness.table("ok", events_rows(5, HOUR_AGO))
    project.harness.table("partial", events_rows(10, HOUR_AGO, start=5) + _bad_rows(1))
    project.harness.table("blocked", events_rows(1, HOUR_AGO, start=15) + _bad_rows(3))

    partial = project.run("run", "--sync", "partial")
    assert partial.returncode == EXIT_CODES["partial_success"] == 3, partial.stdout[-2000:]
    assert "[partial_success]" in partial.stdout and "1 rejected by validation" in partial.stdout

    everything = project.run("run", "--json")
    by_name = {s["sync"]: s for s in summaries(everything)}
    assert "success" not in by_name["ok"], "the status replaces the old success flag"
    assert by_name["ok"]["status"] == "success" and by_name["ok"]["accepted"] == 5
    assert by_name["ok"]["status_detail"] == "all 5 rows accepted by Braze"
    assert by_name["partial"]["status"] == "success", "its rejected row was reported already"
    assert by_name["partial"]["status_detail"] == "nothing new or changed to send"
    # A step error shows its cause, not Dagster's "Error occurred while executing op" wrapper.
    missing = by_name["missing"]
    assert missing["status"] == "error" and "read" not in missing
    assert "table main.nope in warehouse.duckdb does not exist" in missing["status_detail"], missing
    assert "Error occurred while executing" not in missing["status_detail"]
    assert missing["error"] == missing["status_detail"]
    blocked = by_name["blocked"]
    assert blocked["status"] == "error" and blocked["blocked_by"] == ["row_error_rate"], blocked
    assert "row_error_rate" in blocked["status_detail"] and "accepted" not in blocked
    assert everything.returncode == EXIT_CODES["error"] == 1, "the worst status: error"

    assert by_name["ok"]["data_points_sent"] == 5
    text = project.run("run", "--sync", "ok", "--sync", "missing")
    assert text.returncode == 1
    assert "== ok  [success]" in text.stdout and "nothing new or changed to send" in text.stdout
    assert "   data points sent 0\n" in text.stdout, "billed data points are always said"
    assert "== missing  [error]" in text.stdout
    assert "table main.nope in warehouse.duckdb does not exist" in text.stdout, text.stdout[-2000:]
    assert "Error occurred while executing" not in text.stdout


def test_a_run_over_several_days_names_each_blocking_check_once(tmp_path, emulator):
    """A check of a run over several days is recorded once per day; the run was blocked by it once."""
    project = cli_project(
        tmp_path, emulator, [sync_config("blocked", "events", "main.blocked", min_rows_for_error_rate=0)]
    )
    two_days_ago = HOUR_AGO - dt.timedelta(days=2)
    project.harness.table("blocked", events_rows(1, two_days_ago) + _bad_rows(2, two_days_ago) + _bad_rows(1))
    [summary] = summaries(project.run("run", "--json"))
    assert summary["partitions"].count("..") == 1, summary  # a run over a range of days
    assert summary["status"] == "error" and summary["blocked_by"] == ["row_error_rate"], summary


def test_held_rows_make_the_run_held_with_exit_4(tmp_path):
    faults = FaultConfig(rate_5xx_after=1.0)  # processed, then the answer is lost: ambiguous
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY, faults=faults)) as emu:
        project = cli_project(tmp_path, emu, [sync_config("events", "events", "main.events")])
        project.harness.table("events", events_rows(10, HOUR_AGO))
        run = project.run("run", "--json")
        [summary] = summaries(run)
        assert summary["status"] == "held" and summary["held"] == 10, summary
        assert "10 held" in summary["status_detail"]
        assert run.returncode == EXIT_CODES["held"] == 4
        text = project.run("run")  # held rows are settled until released: nothing more to send
        assert text.returncode == 0 and "[success]" in text.stdout, text.stdout[-2000:]


def test_unreachable_braze_is_an_error_not_a_success(tmp_path, emulator):
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    project = cli_project(
        tmp_path, emulator, [sync_config("events", "events", "main.events")], endpoint=closed
    )
    project.harness.table("events", events_rows(10, HOUR_AGO))
    run = project.run("run", "--json")
    [summary] = summaries(run)
    assert summary["status"] == "error" and summary["not_sent"] == 10, summary
    assert "none of 10 rows reached Braze" in summary["status_detail"]
    # and why: what the last attempt met, not only "unreachable or refusing"
    assert "refusing: not sent: Connect" in summary["status_detail"], summary["status_detail"]
    assert run.returncode == EXIT_CODES["error"]


def test_a_delta_already_delivered_by_another_run_says_so(capsys):
    detail = "nothing to send: all 40 rows of this delta were already delivered by another run"
    cli.print_summaries(
        [
            {
                "sync": "events",
                "partitions": "2024-01-01..2024-01-02",
                "run_id": "0123456789",
                "status": "success",
                "status_detail": detail,
                "sent": 0,
                "requests": 0,
                "accepted": 0,
                "failed": 0,
                "held": 0,
                "not_sent": 0,
                "failed_reasons": {},
                "watermark_before": None,
                "watermark_after": None,
            }
        ]
    )
    assert detail in capsys.readouterr().out


def test_help_documents_the_exit_codes(capsys):
    try:
        cli.main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    text = capsys.readouterr().out
    assert "exit status" in text.lower()
    for status, code in EXIT_CODES.items():
        assert f"{code} {status}" in text, (status, text)


def test_run_and_its_dry_run_work_with_the_state_in_postgresql(tmp_path, emulator, postgres):
    """`braze-assets run` reads each sync's watermark before launching it: with the state in
    PostgreSQL that is the URL itself, not the name of the variable holding it."""
    project = cli_project(tmp_path, emulator, [sync_config("ok", "events", "main.ok")])
    project.env["BRAZE_ASSETS_STATE_URL"] = pg_state_url(postgres)
    project.harness.table("ok", events_rows(5, HOUR_AGO))
    dry = project.run("run", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr[-2000:]
    first = project.run("run", "--json")
    assert first.returncode == 0, first.stderr[-2000:]
    assert summaries(first)[0]["accepted"] == 5
    again = project.run("run", "--json")
    assert summaries(again)[0]["status_detail"] == "nothing new or changed to send"
    assert not (tmp_path / "state" / "ok.duckdb").exists(), "nothing kept in the embedded state"


def test_a_sync_name_that_is_not_configured_is_a_usage_error(tmp_path, emulator):
    project = cli_project(tmp_path, emulator, [sync_config("ok", "events", "main.ok")])
    project.harness.table("ok", events_rows(1, HOUR_AGO))
    for args in (("run", "--sync", "okk"), ("run", "--dry-run", "--sync", "okk")):
        typo = project.run(*args)
        assert typo.returncode == 2, (args, typo.stdout[-2000:], typo.stderr[-2000:])
        assert "no sync named 'okk'" in typo.stderr and "ok" in typo.stderr
    assert emulator.store.events() == [], "nothing ran"


def test_a_state_database_that_cannot_be_reached_is_said_in_one_line(tmp_path, emulator):
    project = cli_project(tmp_path, emulator, [sync_config("ok", "events", "main.ok")])
    project.harness.table("ok", events_rows(1, HOUR_AGO))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    project.env["BRAZE_ASSETS_STATE_URL"] = f"postgresql://u:hunter2@127.0.0.1:{port}/db"
    for args in (
        ("run",),
        ("run", "--dry-run"),
        ("log", "runs", "--sync", "ok"),
        ("release", "--sync", "ok", "--mode", "resend"),
    ):
        down = project.run(*args)
        assert down.returncode == 1, (args, down.stderr[-2000:])
        assert "braze-assets: BRAZE_ASSETS_STATE_URL: cannot connect to the state database" in down.stderr
        assert "Traceback" not in down.stderr and "hunter2" not in down.stderr + down.stdout


def test_a_run_whose_every_answer_was_lost_says_braze_may_have_the_rows(tmp_path, emulator):
    """Braze processed every request and lost every answer (500 after storing): the rows may
    have reached it, and the watermark the run reports is the one in force, not one it never
    committed."""
    rows = [
        cdi_row(HOUR_AGO.replace(tzinfo=None), '{"tier": "gold"}', external_id=f"u-{i}") for i in range(6)
    ]
    project = cli_project(tmp_path, emulator, [sync_config("users", "attributes", "main.users")])
    project.harness.table("users", rows[:3])
    first = summaries(project.run("run", "--json"))[0]
    assert first["status"] == "success"
    watermark = first["watermark_after"]

    project.harness.table("users", [dict(r, PAYLOAD='{"tier": "silver"}') for r in rows])
    emulator.set_faults(FaultConfig(rate_5xx_after=1.0))
    run = project.run("run", "--json")
    [summary] = summaries(run)
    assert summary["status"] == "error", summary
    assert "reached Braze" not in summary["status_detail"] or "may have" in summary["status_detail"]
    assert "may have been processed" in summary["status_detail"], summary["status_detail"]
    assert (summary["watermark_before"], summary["watermark_after"]) == (watermark, watermark)
    [record] = project.harness.delivery_state().store("users").log.runs(limit=1)
    assert (record["watermark_before"], record["watermark_after"]) == (watermark, watermark)
    text = project.run("run")
    assert "answer lost" in text.stdout, text.stdout[-2000:]


def test_a_sync_with_no_day_to_sync_yet_says_so_and_the_next_syncs_still_run(
    tmp_path, emulator, monkeypatch, capsys
):
    """A clock behind a sync's partitions_start (the file was checked by another machine's
    clock): that sync reports there is nothing to sync yet, and the syncs after it still run."""
    from braze_assets import automation

    syncs = [sync_config("early", "events", "main.early"), sync_config("ok", "events", "main.ok")]
    project = cli_project(tmp_path, emulator, syncs)
    project.harness.table("ok", events_rows(2, HOUR_AGO))
    for key in ("BRAZE_ASSETS_HOME", "BRAZE_ASSETS_SYNCS", "BRAZE_ASSETS_DUCKDB", "BRAZE_REST_ENDPOINT"):
        monkeypatch.setenv(key, project.env[key])
    monkeypatch.setenv("BRAZE_API_KEY", API_KEY)
    monkeypatch.setenv("DAGSTER_HOME", str(project.dagster_home))  # restored after: the CLI sets it
    monkeypatch.setenv("BRAZE_ASSETS_PROGRESS_BAR", "0")
    real = automation.incremental_range

    def clock_behind_for_early(sync, state, now, source):
        before = dt.datetime(2023, 6, 1, tzinfo=UTC)  # partitions start on 2024-01-01
        return real(sync, state, before if sync.name == "early" else now, source)

    monkeypatch.setattr(automation, "incremental_range", clock_behind_for_early)
    assert cli.main(["run", "--json"]) == 0
    out = capsys.readouterr()
    by_name = {s["sync"]: s for s in json.loads(out.out[out.out.index("[") :])}
    assert by_name["early"]["status"] == "success" and by_name["early"]["run_id"] is None
    assert "nothing to sync yet: its partitions start on 2024-01-01" in by_name["early"]["status_detail"]
    assert by_name["ok"]["status"] == "success" and by_name["ok"]["accepted"] == 2
    assert "Traceback" not in out.err


@pytest.mark.parametrize(
    "variable, value, said",
    [
        ("BRAZE_MAX_RATE_SHARE", "abc", "BRAZE_MAX_RATE_SHARE must be a number above 0 and at most 1"),
        ("BRAZE_MAX_RATE_SHARE", "1.5", "BRAZE_MAX_RATE_SHARE must be a number above 0 and at most 1"),
        ("BRAZE_ASSETS_DELTA_URL", "ftp://x/y", "BRAZE_ASSETS_DELTA_URL must be s3://bucket/prefix"),
    ],
)
def test_a_bad_setting_in_the_environment_is_said_in_one_line(tmp_path, emulator, variable, value, said):
    project = cli_project(tmp_path, emulator, [sync_config("ok", "events", "main.ok")])
    project.harness.table("ok", events_rows(1, HOUR_AGO))
    project.env[variable] = value
    for args in (("run",), ("run", "--dry-run")):
        bad = project.run(*args)
        assert bad.returncode == 1, (args, bad.stderr[-2000:])
        assert bad.stderr.startswith(f"braze-assets: {said}"), (args, bad.stderr[-2000:])
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert emulator.store.events() == [], "nothing ran"
