"""Alerts like CDI's contact emails: a failing sync sends one email and one Slack message naming it,
the run and its counts, with a link, and no secret or PII; row errors above the threshold and
successes (on request) alert too. A real SMTP server (aiosmtpd) and a loopback webhook receive them."""

from __future__ import annotations

import datetime as dt
import email
import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import dagster as dg
import pytest
from aiosmtpd.controller import Controller

from braze_assets.alerts import Alert, AlertError, send
from braze_assets.config import AlertsConfig
from braze_assets_tests.conftest import API_KEY, Harness, cdi_row, events_rows, sync_config
from braze_assets_tests.production_stack import free_port

UTC = dt.UTC
HOUR_AGO = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(hours=1)
WEBHOOK_PATH = "/services/T000/B000/secret-token-xyz"


@dataclass
class Inbox:
    mails: list[email.message.Message] = field(default_factory=list)
    slack: list[dict] = field(default_factory=list)


class _Collect:
    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.inbox.mails.append(email.message_from_bytes(envelope.content))
        return "250 OK"


def _body(mail: email.message.Message) -> str:
    return mail.get_payload(decode=True).decode()


@pytest.fixture
def inbox(monkeypatch) -> Iterator[Inbox]:
    box = Inbox()
    smtp = Controller(_Collect(box), hostname="127.0.0.1", port=free_port())
    smtp.start()

    class Webhook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == WEBHOOK_PATH:
                box.slack.append(json.loads(body))
            self.send_response(200 if self.path == WEBHOOK_PATH else 404)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    monkeypatch.setenv("BRAZE_ASSETS_SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("BRAZE_ASSETS_SMTP_PORT", str(smtp.port))
    monkeypatch.setenv("BRAZE_ASSETS_SMTP_STARTTLS", "0")
    monkeypatch.setenv("SLACK_WEBHOOK_URL", f"http://127.0.0.1:{web.server_address[1]}{WEBHOOK_PATH}")
    monkeypatch.setenv("BRAZE_ASSETS_UI_URL", "http://dagster.example:3000")
    try:
        yield box
    finally:
        smtp.stop()
        web.shutdown()


ALERTS = {"emails": ["data-team@example.com"], "slack_webhook_env": "SLACK_WEBHOOK_URL"}


def _evaluate(harness: Harness, run, sensor_name: str) -> None:
    """Run the sensor on the finished run as the daemon would."""
    defs = harness.definitions()
    result = run.result
    event = result.get_run_success_event() if result.success else result.get_run_failure_event()
    context = dg.build_run_status_sensor_context(
        sensor_name=sensor_name,
        dagster_event=event,
        dagster_instance=harness.instance,
        dagster_run=result.dagster_run,
    )
    sensor = defs.resolve_sensor_def(sensor_name)
    if sensor_name == "sync_failure_alert":
        sensor(context.for_run_failure())
    else:
        sensor(context)


@pytest.fixture
def harness(tmp_path, emulator) -> Harness:
    harness = Harness(tmp_path, emulator)
    harness.instance = dg.DagsterInstance.ephemeral()
    return harness


def _run(harness: Harness, name: str, **kwargs):
    return harness.run(name, instance=harness.instance, **kwargs)


def test_a_failing_sync_sends_one_email_and_one_slack_message_naming_it(harness, inbox):
    harness.syncs = [sync_config("app_events", "events", "main.nope", alerts=ALERTS)]
    harness.table("other", events_rows(1, HOUR_AGO))
    run = _run(harness, "app_events")
    assert not run.result.success
    _evaluate(harness, run, "sync_failure_alert")
    assert len(inbox.mails) == 1 and len(inbox.slack) == 1
    mail, slack = inbox.mails[0], inbox.slack[0]["text"]
    run_id = run.result.run_id
    assert mail["Subject"] == "[braze_assets] Error in sync app_events"
    assert mail["To"] == "data-team@example.com"
    for text in (_body(mail), slack):
        assert "Sync app_events: Error" in text
        assert f"http://dagster.example:3000/runs/{run_id}" in text
        assert "main.nope" in text and "does not exist" in text  # the cause, not Dagster's wrapper
        assert API_KEY not in text and "secret-token-xyz" not in text


def test_a_run_launched_by_materialize_names_its_sync(harness, inbox):
    """No sync tag on an asset-selection run (the UI's Materialize): the assets name the sync."""
    harness.syncs = [sync_config("app_events", "events", "main.nope", alerts=ALERTS)]
    harness.table("other", events_rows(1, HOUR_AGO))
    defs = harness.definitions()
    job = defs.resolve_implicit_global_asset_job_def()
    today = dt.datetime.now(UTC).strftime("%Y-%m-%d")
    result = job.execute_in_process(
        instance=harness.instance,
        asset_selection=[dg.AssetKey("app_events_delta")],
        partition_key=today,
        raise_on_error=False,
    )
    assert "braze_assets/sync" not in result.dagster_run.tags
    run = type("Run", (), {"result": result})
    _evaluate(harness, run, "sync_failure_alert")
    assert [m["Subject"] for m in inbox.mails] == ["[braze_assets] Error in sync app_events"]


def test_row_errors_above_the_threshold_alert_with_counts_and_no_pii(harness, inbox):
    rows = events_rows(30, HOUR_AGO) + [
        cdi_row(HOUR_AGO.replace(tzinfo=None), '{"name": "x", "time": "jane@example.com"}', external_id="u-9")
    ]
    alerts = {**ALERTS, "row_error_threshold": 0.01}
    harness.syncs = [sync_config("app_events", "events", "main.ev", alerts=alerts)]
    harness.table("ev", rows)
    run = _run(harness, "app_events")
    assert run.result.success and run.outcome.status == "partial_success"
    _evaluate(harness, run, "sync_result_alert")
    assert [m["Subject"] for m in inbox.mails] == ["[braze_assets] Row errors in sync app_events"]
    text = _body(inbox.mails[0])
    assert "3.2% of the rows failed (threshold 1.0%)" in text
    assert "read 31, valid 30, rejected by validation 1, accepted 30" in text
    assert "jane" not in text and "jane" not in inbox.slack[0]["text"]


def test_a_run_over_several_days_alerts_with_the_runs_own_totals(harness, inbox):
    """A scheduled run covers the watermark's day and today; its materializations carry per-day
    counts only, and the alert still gives the run's totals, once."""
    two_days_ago = HOUR_AGO - dt.timedelta(days=2)
    bad = cdi_row(two_days_ago.replace(tzinfo=None), '{"properties": {}}', external_id="u-9")
    harness.table("ev", [*events_rows(20, two_days_ago), bad, *events_rows(10, HOUR_AGO, start=20)])
    alerts = {**ALERTS, "row_error_threshold": 0.01}
    harness.syncs = [sync_config("app_events", "events", "main.ev", alerts=alerts)]
    days = [(HOUR_AGO - dt.timedelta(days=n)).strftime("%Y-%m-%d") for n in (3, 0)]
    run = _run(harness, "app_events", keys=dg.PartitionKeyRange(*days))
    assert run.result.success and run.outcome.status == "partial_success"
    _evaluate(harness, run, "sync_result_alert")
    assert [m["Subject"] for m in inbox.mails] == ["[braze_assets] Row errors in sync app_events"]
    assert "read 31, valid 30, rejected by validation 1, accepted 30" in _body(inbox.mails[0])


def test_success_alerts_only_when_asked(harness, inbox):
    harness.syncs = [sync_config("quiet", "events", "main.ev", alerts=ALERTS)]
    harness.table("ev", events_rows(5, HOUR_AGO))
    _evaluate(harness, _run(harness, "quiet"), "sync_result_alert")
    assert inbox.mails == [] and inbox.slack == []

    harness.syncs = [sync_config("loud", "events", "main.ev2", alerts={**ALERTS, "on_success": True})]
    harness.table("ev2", events_rows(5, HOUR_AGO))
    _evaluate(harness, _run(harness, "loud"), "sync_result_alert")
    assert [m["Subject"] for m in inbox.mails] == ["[braze_assets] Success in sync loud"]
    assert "all 5 rows accepted by Braze" in inbox.slack[0]["text"]


@pytest.mark.parametrize(
    "alerts, field",
    [
        ({"emails": ["not-an-address"]}, "alerts.emails"),
        ({"slack_webhook_env": "https://hooks.slack.com/services/x"}, "alerts.slack_webhook_env"),
        ({"row_error_threshold": 2}, "alerts.row_error_threshold"),
    ],
)
def test_bad_alert_settings_fail_at_load_naming_the_field(alerts, field):
    from braze_assets.config import parse_syncs

    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_syncs({"syncs": [sync_config("s", "events", "main.ev", alerts=alerts)]})


@pytest.mark.parametrize("port", ["abc", "0", "70000", "25.5"])
def test_a_bad_smtp_port_is_emails_failure_and_slack_is_still_told(inbox, monkeypatch, port):
    monkeypatch.setenv("BRAZE_ASSETS_SMTP_PORT", port)
    alert = Alert(sync="app_events", run_id="run-1", kind="error", status="error", detail="it broke")
    with pytest.raises(AlertError) as caught:
        send(alert, AlertsConfig(**ALERTS))
    message = str(caught.value)
    assert message == (
        "alert for sync app_events not delivered: email: AlertError: BRAZE_ASSETS_SMTP_PORT must be "
        f"a port number from 1 to 65535, got {port!r}"
    )
    assert inbox.mails == [] and len(inbox.slack) == 1, "Slack is told all the same"
    assert "Sync app_events: Error" in inbox.slack[0]["text"]


def _evaluate_as_the_daemon(harness: Harness, sensor_name: str, cursor: str | None) -> str | None:
    """One tick of the sensor as the daemon evaluates it: in the code location it was loaded
    from, reading the instance's run events after `cursor`; returns the new cursor."""
    from dagster._core.definitions.sensor_definition import SensorEvaluationContext
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin

    defs = harness.definitions()
    context = SensorEvaluationContext(
        instance_ref=None,
        instance=harness.instance,
        cursor=cursor,
        repository_name="__repository__",
        repository_def=defs.get_repository_def(),
        sensor_name=sensor_name,
        code_location_origin=RegisteredCodeLocationOrigin("braze_assets"),
    )
    return defs.resolve_sensor_def(sensor_name).evaluate_tick(context).cursor


def test_a_run_started_outside_the_ui_alerts_too(harness, inbox):
    """`braze-assets run` and `dagster asset materialize` run in their own process, with no code
    location of origin: the daemon's alert sensors must still see their runs."""
    harness.syncs = [sync_config("app_events", "events", "main.nope", alerts=ALERTS)]
    harness.table("other", events_rows(1, HOUR_AGO))
    cursor = _evaluate_as_the_daemon(harness, "sync_failure_alert", None)  # the sensor starts
    run = _run(harness, "app_events")
    assert not run.result.success and run.result.dagster_run.remote_job_origin is None
    _evaluate_as_the_daemon(harness, "sync_failure_alert", cursor)
    assert [m["Subject"] for m in inbox.mails] == ["[braze_assets] Error in sync app_events"]


def test_a_failed_delivery_alerts_with_its_counts(harness, inbox):
    """A delivery that reached Braze with no row fails the run, and records no check result: the
    alert takes the run's counts from the failure itself."""
    from braze_assets.braze.emulator import FaultConfig

    harness.syncs = [sync_config("app_events", "events", "main.ev", alerts=ALERTS)]
    harness.table("ev", events_rows(5, HOUR_AGO))
    harness.emulator.set_faults(FaultConfig(rate_5xx_before=1.0))
    run = _run(harness, "app_events")
    harness.emulator.set_faults(FaultConfig())
    assert not run.result.success
    _evaluate(harness, run, "sync_failure_alert")
    text = _body(inbox.mails[0])
    assert "Rows: read 5" in text and "not sent (next run) 5" in text, text


def test_a_blocked_run_alerts_with_the_checks_own_sentence(harness, inbox):
    rows = events_rows(5, HOUR_AGO) + [
        cdi_row(HOUR_AGO.replace(tzinfo=None), "{not json", external_id=f"bad-{i}") for i in range(5)
    ]
    harness.syncs = [sync_config("app_events", "events", "main.ev", alerts=ALERTS, min_rows_for_error_rate=0)]
    harness.table("ev", rows)
    run = _run(harness, "app_events")
    assert not run.result.success
    _evaluate(harness, run, "sync_failure_alert")
    text = _body(inbox.mails[0])
    assert "5 of 10 rows" in text and "DagsterAssetCheckFailedError" not in text, text
