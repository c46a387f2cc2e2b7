"""Ctrl-C on `braze-assets ui` stops everything it started within seconds: `dg dev` with its
Dagster webserver, daemon and code servers (one process group) and the Braze emulator. It starts
without Dagster's supersession and beta notices."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from braze_assets_tests.conftest import process_group
from braze_assets_tests.production_stack import free_port

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _described(pid: int) -> str:
    """A process's command line, state and where in the kernel it waits."""
    proc = Path("/proc") / str(pid)
    try:
        command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        waits = (proc / "wchan").read_text()
    except OSError:
        return f"{pid}: gone"
    return f"{pid} [{state}, {waits}]: {command}"


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_stops_the_ui_and_the_emulator_within_seconds(tmp_path):
    emulator_port, ui_port = free_port(), free_port()
    env = {**os.environ, "BRAZE_ASSETS_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    env.pop("BRAZE_ASSETS_SYNCS", None)
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "braze_assets.cli",
            "ui",
            "--port",
            str(emulator_port),
            "--ui-port",
            str(ui_port),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # Read the output as it comes: the UI's processes hold the same pipe, so reading it to its end
    # would block while any of them still runs, and a failure could not show what they wrote.
    chunks: list[bytes] = []
    assert cli.stdout is not None
    reader = threading.Thread(target=lambda: chunks.extend(iter(cli.stdout.readline, b"")), daemon=True)
    reader.start()
    dg_dev = 0
    try:
        deadline = time.monotonic() + 150
        while True:
            assert cli.poll() is None, b"".join(chunks).decode()[-3000:]
            assert time.monotonic() < deadline, "the UI never came up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/server_info", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        [dg_dev] = _children(cli.pid)
        assert (Path("/proc") / str(dg_dev) / "cmdline").read_bytes().split(b"\0")[1:4] == [
            b"-m",
            b"dagster_dg_cli.cli",
            b"dev",
        ]
        started = process_group(dg_dev)
        assert len(started) >= 2 and _listening(emulator_port)  # webserver, daemon, code server...

        cli.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        try:
            cli.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say where it stopped, for whoever reads the failure
            left = [_described(pid) for pid in [cli.pid, *process_group(dg_dev)]]
            output = b"".join(chunks).decode()
            raise AssertionError(
                f"still running 30 s after Ctrl-C: {left}; output: {output[-3000:]}"
            ) from None
        stopped_by = time.monotonic() + 5
        while process_group(dg_dev) and time.monotonic() < stopped_by:
            time.sleep(0.2)
        assert process_group(dg_dev) == [], "processes of the UI are still running"
        assert not _listening(emulator_port) and not _listening(ui_port)
        reader.join(timeout=10)
        output = b"".join(chunks).decode()
        assert "Serving dagster-webserver" in output and "Dagster services shut down" in output
        for noise in ("SupersessionWarning", "BetaWarning", "Invalid -W option"):
            assert noise not in output, output[-3000:]
    finally:
        if cli.poll() is None:
            cli.kill()
        # `dg dev` runs in a session of its own: a failed stop would leave its webserver, daemon
        # and runs going for the rest of the suite
        for pid in process_group(cli.pid) + (process_group(dg_dev) if dg_dev else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN])
def test_ctrl_c_stops_the_ui_whatever_its_process_inherited(monkeypatch, inherited):
    """The UI stops on SIGINT through its own handler, not KeyboardInterrupt. A process started
    with SIGINT ignored (any background job of a non-interactive shell, a script's `&`) never
    gets Python's KeyboardInterrupt; and where it does, an interrupt raised inside a finalizer is
    printed and lost. Here the child's wait swallows it, as such a finalizer would."""
    from braze_assets import cli

    stopped: list[object] = []

    class Child:
        pid = os.getpid()
        waits = 0

        def wait(self, timeout: float) -> int:
            Child.waits += 1
            assert Child.waits < 40, "still waiting for the UI 4 s after Ctrl-C"
            with contextlib.suppress(KeyboardInterrupt):  # lost, as in a finalizer
                time.sleep(timeout)
            raise subprocess.TimeoutExpired("dg dev", timeout)

    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: Child())
    monkeypatch.setattr(cli, "UI_WAIT_S", 0.1)
    monkeypatch.setattr(cli, "_stop_group", stopped.append)
    before = signal.signal(signal.SIGINT, inherited)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        assert cli.run_ui(0) == 0
        assert len(stopped) == 1 and signal.getsignal(signal.SIGINT) is inherited
    finally:
        signal.signal(signal.SIGINT, before)
