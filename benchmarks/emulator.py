"""The Braze emulator in its own process (its CLI, `--lean`), so it never shares a GIL with the
sender being measured."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

API_KEY = "benchmark-key"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pin_process(pid: int, cpus: set[int]) -> None:
    """Confine every thread of process `pid` to `cpus` (affinity is per thread; the threads and
    processes it starts later inherit it). A process or thread that ended meanwhile is skipped."""
    with contextlib.suppress(FileNotFoundError):
        tasks = os.listdir(f"/proc/{pid}/task")
        for task in tasks:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(task), cpus)


class EmulatorProcess:
    """`with EmulatorProcess(latency_ms=50) as braze: braze.base_url, braze.stats(), braze.reset()`"""

    def __init__(self, latency_ms: float = 0.0, rate_limit: int | None = None, rate_window_s: float = 3.0):
        self.latency_ms, self.rate_limit, self.rate_window_s = latency_ms, rate_limit, rate_window_s
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        args = [
            sys.executable,
            "-m",
            "braze_assets.braze.emulator",
            "--port",
            str(self.port),
            "--lean",
            "--latency-ms",
            str(self.latency_ms),
        ]
        if self.rate_limit:
            args += ["--rate-limit", str(self.rate_limit), "--rate-window", str(self.rate_window_s)]
        env = {**os.environ, "BRAZE_API_KEY": API_KEY}
        self._proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self._get("health")["status"] == "ok":
                    return self
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the emulator did not start (exit code {self._proc.returncode})")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def pin(self, cpus: set[int]) -> None:
        """Confine the emulator (every thread it has) to `cpus`."""
        assert self._proc is not None
        pin_process(self._proc.pid, cpus)

    def cpu_s(self) -> float:
        """CPU seconds the emulator's process has used so far (user and system)."""
        if self._proc is None:
            return 0.0
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _get(self, name: str) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/_emulator/{name}", timeout=10) as answer:
            return json.loads(answer.read())

    def stats(self) -> dict:
        return self._get("stats")

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.base_url}/_emulator/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass
