"""A throw-away PostgreSQL server on loopback: the Redshift stand-in and the state backend of the
tests, and the server of the state-backend benchmark. `scripts/ensure-postgres` (run by `make
test`) installs the Debian binaries."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


class PostgresMissing(RuntimeError):
    """The server binaries are not installed."""


@contextlib.contextmanager
def throwaway_postgres(*, fsync: bool = False) -> Iterator[dict]:
    """Start a server in a temporary directory; yields host, port, user and database. `fsync`
    off (the tests) trades durability on power loss for speed; a benchmark keeps it on."""
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = installed[-1] if installed else shutil.which("initdb")
    if not initdb:
        raise PostgresMissing("PostgreSQL server binaries are missing: run scripts/ensure-postgres")
    bindir = Path(initdb).parent
    root = Path(tempfile.mkdtemp(prefix="braze-assets-pg-"))  # reachable by the postgres user
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "braze", "-A", "trust", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync={'on' if fsync else 'off'}"
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(root / "log"),
            "-o",
            options,
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield {"host": "127.0.0.1", "port": port, "user": "braze", "database": "postgres"}
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)
