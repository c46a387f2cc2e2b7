"""The sync configuration (`syncs.yaml`): one entry per integration, like CDI's dashboard.

Loaded and validated once when Definitions are built; a wrong file fails at load with an error that
names the sync and the field. This module holds what every sync has and the file itself; where a
sync reads from (one model per warehouse type) is in `config_sources.py`.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from braze_assets.braze.contract import PRIMARY_IDENTIFIERS
from braze_assets.config_sources import (
    BUCKET_NAME,
    SOURCE_TYPES,
    TABLE_NAME,
    BigQuerySourceConfig,
    DatabricksSourceConfig,
    DuckDBSourceConfig,
    RedshiftSourceConfig,
    S3SourceConfig,
    SnowflakeSourceConfig,
    SourceConfig,
    StrictModel,
)

#: The source models live in `config_sources.py`; they are importable from here too, where they were first.
__all__ = [
    "BUCKET_NAME",
    "DEFAULT_SYNCS_FILE",
    "MAX_LOOKBACK",
    "MAX_SCHEDULE_INTERVAL",
    "MIN_SCHEDULE_INTERVAL",
    "SOURCE_TYPES",
    "SYNC_NAME",
    "TABLE_NAME",
    "AlertsConfig",
    "AmbiguousPolicy",
    "BigQuerySourceConfig",
    "ConfigError",
    "DataType",
    "DatabricksSourceConfig",
    "DuckDBSourceConfig",
    "RedshiftSourceConfig",
    "S3SourceConfig",
    "ScheduleConfig",
    "SensorConfig",
    "SnowflakeSourceConfig",
    "SourceConfig",
    "SyncConfig",
    "SyncLogConfig",
    "SyncsFile",
    "load_syncs",
    "parse_syncs",
    "source_key_path",
    "syncs_path",
]

DataType = Literal["attributes", "events", "purchases", "deletions", "catalogs"]
#: What a sync does with rows whose outcome at Braze is unknown: send them again, or hold them.
AmbiguousPolicy = Literal["resend", "hold"]

DEFAULT_SYNCS_FILE = Path(__file__).with_name("syncs.yaml")
SYNC_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")

MIN_SCHEDULE_INTERVAL = dt.timedelta(minutes=15)
MAX_SCHEDULE_INTERVAL = dt.timedelta(days=31)
#: The longest lookback: every run re-reads its whole window, and rows older than a year are a
#: backfill's business; far beyond it, the watermark minus the lookback is before year 1.
MAX_LOOKBACK = dt.timedelta(days=365)
_BARE_NUMBER = re.compile(r"\s*[-+]?\d+(?:\.\d*)?\s*")


class ConfigError(ValueError):
    """The sync configuration is invalid; the message names the file, the sync and the field."""


class ScheduleConfig(StrictModel):
    cron: str = "0 * * * *"
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _frequency_in_cdi_range(self) -> ScheduleConfig:
        shortest, longest = _tick_gaps(self.cron)
        if shortest < MIN_SCHEDULE_INTERVAL or longest > MAX_SCHEDULE_INTERVAL:
            raise ValueError(
                f"cron {self.cron!r} runs every {shortest} to {longest}; syncs may run from "
                "every 15 minutes to once a month"
            )
        return self


@functools.lru_cache(maxsize=256)
def _tick_gaps(cron: str) -> tuple[dt.timedelta, dt.timedelta]:
    """The shortest and longest gap between a cron's ticks over a year. Cached: a year of a
    15-minute cron is 35,000 ticks (0.4 s), and every sync of a file often shares one cron."""
    # private: Dagster has no public API to validate or iterate a cron string
    from dagster._utils.schedules import cron_string_iterator, is_valid_cron_string

    if not is_valid_cron_string(cron):
        raise ValueError(f"cron {cron!r} is not a valid cron expression")
    # A year of ticks: a cron that runs often but only in some months must fail too. Judged
    # in UTC so daylight-saving shifts of the schedule's own zone do not count as gaps.
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    ticks = cron_string_iterator(start.timestamp(), cron, "UTC")
    times = [next(ticks)]
    while times[-1] < start + dt.timedelta(days=366) and len(times) < 40_000:
        times.append(next(ticks))
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return min(gaps, default=MAX_SCHEDULE_INTERVAL), max([times[0] - start, *gaps])


class SensorConfig(StrictModel):
    enabled: bool = Field(default=False, strict=True)
    minimum_interval_seconds: int = Field(default=60, ge=30, le=86_400, strict=True)


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


class AlertsConfig(StrictModel):
    """Who hears about a sync's runs, like CDI's contact emails: global errors always, row errors
    above a threshold, successes on request. Addresses are not secrets; the Slack webhook URL is,
    so config names the environment variable that holds it."""

    emails: list[str] = []
    #: environment variable holding a Slack incoming-webhook URL (a secret: never in config)
    slack_webhook_env: str | None = None
    #: also alert when a run succeeds
    on_success: bool = Field(default=False, strict=True)
    #: alert when more than this share of the run's rows failed (validation or at Braze)
    row_error_threshold: float = Field(default=0.0, ge=0.0, le=1.0, strict=True)

    @field_validator("emails")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            local, at, domain = address.partition("@")
            if not (local and at and "." in domain) or any(c.isspace() for c in address):
                raise ValueError(f"{address!r} is not an email address")
        return value

    @field_validator("slack_webhook_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an environment variable name (upper-case letters, digits, _); "
                "put the webhook URL in that variable, never in the config file"
            )
        return value


class SyncLogConfig(StrictModel):
    """How long the sync log keeps what it records (as CDI: rows 30 days, runs 12 months)."""

    #: After this many days a row's details (masked identifier, lookup hashes, reason or Braze's
    #: message) are cleared; its identity and status stay, as exactly-once delivery needs them.
    row_retention_days: int = Field(default=30, ge=1, le=3_650, strict=True)
    #: After this many days a run's record is deleted.
    run_retention_days: int = Field(default=365, ge=1, le=3_650, strict=True)


#: The mass-deletion guard's default limit (users per run).
MAX_DELETIONS = 1_000
#: Settings of /users/track syncs, refused elsewhere when not their default.
_USERS_TRACK_DEFAULTS: dict[str, Any] = {"update_existing_only": False, "batch_mode": "combined"}


class SyncConfig(StrictModel):
    """One integration: a source table synced to Braze as one data type.

    Booleans and numbers here and in the nested settings are strict (`strict=True`): pydantic
    would otherwise read `'yes'` or `1` as true and `'0.5'` as a number, so a quoting slip or a
    typo would change a sync's behaviour without a word."""

    name: str
    data_type: DataType
    source: SourceConfig
    description: str | None = None
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    sensor: SensorConfig = Field(default_factory=SensorConfig)
    #: Rows older than the watermark but within this window are still delivered (late arrivals).
    lookback: dt.timedelta = dt.timedelta(days=1)
    #: First day of the UPDATED_AT daily partitions (backfills can reach back to here).
    partitions_start: dt.date = dt.date(2024, 1, 1)
    update_existing_only: bool = Field(default=False, strict=True)
    batch_mode: Literal["combined", "legacy_per_array"] = "combined"
    #: What to do with rows whose outcome at Braze is unknown (timeout after sending, 500/504, drop).
    #: Defaults: resend where sending twice is harmless (attributes, deletions), hold where it
    #: would inflate counts and revenue (events, purchases).
    ambiguous_policy: AmbiguousPolicy | None = None
    #: The run's row-error-rate check blocks delivery above this fraction of rows read.
    max_row_error_rate: float = Field(default=0.2, ge=0.0, le=1.0, strict=True)
    #: ... judged only when a run evaluates at least this many rows: 1 bad row of 3 is no trend.
    min_rows_for_error_rate: int = Field(default=20, ge=0, strict=True)
    #: who hears about this sync's runs (email, Slack); none by default
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    #: Deletions only: the mass-deletion guard blocks a run that would delete more users than this.
    max_deletions: int = Field(default=MAX_DELETIONS, ge=1, strict=True)
    #: Requests in flight at once (bounds the window of ambiguous outcomes).
    max_in_flight: int = Field(default=32, ge=1, le=256, strict=True)
    #: Retention of the sync log (runs and rows), applied after every run
    sync_log: SyncLogConfig = Field(default_factory=SyncLogConfig)
    #: Attributes syncs: `changed` sends only attributes whose value differs from what Braze last
    #: accepted from this sync (attribute_diff.py); `full_payload` sends every row whole, as CDI.
    send: Literal["changed", "full_payload"] = "changed"
    #: Attributes syncs: keys always sent as they are, changed or not.
    always_send: list[str] = []
    #: Catalog syncs: the Braze catalog the items go to (it must exist, with its fields).
    catalog: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,250}$", validate_default=True)

    @field_validator("source", mode="before")
    @classmethod
    def _duckdb_by_default(cls, value: object) -> object:
        if isinstance(value, dict) and "type" not in value:
            return {**value, "type": "duckdb"}
        return value

    @field_validator("name")
    @classmethod
    def _asset_safe_name(cls, value: str) -> str:
        if not SYNC_NAME.fullmatch(value):
            raise ValueError(f"{value!r} must be lower-case letters, digits and _, starting with a letter")
        return value

    @field_validator("lookback", mode="before")
    @classmethod
    def _duration_with_a_unit(cls, value: object) -> object:
        """pydantic reads a bare number as seconds: `lookback: 2` would silently be 2 seconds
        where days were likely meant, so a duration must say its unit."""
        if isinstance(value, (int, float)) or (isinstance(value, str) and _BARE_NUMBER.fullmatch(value)):
            raise ValueError(
                "lookback needs a unit: write an ISO 8601 duration such as P2D (2 days), PT6H "
                f"(6 hours) or PT0S (none), not the bare number {value!r}"
            )
        return value

    @field_validator("lookback")
    @classmethod
    def _within_limits(cls, value: dt.timedelta) -> dt.timedelta:
        if value < dt.timedelta(0):
            raise ValueError("lookback must not be negative")
        if value > MAX_LOOKBACK:
            raise ValueError(
                f"lookback {value} is longer than the limit of {MAX_LOOKBACK.days} days "
                f"(P{MAX_LOOKBACK.days}D); backfill the days before it instead"
            )
        return value

    @field_validator("partitions_start")
    @classmethod
    def _not_in_the_future(cls, value: dt.date) -> dt.date:
        """A first day still ahead has no partition to sync or backfill: most likely a typo of the
        year, better said at load than by runs that find no day. Days are UTC, as the partitions."""
        today = dt.datetime.now(dt.UTC).date()
        if value > today:
            raise ValueError(
                f"{value.isoformat()} is after today ({today.isoformat()} UTC): no day from it can be "
                "synced yet; give the first UPDATED_AT day backfills may reach, today at the latest"
            )
        return value

    @field_validator("send", "always_send")
    @classmethod
    def _diff_only_for_attributes(cls, value: Any, info: ValidationInfo) -> Any:
        data_type = info.data.get("data_type")
        if data_type is not None and data_type != "attributes":
            raise ValueError(
                f"{info.field_name} applies to attributes syncs only (Braze bills events and purchases "
                f"per row, not per attribute); remove it from this {data_type} sync"
            )
        return value

    @field_validator("always_send")
    @classmethod
    def _attribute_keys(cls, value: list[str]) -> list[str]:
        for key in value:
            if not key.strip():
                raise ValueError("always_send lists an empty key; list attribute names")
            if key in PRIMARY_IDENTIFIERS:  # email and phone are attributes too
                raise ValueError(
                    f"{key!r} is an identifier, not an attribute: identifiers come from their own "
                    "columns and are in every object already"
                )
        return value

    # Settings of other data types are refused rather than ignored. Each is checked only when set
    # (a field validator runs for values given), against `data_type`, validated before them.
    @field_validator("update_existing_only", "batch_mode")
    @classmethod
    def _users_track_only(cls, value: Any, info: ValidationInfo) -> Any:
        data_type = info.data.get("data_type")
        if data_type in ("deletions", "catalogs") and value != _USERS_TRACK_DEFAULTS[str(info.field_name)]:
            raise ValueError(
                f"{info.field_name} applies to attributes, events and purchases syncs (Braze's "
                f"/users/track); a {data_type} sync has no such choice: remove it"
            )
        return value

    @field_validator("max_deletions")
    @classmethod
    def _deletions_only(cls, value: int, info: ValidationInfo) -> int:
        data_type = info.data.get("data_type")
        if data_type is not None and data_type != "deletions" and value != MAX_DELETIONS:
            raise ValueError(
                f"max_deletions applies to deletions syncs only; remove it from this {data_type} sync"
            )
        return value

    @field_validator("catalog")
    @classmethod
    def _catalog_names_its_catalog(cls, value: str | None, info: ValidationInfo) -> str | None:
        data_type = info.data.get("data_type")
        if data_type is None:  # not a valid data type: said already, under data_type
            return value
        if data_type == "catalogs" and not value:
            raise ValueError("a catalogs sync needs catalog: the name of the Braze catalog its items go to")
        if data_type != "catalogs" and value:
            raise ValueError(f"catalog applies to catalogs syncs only; remove it from this {data_type} sync")
        return value

    @property
    def endpoint(self) -> str:
        """The Braze REST path this sync sends to."""
        from braze_assets.datatypes import DATA_TYPES

        return DATA_TYPES[self.data_type].endpoint.format(catalog=self.catalog)

    @property
    def diff_attributes(self) -> bool:
        """Whether the delta sends only changed attributes (`send: changed` on attributes)."""
        return self.data_type == "attributes" and self.send == "changed"

    @property
    def effective_ambiguous_policy(self) -> AmbiguousPolicy:
        if self.ambiguous_policy:
            return self.ambiguous_policy
        return "hold" if self.data_type in ("events", "purchases") else "resend"


