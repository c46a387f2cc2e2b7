"""Runs the state migrations on the connection `postgres_schema.ensure_schema` holds: inside its
transaction (which holds the migration lock), with the search path on the state schema, so the
tables and alembic's version table land there."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
