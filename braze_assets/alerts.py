"""Alerts on sync runs, like CDI's contact emails: what a run did, told by email and Slack.

An alert names the sync, the run, its status and counts, and links to the run in the Dagster UI.
It never carries row data: counts and the run's own status sentence only (those never hold
identifiers), and a global error as its first line. Channels:

* email over SMTP, configured by environment (`BRAZE_ASSETS_SMTP_HOST`, `_PORT` (587), `_USER`,
  `_PASSWORD`, `_FROM`, `_STARTTLS` (on unless 0)); the sync's `alerts.emails` are the recipients;
* Slack through an incoming webhook whose URL is in the environment variable the sync names
  (`alerts.slack_webhook_env`): the URL is a secret and never appears in config, logs or errors.

Links use `BRAZE_ASSETS_UI_URL` (default http://127.0.0.1:3000).
"""

from __future__ import annotations

import os
import smtplib
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import dagster as dg
import httpx

from braze_assets.config import AlertsConfig

#: the counts an alert shows, in this order, from the results' metadata
COUNTS = (
    ("rows_read", "read"),
    ("rows_valid", "valid"),
    ("rows_rejected_by_validation", "rejected by validation"),
    ("rows_accepted", "accepted"),
    ("rows_failed_at_braze", "failed at Braze"),
    ("rows_held_ambiguous", "held"),
    ("rows_not_sent_retry_next_run", "not sent (next run)"),
)
TITLES = {
    "error": "Error",
    "row_errors": "Row errors",
    "success": "Success",
    "partial_success": "Partial success",
    "held": "Held rows",
}


@dataclass
class Alert:
    """One alert about one sync in one run."""

    sync: str
    run_id: str
    kind: str  # error | row_errors | success
    status: str
    detail: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def link(self) -> str:
        base = os.environ.get("BRAZE_ASSETS_UI_URL", "http://127.0.0.1:3000").rstrip("/")
        return f"{base}/runs/{self.run_id}"

    @property
    def subject(self) -> str:
        return f"[braze_assets] {TITLES.get(self.kind, self.kind)} in sync {self.sync}"

    def text(self) -> str:
        lines = [
            f"Sync {self.sync}: {TITLES.get(self.status, self.status)}",
            f"Run {self.run_id}: {self.link}",
            self.detail,
        ]
        shown = [f"{label} {self.counts[key]:,}" for key, label in COUNTS if key in self.counts]
        if shown:
            lines.append("Rows: " + ", ".join(shown))
        return "\n".join(line for line in lines if line)


def row_error_share(counts: dict[str, int]) -> float:
    """Rows that failed (validation or at Braze) over the rows the run evaluated."""
    failed = counts.get("rows_rejected_by_validation", 0) + counts.get("rows_failed_at_braze", 0)
    evaluated = counts.get("rows_valid", 0) + counts.get("rows_rejected_by_validation", 0)
    return failed / evaluated if evaluated else 0.0


def first_line(message: str, limit: int = 300) -> str:
    line = (message or "").strip().splitlines()[0] if (message or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def step_failure_cause(event: dg.DagsterEvent) -> str:
    """A failed step's own words: a `dg.Failure`'s description, or the innermost cause of the
    error under Dagster's "Error occurred while executing op" wrapper."""
    data = event.step_failure_data
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description.strip()[:500]
    error = data.error
    if error is None:
        return "the step failed"
    while error.cause is not None:
        error = error.cause
    message = error.message.strip()
    qualified, sep, rest = message.partition(": ")
    if sep and qualified.rsplit(".", 1)[-1] == error.cls_name:
        message = f"{error.cls_name}: {rest}"
    return message[:500]


def failure_metadata(data: Any) -> dict[str, Any]:
    """The metadata a failed step carries (`dg.Failure(metadata=...)`, a `StepFailureData`'s),
    as plain values: a failed delivery's counts, the run having recorded no check result."""
    user = data.user_failure_data if data is not None else None
    return {name: value.value for name, value in (user.metadata if user is not None else {}).items()}


class AlertError(RuntimeError):
    """An alert could not be delivered on one channel (the others are still tried)."""


def send(alert: Alert, config: AlertsConfig) -> list[str]:
    """Deliver on every configured channel; returns what was sent. Raises `AlertError` naming the
    channels that failed after trying them all (never the webhook URL or SMTP password)."""
    sent, failures = [], []
    if config.emails:
        try:
            _email(alert, config.emails)
            sent.append(f"email to {len(config.emails)} recipient(s)")
        except (OSError, smtplib.SMTPException, AlertError) as exc:
            failures.append(f"email: {type(exc).__name__}: {first_line(str(exc), 120)}")
    if config.slack_webhook_env:
        try:
            _slack(alert, config.slack_webhook_env)
            sent.append("Slack")
        except (httpx.HTTPError, AlertError) as exc:
            failures.append(f"Slack: {type(exc).__name__}")
    if failures:
        raise AlertError(f"alert for sync {alert.sync} not delivered: " + "; ".join(failures))
    return sent


def _email(alert: Alert, recipients: list[str]) -> None:
    env = os.environ.get
    host = env("BRAZE_ASSETS_SMTP_HOST")
    if not host:
        raise AlertError("BRAZE_ASSETS_SMTP_HOST is not set")
    port = _smtp_port(env("BRAZE_ASSETS_SMTP_PORT") or "587")
    message = EmailMessage()
    message["Subject"] = alert.subject
    message["From"] = env("BRAZE_ASSETS_SMTP_FROM") or "braze-assets@localhost"
    message["To"] = ", ".join(recipients)
    message.set_content(alert.text())
    with smtplib.SMTP(host, port, timeout=15) as smtp:
        if env("BRAZE_ASSETS_SMTP_STARTTLS", "1") != "0":
            smtp.starttls()
        if env("BRAZE_ASSETS_SMTP_USER"):
            smtp.login(env("BRAZE_ASSETS_SMTP_USER") or "", env("BRAZE_ASSETS_SMTP_PASSWORD") or "")
        smtp.send_message(message)


def _smtp_port(value: str) -> int:
    """The port as an `AlertError` naming the variable when it is not one: a bare `int()` error
    named nothing, and being no `AlertError` it stopped `send` before Slack was tried."""
    port = int(value) if value.strip().isdecimal() else 0
    if not 1 <= port <= 65535:
        raise AlertError(f"BRAZE_ASSETS_SMTP_PORT must be a port number from 1 to 65535, got {value!r}")
    return port


def _slack(alert: Alert, webhook_env: str) -> None:
    url = os.environ.get(webhook_env)
    if not url:
        raise AlertError(f"{webhook_env} is not set")
    response = httpx.post(url, json={"text": f"*{alert.subject}*\n{alert.text()}"}, timeout=15)
    if response.status_code >= 300:
        raise AlertError(f"the Slack webhook answered {response.status_code}")