def _key_part(name: str) -> str:
    """A table or folder name as an asset key part: Dagster takes letters, digits and `_` only,
    so anything else (spaces in a quoted name, `-`, `$`) becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "_"


def source_key_path(sync: SyncConfig) -> list[str]:
    """The asset key of a sync's source: `[type, *table parts]` or `[s3, bucket, *folders]`."""
    if sync.source.type == "s3":
        folder = [p for p in sync.source.prefix.split("/") if p]
        return [_key_part(p) for p in ("s3", sync.source.bucket, *folder)]
    parts = re.findall(r'"([^"]*)"|([^."]+)', sync.source.table)
    return [sync.source.type, *(_key_part((quoted or plain).lower()) for quoted, plain in parts)]


class SyncsFile(StrictModel):
    syncs: list[SyncConfig]

    @model_validator(mode="after")
    def _unique(self) -> SyncsFile:
        seen: dict[str, str] = {}
        for sync in self.syncs:
            if sync.name in seen:
                raise ValueError(f"sync name {sync.name!r} is used twice")
            seen[sync.name] = sync.name
        by_table: dict[str, list[str]] = {}
        for sync in self.syncs:
            by_table.setdefault(sync.source.table.lower(), []).append(sync.name)
        folders = sorted(t for t in by_table if t.startswith("s3://"))
        for outer, inner in zip(folders, folders[1:], strict=False):
            if inner.startswith(outer):  # nested keys are read: CDI needs a folder per sync
                raise ValueError(
                    f"S3 folders {outer!r} and {inner!r} overlap (syncs "
                    f"{by_table[outer][0]!r} and {by_table[inner][0]!r})"
                )
        for table, names in by_table.items():
            if len(names) > 1:
                raise ValueError(
                    f"table {table!r} feeds two syncs; CDI allows one sync per table "
                    f"(syncs {', '.join(repr(n) for n in names)})"
                )
        by_key: dict[str, SyncConfig] = {}
        for sync in self.syncs:
            key = "/".join(source_key_path(sync))
            other = by_key.setdefault(key, sync)
            if other is not sync:
                raise ValueError(
                    f"tables {other.source.table!r} (sync {other.name!r}) and "
                    f"{sync.source.table!r} (sync {sync.name!r}) get the same asset key {key!r} "
                    "(names differ only in characters an asset key cannot hold); rename one"
                )
        return self


