"""Synthetic CDI tables generated inside DuckDB (SQL `range()` + string concatenation: seconds for
millions of rows, no Python row loop)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb

#: data type -> table name in the benchmark warehouse
TABLES = {"attributes": "cdi_attributes", "events": "cdi_events", "purchases": "cdi_purchases"}

_PAYLOAD_SQL = {
    # ~6 custom attributes per user, ~130 bytes
    "attributes": """'{"first_name":"Ada' || (i % 977)::VARCHAR
        || '","tier":"' || ['bronze','silver','gold'][1 + i % 3]
        || '","points":' || (i % 5000)::VARCHAR
        || ',"city":"' || ['Lyon','Oslo','Lima','Pune'][1 + i % 4]
        || '","is_vip":' || CASE WHEN i % 10 = 0 THEN 'true' ELSE 'false' END
        || ',"signup_date":"2020-01-' || lpad((1 + i % 28)::VARCHAR, 2, '0') || '"}'""",
    # no `time`: CDI takes it from UPDATED_AT
    "events": """'{"name":"' || ['app_open','viewed_product','added_to_cart','search'][1 + i % 4]
        || '","properties":{"sku":"sku-' || (i % 500)::VARCHAR || '","seq":' || i::VARCHAR || '}}'""",
    "purchases": """'{"product_id":"sku-' || (i % 500)::VARCHAR
        || '","currency":"' || ['USD','EUR','GBP'][1 + i % 3]
        || '","price":' || (1 + i % 200)::VARCHAR || '.99,"quantity":' || (1 + i % 3)::VARCHAR
        || ',"properties":{"seq":' || i::VARCHAR || '}}'""",
}


def create_table(
    con: duckdb.DuckDBPyConnection, table: str, data_type: str, rows: int, now: dt.datetime
) -> None:
    """`rows` valid CDI rows (UPDATED_AT spread over the 30 days before `now`, distinct users)."""
    start = (now - dt.timedelta(days=30)).replace(tzinfo=None)
    step_us = max(1, int(29 * 86_400 * 1e6 // max(rows, 1)))
    users = "'user-' || i::VARCHAR" if data_type == "attributes" else "'user-' || (i % 200000)::VARCHAR"
    con.execute(f"""
        CREATE OR REPLACE TABLE {table} AS
        SELECT TIMESTAMP '{start.isoformat(sep=" ")}' + to_microseconds(i * {step_us})
                   AS UPDATED_AT,
               {users} AS EXTERNAL_ID,
               {_PAYLOAD_SQL[data_type]} AS PAYLOAD
        FROM range({int(rows)}) t(i)""")


def generate(path: Path, rows: dict[str, int], now: dt.datetime) -> dict[str, int]:
    """Create every `{table: rows}` wanted (table names from TABLES or `<table>_<n>`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(path)) as con:
        for table, count in rows.items():
            data_type = next(k for k, v in TABLES.items() if table.startswith(v))
            create_table(con, table, data_type, count, now)
    return rows
