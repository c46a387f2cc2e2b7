"""The results table (printed and written to RESULTS.md) and the machine it was measured on."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "aiohttp",
    "httpx",
    "httpx-aiohttp",
    "tenacity",
    "orjson",
    "duckdb",
    "pyarrow",
    "pandas",
    "pandera",
    "dagster",
    "requests",
    "braze-client",
)


@dataclass
class Row:
    case: str
    data_type: str = "attributes"
    latency_ms: float = 0.0
    rows: int = 0
    seconds: float = 0.0
    objects: int = 0
    requests: int | None = None
    r429: int | None = None
    peak_rss_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def objects_per_s(self) -> float:
        return self.objects / self.seconds if self.seconds else 0.0

    @property
    def admitted(self) -> int:
        """Requests answered other than 429 (0 when no emulator counted them)."""
        return (self.requests or 0) - (self.r429 or 0)

    @property
    def refused_share(self) -> float:
        """The share of requests answered 429 (0 when no emulator counted them)."""
        return (self.r429 or 0) / max(self.requests or 0, 1)

    @property
    def requests_per_s(self) -> float | None:
        return self.requests / self.seconds if self.seconds and self.requests is not None else None

    def to_dict(self) -> dict:
        return {**asdict(self), "objects_per_s": self.objects_per_s, "requests_per_s": self.requests_per_s}


def _n(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = [
        (
            "| case | type | latency | rows | seconds | objects/s | requests/s | 429s | "
            "peak RSS MiB | load | notes |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.extra.get("skipped") or r.extra.get("error"):
            lines.append(
                f"| {r.case} | {r.data_type} | {r.latency_ms:g} ms | {r.rows:,} | — | — | "
                f"— | — | — | — | {r.note} |"
            )
            continue
        lines.append(
            f"| {r.case} | {r.data_type} | {r.latency_ms:g} ms | {r.rows:,} | {r.seconds:,.2f} | "
            f"{_n(r.objects_per_s)} | {_n(r.requests_per_s)} | {_n(r.r429)} | "
            f"{_n(r.peak_rss_mib)} | {_n(r.extra.get('load_1min'), 1)} | {r.note} |"
        )
    return "\n".join(lines)


def section(title: str, setup: str, rows: list[Row], targets: Iterable[tuple[str, str, bool]]) -> str:
    """A case's RESULTS.md section: its title, when and on what (`setup` follows the date and the
    cores), the rows' table, then its targets as (target, measured, met)."""
    lines = [
        f"## {title}",
        "",
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores; {setup}",
        "",
        table(rows),
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {target} | {value} | {'yes' if met else 'no'} |" for target, value, met in targets]
    return "\n".join(lines) + "\n"


def loads(before: tuple, after: tuple) -> str:
    """Load averages (1/5/15 min) before and after a case, as its section says them."""
    return f"before: {'/'.join(f'{x:.2f}' for x in before)}, after: {'/'.join(f'{x:.2f}' for x in after)}"


def _sh(*command: str) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip("\n")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine(load_before: tuple, load_after: tuple) -> str:
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return "\n".join(
        [
            f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            (
                f"- machine: `nproc` = {_sh('nproc')}, {platform.machine()}, "
                f"{platform.system()} {platform.release()}"
            ),
            "- `free -h`:\n\n```\n" + _sh("free", "-h") + "\n```\n",
            f"- Python {platform.python_version()}; {', '.join(versions)}",
            (
                f"- load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, "
                f"after: {'/'.join(f'{x:.2f}' for x in load_after)} (other processes on this machine, "
                f"e.g. test suites, compete for its {os.cpu_count()} cores: compare cases by their "
                "load)"
            ),
        ]
    )