def _describe(error: ErrorDetails, raw: dict[str, Any]) -> str:
    # pydantic names the union member in the location (source.duckdb.table): drop it
    loc = [
        part
        for i, part in enumerate(error["loc"])
        if not (i and error["loc"][i - 1] == "source" and part in SOURCE_TYPES)
    ]
    where = ".".join(str(p) for p in loc)
    if len(loc) >= 2 and loc[0] == "syncs" and isinstance(loc[1], int):
        entries = raw.get("syncs") or []
        name = (
            entries[loc[1]].get("name")
            if loc[1] < len(entries) and isinstance(entries[loc[1]], dict)
            else None
        )
        field = ".".join(str(p) for p in loc[2:]) or "(entry)"
        where = f"sync {name or '#' + str(loc[1] + 1)!r}, field {field!r}"
    return f"{where}: {error['msg']}"


def parse_syncs(raw: object, origin: str = "syncs.yaml") -> list[SyncConfig]:
    """Validate an already-parsed YAML document; raise ConfigError naming sync and field."""
    if not isinstance(raw, dict) or "syncs" not in raw:
        raise ConfigError(f"{origin}: expected a mapping with a 'syncs' list")
    try:
        return SyncsFile.model_validate(raw).syncs
    except ValidationError as exc:
        lines = [_describe(e, raw) for e in exc.errors()]
        raise ConfigError(f"{origin} is invalid:\n  " + "\n  ".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping: `data_type: events` then
    `data_type: deletions` silently became a deletions sync. A key given twice is an error here.
    Keys a `<<` merge brings in may still be overridden: that is what a merge is for."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            lines[key] = line
            if first is not None:
                where = f"line {line}" if first == line else f"lines {first} and {line}"
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice in one mapping ({where}); only one can count: "
                    "remove the other",
                )
        return super().construct_mapping(node, deep=deep)


def syncs_path() -> Path:
    return Path(os.environ.get("BRAZE_ASSETS_SYNCS") or DEFAULT_SYNCS_FILE)


def load_syncs(path: Path | str | None = None) -> list[SyncConfig]:
    path = Path(path) if path else syncs_path()
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except FileNotFoundError:
        raise ConfigError(f"sync configuration {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_syncs(raw, origin=str(path))
