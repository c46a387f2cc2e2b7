"""Connections to the PostgreSQL state backend, and its schema, migrated on first use.

The URL is `postgresql://user[:password]@host[:port]/db[?schema=name]` (default schema
`braze_assets`): the state may share a server and database with Dagster's own storage, in its own
schema. Versioned migrations (alembic, `migrations/`) run once per process, under an advisory lock
so pods starting together migrate once; each later connection only sets its search_path.
"""

from __future__ import annotations

import functools
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: `postgresql://user[:password]@host:port/db[?schema=name]`: keep the delivery state (and the
#: shared rate budget) in PostgreSQL instead of files under the state directory.
STATE_URL_ENV = "BRAZE_ASSETS_STATE_URL"
DEFAULT_SCHEMA = "braze_assets"
#: The newest migration (migrations/versions/). A database already there needs no alembic at all:
#: one query, so a process (a pod) that starts while others run pays no migration lock or import.
HEAD_REVISION = "0005"
#: Serialises migrations of several processes starting at once.
_MIGRATION_LOCK_ID = 0x62_72_61_7A_65_6D  # "brazem"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def state_url_from_environment() -> str | None:
    """$BRAZE_ASSETS_STATE_URL, or None when unset or blank (the embedded backend)."""
    return os.environ.get(STATE_URL_ENV, "").strip() or None


class StateUrlError(ValueError):
    """BRAZE_ASSETS_STATE_URL is not a usable PostgreSQL URL."""


class StateUnreachableError(RuntimeError):
    """The state database in BRAZE_ASSETS_STATE_URL refused or never answered a connection."""


@dataclass(frozen=True)
class StateDatabase:
    """Where the state lives: a libpq URL (without `schema`) and the schema."""

    dsn: str
    schema: str

    @classmethod
    def from_url(cls, url: str) -> StateDatabase:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("postgresql", "postgres"):
            raise StateUrlError(
                "BRAZE_ASSETS_STATE_URL must be a postgresql:// URL "
                f"(postgresql://user@host:port/db), got {masked_url(url)!r}"
            )
        query = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
        schemas = [v for k, v in query if k == "schema"]
        schema = schemas[-1] if schemas else DEFAULT_SCHEMA
        if not _SCHEMA_NAME.match(schema):
            raise StateUrlError(
                f"BRAZE_ASSETS_STATE_URL: schema {schema!r} must be a lower-case SQL name "
                "(letters, digits, underscores)"
            )
        rest = urllib.parse.urlencode([(k, v) for k, v in query if k != "schema"])
        return cls(urllib.parse.urlunsplit(parsed._replace(query=rest)), schema)

    @property
    def shown(self) -> str:
        return f"PostgreSQL at {masked_url(self.dsn)} (schema {self.schema})"

    def connect(self, purpose: str, *, autocommit: bool = False) -> Any:
        """A psycopg2 connection in UTC with the state schema first on its search_path."""
        ensure_schema(self)
        return _connect(self, purpose, autocommit=autocommit)


def _connect(db: StateDatabase, purpose: str, *, autocommit: bool) -> Any:
    import psycopg2

    try:
        connection = psycopg2.connect(
            db.dsn,
            application_name=f"braze_assets {purpose}",
            connect_timeout=10,
            options=f"-c search_path={db.schema} -c timezone=UTC",
            # a pod that vanishes without closing its socket: the client notices a dead server...
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
    except psycopg2.OperationalError as exc:  # libpq's words name host and user, never a password
        reason = " ".join(str(exc).split())
        raise StateUnreachableError(
            f"BRAZE_ASSETS_STATE_URL: cannot connect to the state database, {db.shown}: {reason}"
        ) from None
    connection.autocommit = autocommit
    return connection


def _at_head(db: StateDatabase) -> bool:
    import psycopg2

    connection = _connect(db, "schema check", autocommit=True)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT version_num FROM alembic_version")
            return [r[0] for r in cursor.fetchall()] == [HEAD_REVISION]
    except psycopg2.errors.UndefinedTable:
        return False
    finally:
        connection.close()


def masked_url(url: str) -> str:
    """The URL without its password, for messages."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.netloc.rsplit("@", 1)[-1]
    user = f"{parsed.username}@" if parsed.username else ""
    query = "&".join(
        part for part in parsed.query.split("&") if part and not part.lower().startswith("password")
    )
    return urllib.parse.urlunsplit(parsed._replace(netloc=user + host, query=query))


@functools.cache
def ensure_schema(db: StateDatabase) -> None:
    """Create the schema and apply every pending migration (once per process and database)."""
    if _at_head(db):
        return
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    engine = sa.create_engine(
        "postgresql+psycopg2://",
        creator=lambda: _connect(db, "migrations", autocommit=False),
        poolclass=sa.pool.NullPool,
    )
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            connection.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"'))
            config = Config()
            config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
    except sa.exc.DBAPIError as exc:  # the driver's own error, as every other connection raises it
        if isinstance(exc.orig, BaseException):
            raise exc.orig from None
        raise
    finally:
        engine.dispose()
