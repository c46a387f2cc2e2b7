"""Realistic sample CDI tables for the embedded DuckDB warehouse (the demo and the tests).

Deterministic for a given `now`: thousands of valid rows per data type spread over the last days, plus
bad rows of every kind the product must reject with a specific reason (`BAD_ROWS` documents them).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import duckdb

TABLES = {
    "attributes": "braze_user_attributes",
    "events": "braze_events",
    "purchases": "braze_purchases",
    "deletions": "braze_user_deletes",
}
_ID_COLUMNS = (
    "EXTERNAL_ID VARCHAR, ALIAS_NAME VARCHAR, ALIAS_LABEL VARCHAR, BRAZE_ID VARCHAR, "
    "EMAIL VARCHAR, PHONE VARCHAR"
)
_COLUMNS = ("UPDATED_AT", "EXTERNAL_ID", "ALIAS_NAME", "ALIAS_LABEL", "BRAZE_ID", "EMAIL", "PHONE", "PAYLOAD")
_EVENT_NAMES = ("app_open", "viewed_product", "added_to_cart", "search", "shared_item")
_PRODUCTS = ("sku-tee", "sku-mug", "sku-cap", "sku-hoodie", "sku-socks")
_CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CAD")


def cdi_row(updated_at, payload=None, **ids):
    row = {c: None for c in _COLUMNS}
    row.update({k.upper(): v for k, v in ids.items()}, UPDATED_AT=updated_at, PAYLOAD=payload)
    return row


def _identity(rng: random.Random, i: int) -> dict:
    """Most rows by external id; some by alias, email or phone, as real CRM tables have."""
    pick = rng.random()
    if pick < 0.85:
        return {"external_id": f"user-{i:06d}"}
    if pick < 0.93:
        return {"alias_name": f"anon-{i:06d}", "alias_label": "web_visitor"}
    if pick < 0.97:
        return {"email": f"customer{i}@example.com"}
    return {"phone": f"+1415555{i % 10000:04d}"}


def _common_bad_rows(ts: dt.datetime, kind: str) -> list[dict]:
    """Bad rows every payload-bearing data type must reject (one reason each)."""
    payloads: dict[str, dict[str, object]] = {
        "attributes": {"tier": "gold"},
        "events": {"name": "app_open"},
        "purchases": {"product_id": "sku-tee", "currency": "USD", "price": 10.0},
    }
    good = payloads[kind]
    dump = json.dumps
    return [
        cdi_row(ts, "{not json", external_id="bad-json"),
        cdi_row(ts, dump([1, 2, 3]), external_id="bad-not-object"),
        cdi_row(ts, dump(good)),  # no identifier at all
        cdi_row(ts, dump(good), external_id="bad-two-ids", email="two@example.com"),
        cdi_row(ts, dump(good), alias_name="bad-alias-no-label"),
        cdi_row(ts, dump(good), external_id="x" * 988),
        cdi_row(ts, dump({**good, "blob": "y" * (1024 * 1024)}), external_id="bad-huge-payload"),
        cdi_row(ts, dump({**good, "external_id": "sneaky"}), external_id="bad-id-in-payload"),
        cdi_row(None, dump(good), external_id="bad-null-updated-at"),
    ]


def _type_bad_rows(ts: dt.datetime, kind: str) -> list[dict]:
    dump = json.dumps
    if kind == "attributes":
        return [cdi_row(ts, dump({f"attr_{n}": n for n in range(251)}), external_id="bad-251-attrs")]
    if kind == "events":
        return [
            cdi_row(ts, dump({"properties": {"a": 1}}), external_id="bad-event-no-name"),
            cdi_row(ts, dump({"name": "app_open", "time": "yesterday-ish"}), external_id="bad-event-time"),
        ]
    if kind == "purchases":
        base = {"product_id": "sku-tee", "currency": "USD", "price": 10.0}
        return [
            cdi_row(ts, dump({"currency": "USD", "price": 5.0}), external_id="bad-no-product"),
            cdi_row(ts, dump({"product_id": "sku-tee", "price": 5.0}), external_id="bad-no-currency"),
            cdi_row(ts, dump({"product_id": "sku-tee", "currency": "USD"}), external_id="bad-no-price"),
            cdi_row(ts, dump({**base, "currency": "XYZ"}), external_id="bad-currency"),
            cdi_row(ts, dump({**base, "quantity": 500}), external_id="bad-quantity"),
            cdi_row(ts, dump({**base, "price": "ten dollars"}), external_id="bad-price"),
        ]
    return []


def sample_rows(kind: str, now: dt.datetime, count: int, seed: int = 7) -> list[dict]:
    """`count` valid rows of a data type (UPDATED_AT over the last 10 days), then the bad rows."""
    rng = random.Random(f"{seed}-{kind}")
    rows = []
    for i in range(count):
        ts = now - dt.timedelta(seconds=rng.randint(60, 10 * 86_400))
        ids = _identity(rng, i % 2500)
        if kind == "attributes":
            payload = {
                "first_name": rng.choice(["Ana", "Bo", "Chen", "Dee", "Eli"]),
                "loyalty_points": rng.randint(0, 5000),
                "plan": rng.choice(["free", "pro"]),
                "favorite_colors": rng.sample(["red", "green", "blue", "black"], 2),
            }
            if "external_id" in ids:
                payload["email"] = f"user{i}@example.com"  # an attribute beside a primary id
        elif kind == "events":
            payload = {
                "name": rng.choice(_EVENT_NAMES),
                "properties": {"event_seq": i, "screen": rng.choice(["home", "cart"])},
            }
            if rng.random() < 0.5:
                payload["time"] = (ts - dt.timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        elif kind == "purchases":
            payload = {
                "product_id": rng.choice(_PRODUCTS),
                "currency": rng.choice(_CURRENCIES),
                "price": round(rng.uniform(1, 200), 2),
                "quantity": rng.randint(1, 3),
                "properties": {"order_seq": i},
            }
        else:
            ids = (
                {"external_id": f"user-{i:06d}"}
                if i % 5
                else {"alias_name": f"anon-{i:06d}", "alias_label": "web_visitor"}
            )
            rows.append(cdi_row(ts.replace(tzinfo=None), **ids))
            continue
        rows.append(cdi_row(ts.replace(tzinfo=None), json.dumps(payload), **ids))
    ts = (now - dt.timedelta(hours=2)).replace(tzinfo=None)
    future = (now + dt.timedelta(days=3)).replace(tzinfo=None)
    if kind == "deletions":
        rows += [
            cdi_row(ts, email="forget-me@example.com"),
            cdi_row(ts, phone="+14155550000"),
            cdi_row(ts),
            cdi_row(ts, external_id="del-two", braze_id="abc123"),
            cdi_row(ts, alias_name="del-no-label"),
            cdi_row(None, external_id="del-null-ts"),
            cdi_row(future, external_id="del-future"),
        ]
    else:
        good = rows[0]["PAYLOAD"]
        rows += _common_bad_rows(ts, kind) + _type_bad_rows(ts, kind)
        rows.append(cdi_row(future, good, external_id="future-row"))
    return rows


def create_table(con: duckdb.DuckDBPyConnection, table: str, with_payload: bool = True) -> None:
    payload = ", PAYLOAD VARCHAR" if with_payload else ""
    con.execute(f"CREATE TABLE IF NOT EXISTS {table} (UPDATED_AT TIMESTAMP, {_ID_COLUMNS}{payload})")


def insert_rows(
    con: duckdb.DuckDBPyConnection, table: str, rows: list[dict], with_payload: bool = True
) -> None:
    columns = [c for c in _COLUMNS if c != "PAYLOAD" or with_payload]
    values = [[row[c] for c in columns] for row in rows]
    con.executemany(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values
    )


#: A CRM table and the CDI view on it that restamps every row on each read, as nightly snapshots
#: and views do: the case where only changed attributes should be sent (attribute_diff.py).
SNAPSHOT_TABLE = "crm_profiles"
SNAPSHOT_VIEW = "braze_user_profile_snapshot"
SNAPSHOT_USERS = 2000


def create_snapshot(con: duckdb.DuckDBPyConnection, users: int = SNAPSHOT_USERS) -> None:
    """The CRM table and its CDI view (UPDATED_AT: the second before the read, in UTC)."""
    rng = random.Random("7-snapshot")
    con.execute(
        f"CREATE TABLE {SNAPSHOT_TABLE} (EXTERNAL_ID VARCHAR, first_name VARCHAR, plan VARCHAR, "
        "loyalty_points INTEGER, city VARCHAR)"
    )
    con.executemany(
        f"INSERT INTO {SNAPSHOT_TABLE} VALUES (?, ?, ?, ?, ?)",
        [
            (
                f"member-{i:05d}",
                rng.choice(["Ana", "Bo", "Chen", "Dee", "Eli"]),
                rng.choice(["free", "pro", "team"]),
                rng.randint(0, 5000),
                rng.choice(["Oslo", "Lyon", "Osaka", "Lima"]),
            )
            for i in range(users)
        ],
    )
    con.execute(
        f"CREATE VIEW {SNAPSHOT_VIEW} AS SELECT "
        "date_trunc('second', timezone('UTC', now())) - INTERVAL 1 SECOND AS UPDATED_AT, EXTERNAL_ID, "
        "NULL::VARCHAR AS ALIAS_NAME, NULL::VARCHAR AS ALIAS_LABEL, NULL::VARCHAR AS BRAZE_ID, "
        "NULL::VARCHAR AS EMAIL, NULL::VARCHAR AS PHONE, "
        "json_object('first_name', first_name, 'plan', plan, 'loyalty_points', loyalty_points, "
        f"'city', city)::VARCHAR AS PAYLOAD FROM {SNAPSHOT_TABLE}"
    )


def change_snapshot(path: str | Path, share: float = 0.01, seed: int | None = None) -> int:
    """What a day does to the CRM: `share` of the members earn loyalty points. Returns how many."""
    with duckdb.connect(str(path)) as con:
        total = con.execute(f"SELECT count(*) FROM {SNAPSHOT_TABLE}").fetchall()[0][0]
        picked = random.Random(seed).sample(range(total), max(1, int(total * share)))
        con.executemany(
            f"UPDATE {SNAPSHOT_TABLE} SET loyalty_points = loyalty_points + 10 WHERE EXTERNAL_ID = ?",
            [(f"member-{i:05d}",) for i in picked],
        )
    return len(picked)


def seed_warehouse(path: str | Path, now: dt.datetime | None = None, scale: int = 1) -> dict:
    """Create the four sample tables and the CRM snapshot view in a DuckDB file; returns
    {table: rows inserted}."""
    now = now or dt.datetime.now(dt.UTC)
    counts = {"attributes": 2500, "events": 4000, "purchases": 1500, "deletions": 150}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    inserted = {}
    with duckdb.connect(str(path)) as con:
        for kind, table in TABLES.items():
            rows = sample_rows(kind, now, counts[kind] * scale)
            create_table(con, table, with_payload=kind != "deletions")
            insert_rows(con, table, rows, with_payload=kind != "deletions")
            inserted[table] = len(rows)
        create_snapshot(con, SNAPSHOT_USERS * scale)
        inserted[SNAPSHOT_VIEW] = SNAPSHOT_USERS * scale
    return inserted
