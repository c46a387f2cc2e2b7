"""The README's demo command, run as a user would: a subprocess on a fresh home directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _demo(home, *extra) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "braze_assets.cli",
            "demo",
            "--home",
            str(home),
            "--port",
            "0",
            "--json",
            "--log-level",
            "WARNING",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("BRAZE_")},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


def test_demo_syncs_every_valid_row_once_reports_bad_rows_and_reruns_send_nothing(tmp_path):
    first = _demo(tmp_path / "home")
    by_name = {s["sync"]: s for s in first["syncs"]}
    # the seed's bad rows are rejected on purpose: every sync with bad rows ends partially successful
    assert {s["sync"]: s["status"] for s in first["syncs"]} == {
        **dict.fromkeys(
            ["user_attributes", "app_events", "store_purchases", "user_deletions"], "partial_success"
        ),
        "profile_snapshot": "success",
    }
    assert by_name["profile_snapshot"]["accepted"] == 2000
    assert by_name["profile_snapshot"]["data_points_sent"] == 8000
    expected_valid = {
        "user_attributes": 2500,
        "app_events": 4000,
        "store_purchases": 1500,
        "user_deletions": 150,
    }
    for name, valid in expected_valid.items():
        assert by_name[name]["accepted"] == valid, name
        assert by_name[name]["future_held_back"] == 1
    emulator = first["emulator"]
    assert (emulator["events"], emulator["purchases"], emulator["deletions"]) == (4000, 1500, 150)
    events_reasons = by_name["app_events"]["rejected_reasons"]
    assert set(events_reasons) >= {
        "PAYLOAD is not valid JSON",
        "PAYLOAD must be a JSON object",
        "UPDATED_AT is null",
        "row has several identifier types (CDI rows carry exactly one)",
        "ALIAS_NAME is set but ALIAS_LABEL is empty (a user alias needs both)",
        "EXTERNAL_ID is longer than 987 bytes (EXTERNAL_USER_ID_TOO_LARGE)",
        "Payload was greater than 1MB",
        "PAYLOAD contains identifier keys (identifiers belong in their own columns)",
        "event PAYLOAD has no 'name' (a non-empty string)",
        "event 'time' is not ISO 8601",
    }
    # The seed's bad event rows: 9 common kinds + 2 event kinds, one each, every one reported.
    assert by_name["app_events"]["rejected"] == 11 == sum(events_reasons.values())
    assert by_name["store_purchases"]["rejected"] == 15
    assert by_name["user_deletions"]["rejected"] == 6

    second = _demo(tmp_path / "home")
    again = {s["sync"]: s for s in second["syncs"]}
    snapshot = again.pop("profile_snapshot")
    assert all(s["status"] == "success" and s["accepted"] == 0 and s["requests"] == 0 for s in again.values())
    assert second["emulator"]["events"] == 4000, "the emulator's store persists across runs"
    # The snapshot view restamped every member and the CRM changed 1% of them (20): only those
    # members' changed attribute goes out, the rest is settled as unchanged.
    assert snapshot["status"] == "success"
    assert (snapshot["accepted"], snapshot["unchanged"]) == (20, 1980)
    assert (snapshot["data_points_sent"], snapshot["data_points_saved"]) == (20, 7980)
