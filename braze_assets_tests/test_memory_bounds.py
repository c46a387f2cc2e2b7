"""Memory that must not grow with the table: a delta file is read one batch at a time, and a
DuckDB scan does not keep every block it read."""

from __future__ import annotations

import secrets

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from braze_assets import delta_store
from braze_assets.definitions import warehouse_resource
from braze_assets.sources.duckdb_source import SCAN_MEMORY_LIMIT, DuckDBSource

GROUPS, GROUP_ROWS = 60, 2_000


@pytest.fixture
def delta_file(tmp_path):
    path = tmp_path / "valid.parquet"
    schema = pa.schema([("row_hash", pa.string()), ("object", pa.binary())])
    with pq.ParquetWriter(path, schema) as writer:
        for _ in range(GROUPS):
            hashes = [secrets.token_hex(16) for _ in range(GROUP_ROWS)]
            objects = [secrets.token_bytes(100) for _ in range(GROUP_ROWS)]
            writer.write_table(pa.table({"row_hash": hashes, "object": objects}, schema=schema))
    return path


def _most_allocated(batches) -> tuple[int, int]:
    """(rows read, the most Arrow memory allocated at any batch) while iterating."""
    rows, most = 0, 0
    for batch in batches:
        rows += batch.num_rows
        most = max(most, pa.total_allocated_bytes())
    return rows, most


def test_a_delta_file_is_read_holding_one_batch_at_a_time(delta_file):
    """pyarrow's reader pre-buffers by default and keeps what it read until the file closes: a
    delivery reading a 4M-row delta that way held 374 MB more at its end than at its start."""
    group_bytes = GROUP_ROWS * (32 + 100 + 8)
    with delta_store.open_input(str(delta_file)) as source:
        rows, most = _most_allocated(delta_store.parquet_batches(source, 1_000))
    assert rows == GROUPS * GROUP_ROWS
    assert most < 4 * group_bytes, f"{most:,} bytes held reading {GROUPS} row groups"
    # the same file through pyarrow's defaults holds it all: what the bound above rules out
    with delta_store.open_input(str(delta_file)) as source:
        _, held = _most_allocated(pq.ParquetFile(source).iter_batches(batch_size=1_000))
    assert held > GROUPS // 2 * group_bytes


def test_a_delta_file_read_for_some_columns_holds_only_those(delta_file):
    """Settling rows never sent reads their hashes and identifiers, not what else the file holds
    (a rejected row's payload excerpt); a column an older delta lacks is left out, not an error."""
    with delta_store.open_input(str(delta_file)) as source:
        batches = delta_store.parquet_batches(source, 1_000, columns=["row_hash", "identifier_hash"])
        names = {tuple(batch.schema.names) for batch in batches}
    assert names == {("row_hash",)}
    with delta_store.open_input(str(delta_file)) as source:
        rows, most = _most_allocated(delta_store.parquet_batches(source, 1_000, columns=["row_hash"]))
    with delta_store.open_input(str(delta_file)) as source:
        _, everything = _most_allocated(delta_store.parquet_batches(source, 1_000))
    assert rows == GROUPS * GROUP_ROWS
    # the objects (100 bytes a row) are most of the file: not reading them holds well under half
    assert most < everything / 2, f"{most:,} bytes held reading the hashes, {everything:,} reading all"


def test_duckdb_scans_keep_a_small_buffer_pool(tmp_path):
    """DuckDB keeps each block a query reads up to its memory limit (80% of the machine by
    default): a scan grew the run by the table's size. Both ways of opening the warehouse cap it."""
    database = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(database)) as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
    expected = duckdb.connect(config={"memory_limit": SCAN_MEMORY_LIMIT})
    limit = expected.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    expected.close()
    for source in (
        DuckDBSource(str(database), "t"),
        DuckDBSource.from_resource(
            warehouse_resource("duckdb").model_copy(update={"database": str(database)}), "t"
        ),
    ):
        with source._connect() as con:
            assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == limit
