"""The S3 file source (`braze_assets/sources/s3_source.py`) against moto's S3 in server mode.

moto's `ThreadedMotoServer` listens on 127.0.0.1 (port 0: the OS picks a free one) and a boto3
client talks to it over HTTP, as the adapter talks to S3 in production (docs/architecture.md,
Adding a source). The server runs
in this process, so a test sets an object's LastModified by setting moto's clock for the upload.
Rows go through the real `compute_delta` and `StateStore` on tmp_path, as in test_datatypes.py.
Contract references are to `docs/braze-contract.md` §A3 [CDI-S3].
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import uuid
from typing import Any

import boto3
import moto.s3.models
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster_aws.s3 import S3Resource

from braze_assets.datatypes import DATA_TYPES
from braze_assets.delta import DeltaManifest, compute_delta
from braze_assets.sources import SourceError, s3_source
from braze_assets.sources.s3_source import S3File, S3Source, oversize_reason
from braze_assets.state import EmbeddedStateStore

UTC = dt.UTC
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
NOW = T0 + dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
IDS = ("external_id", "alias_name", "alias_label", "braze_id", "email", "phone")
NO_ID = "row has no identifier"

# CDI rows as a file holds them: identifier columns and a payload (a JSON string in the file).
ROWS: list[dict[str, Any]] = [
    {"external_id": "user-1", "payload": {"name": "app_open", "properties": {"screen": "home"}}},
    {"alias_name": "a-1", "alias_label": "crm", "payload": {"name": "cart_view"}},
    {"email": "jane@example.com", "payload": {"name": "app_open", "time": "2024-04-30T08:00:00Z"}},
    # a payload that is hard for CSV: comma, quotes, a newline and non-ASCII text
    {"braze_id": "5f0c1b2a9d", "payload": {"name": "note", "properties": {"t": 'a,"b"\nc é'}}},
    {"phone": "+14155550123", "payload": {"name": "app_open", "properties": {"n": 2.5}}},
]


# ----------------------------------------------------------------------------- harness
class Bucket:
    """A fresh bucket; `put` uploads with moto's clock set to `at` (the object's LastModified)."""

    def __init__(self, endpoint: str, monkeypatch):
        self.endpoint, self.monkeypatch = endpoint, monkeypatch
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        self.name = f"cdi-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=self.name)

    def put(self, key: str, body: bytes | str, at: dt.datetime = T0) -> None:
        naive = at.astimezone(UTC).replace(tzinfo=None)
        self.monkeypatch.setattr(moto.s3.models, "utcnow", lambda: naive)
        self.client.put_object(
            Bucket=self.name, Key=key, Body=body.encode() if isinstance(body, str) else body
        )

    def source(self, prefix: str, client: Any = None, **kwargs: Any) -> S3Source:
        return S3Source(client or self.client, self.name, prefix, **kwargs)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> Bucket:
    return Bucket(s3_endpoint, monkeypatch)


def jsonl(rows: list[dict], payload_as_text: bool = True) -> str:
    def line(r):
        return json.dumps({**r, "payload": json.dumps(r["payload"])} if payload_as_text else r)

    return "".join(line(r) + "\n" for r in rows)


def csv_text(rows: list[dict], header: tuple[str, ...] = (*IDS, "payload")) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for r in rows:
        writer.writerow([json.dumps(r[c]) if c == "payload" else r.get(c, "") for c in header])
    return out.getvalue()


def parquet(table: pa.Table, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, **kwargs)
    return out.getvalue()


def parquet_rows(rows: list[dict]) -> bytes:
    """Upper- and mixed-case column names: they are matched case-insensitively."""
    columns = {c.upper(): [r.get(c) for r in rows] for c in IDS}
    columns["Payload"] = [json.dumps(r["payload"]) for r in rows]
    return parquet(pa.table(columns))


def scanned(source: S3Source, *args: Any, batch_rows: int = 1000, **kwargs: Any) -> list[dict]:
    args = args or (None, None)
    return [r for b in source.scan(*args, True, batch_rows, **kwargs) for r in b.to_pylist()]


def delta(source: S3Source, data_type: str, out, window_start=None, window_end=NOW):
    """The real delta path: check_shape, window scan, row hashes, ledger, validation, Parquet."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = DeltaManifest(
        sync="s3",
        data_type=data_type,
        run_id="run-1",
        window_start=window_start and window_start.isoformat(),
        window_end=window_end.isoformat(),
        reaches_now=window_end >= NOW,
        valid_path=str(out / "valid.parquet"),
        rejected_path=str(out / "rejected.parquet"),
    )
    compute_delta(
        source=source,
        spec=DATA_TYPES[data_type],
        store=EmbeddedStateStore(out / "state", "s3"),
        manifest=manifest,
        window_start=window_start,
        window_end=window_end,
        now=NOW,
        partitions_start=T0 - dt.timedelta(days=30),
        update_existing_only=False,
    )
    valid = pq.read_table(manifest.valid_path).to_pylist()
    for v in valid:
        v["object"] = orjson.loads(v["object"])
    return manifest, valid, pq.read_table(manifest.rejected_path).to_pylist()


# ----------------------------------------------------------------------------- formats
def test_jsonl_csv_and_parquet_files_give_the_same_rows(bucket, tmp_path):
    bucket.put("events/json/part-0.jsonl", jsonl(ROWS))
    bucket.put("events/csv/part-0.csv", csv_text(ROWS))
    bucket.put("events/parquet/part-0.parquet", parquet_rows(ROWS))
    results = {}
    for kind in ("json", "csv", "parquet"):
        source = bucket.source(f"events/{kind}")
        assert source.check_shape(DATA_TYPES["events"])[-1] == "PAYLOAD"
        rows = scanned(source, columns=["UPDATED_AT", *(c.upper() for c in IDS), "PAYLOAD"])
        assert {r.pop("_FILE") for r in rows} == {source.list_files()[0].key}
        assert [r.pop("_LINE") for r in rows] == (
            [2, 3, 4, 5, 6] if kind == "csv" else [1, 2, 3, 4, 5]
        )  # CSV: line 1 is the header
        manifest, valid, rejected = delta(source, "events", tmp_path / kind)
        assert rejected == [] and manifest.valid == len(ROWS)
        results[kind] = (rows, [v["object"] for v in valid])
    assert results["json"] == results["csv"] == results["parquet"]
    rows, objects = results["json"]
    assert rows[0] == {
        "UPDATED_AT": T0,
        "EXTERNAL_ID": "user-1",
        "ALIAS_NAME": None,
        "ALIAS_LABEL": None,
        "BRAZE_ID": None,
        "EMAIL": None,
        "PHONE": None,
        "PAYLOAD": json.dumps(ROWS[0]["payload"]),
    }
    assert objects[3] == {
        "braze_id": "5f0c1b2a9d",
        **ROWS[3]["payload"],
        "time": "2024-05-01T12:00:00.000Z",
    }  # no time: LastModified [A2.2]
    assert objects[2]["time"] == "2024-04-30T08:00:00Z"


def test_payload_objects_become_json_text(bucket):
    rows = [{"external_id": f"user-{i}", "payload": {"plan": f"p{i}", "score": i}} for i in range(3)]
    bucket.put("attrs/json/a.jsonl", jsonl(rows, payload_as_text=False))
    bucket.put(
        "attrs/parquet/a.parquet",
        parquet(
            pa.table(
                {
                    "external_id": [r["external_id"] for r in rows],
                    "PAYLOAD": pa.array([r["payload"] for r in rows]),
                }
            )
        ),
    )  # a STRUCT column
    for kind in ("json", "parquet"):
        got = scanned(bucket.source(f"attrs/{kind}"), columns=["EXTERNAL_ID", "PAYLOAD"])
        assert [json.loads(r["PAYLOAD"]) for r in got] == [r["payload"] for r in rows]
        assert [r["EXTERNAL_ID"] for r in got] == ["user-0", "user-1", "user-2"]


def test_columns_come_from_the_newest_file_or_the_sample_with_types(bucket):
    bucket.put("p/old.csv", "EXTERNAL_ID,payload,extra\nu,{},x\n", at=T0)
    bucket.put(
        "p/new.jsonl",
        '{"external_id": "u", "payload": {"a": 1}, "n": null}\n'
        '{"external_id": "v", "payload": "{}", "n": 3}\n',
        at=T0 + HOUR,
    )
    extras = {
        "UPDATED_AT": "TIMESTAMP WITH TIME ZONE (S3 LastModified)",
        "_FILE": "VARCHAR",
        "_LINE": "BIGINT",
    }
    assert bucket.source("p").columns() == {
        "EXTERNAL_ID": "VARCHAR",
        "PAYLOAD": "OBJECT",
        "N": "NUMBER",
        **extras,
    }
    assert bucket.source("p", sample_key="p/old.csv").columns() == {
        "EXTERNAL_ID": "VARCHAR",
        "PAYLOAD": "VARCHAR",
        "EXTRA": "VARCHAR",
        **extras,
    }
    with pytest.raises(SourceError, match="has no readable"):
        bucket.source("empty").columns()


# ----------------------------------------------------------------------------- one bad line
def test_a_bad_json_line_fails_that_line_only(bucket, tmp_path):
    lines = [
        b'{"external_id": "user-1", "payload": "{\\"plan\\": \\"gold\\"}"}',
        b'{"external_id": "user-2", "payload": "{\\"plan\\": ',  # cut off
        b'{"external_id": "user-3", "payload": "{\\"plan\\": \\"silver\\"}"}',
        b"   ",  # blank: no row
        b"[1, 2]",  # JSON, but not an object
        b'{"external_id": "user-5", "payload": "{\\"plan\\": \\"caf\xe9\\"}"}',  # latin-1, not UTF-8
        b'{"EXTERNAL_ID": "user-4", "Payload": {"plan": "bronze"}}',
    ]
    bucket.put("attrs/2024-05-01.jsonl", b"\n".join(lines) + b"\n")
    source = bucket.source("attrs")

    manifest, valid, rejected = delta(source, "attributes", tmp_path)

    assert [v["object"] for v in valid] == [
        {"external_id": f"user-{i}", "plan": plan, "_update_existing_only": False}
        for i, plan in ((1, "gold"), (3, "silver"), (4, "bronze"))
    ]
    assert manifest.rows_read == 6 and manifest.rejected == 3
    by_location = {r["location"]: r["reasons"] for r in rejected}
    where = "attrs/2024-05-01.jsonl:"
    assert by_location.keys() == {where + "2", where + "5", where + "6"}
    assert "PAYLOAD is not valid JSON: " in by_location[where + "2"]
    assert "PAYLOAD must be a JSON object: got list" in by_location[where + "5"]
    assert all(NO_ID in reasons for reasons in by_location.values())
    # an unparseable line may hold identifiers that cannot be masked: its text is never kept
    excerpts = {r["location"]: r["payload_excerpt"] for r in rejected}
    assert excerpts[where + "2"].startswith("(not shown: not valid JSON")
    assert not any("user-" in e or "plan" in e for e in excerpts.values())
    # Where each bad row came from, for the rejection reasons:
    bad = [r for r in scanned(source) if r["EXTERNAL_ID"] is None]
    assert [(r["_FILE"], r["_LINE"]) for r in bad] == [("attrs/2024-05-01.jsonl", n) for n in (2, 5, 6)]


def test_bad_csv_records_fail_alone_and_keep_their_line(bucket):
    text = (
        (
            b"external_id,payload\n"
            b'user-1,"{""plan"": ""gold""}"\n'
            b"user-2,{},surplus\n"  # one field too many
            b'user-3,"{\n  ""plan"": ""multi-line""\n}"\n'  # a quoted payload over three lines
            b"\n"
            b"user-4,\n"
        )
        + b"user-5,caf\xe9\n"
        + b"user-6,{}\n"
    )
    bucket.put("p/a.csv", text)
    rows = scanned(bucket.source("p"), columns=["EXTERNAL_ID", "PAYLOAD"])
    assert [(r["_LINE"], r["EXTERNAL_ID"], r["PAYLOAD"]) for r in rows] == [
        (2, "user-1", '{"plan": "gold"}'),
        (3, None, "user-2,{},surplus"),
        (4, "user-3", '{\n  "plan": "multi-line"\n}'),
        (8, "user-4", None),  # an empty cell is NULL
        (9, None, "user-5,caf\ufffd"),  # not UTF-8
        (10, "user-6", "{}"),
    ]


def test_an_over_long_line_is_one_bad_row_and_is_not_held_in_memory(bucket, monkeypatch):
    monkeypatch.setattr(s3_source, "S3_MAX_LINE_BYTES", 64)
    long_line = json.dumps({"external_id": "user-2", "payload": json.dumps({"x": "y" * 500})})
    bucket.put("p/a.jsonl", "\n".join(['{"external_id": "u1"}', long_line, '{"external_id": "u3"}']))
    rows = scanned(bucket.source("p"), columns=["EXTERNAL_ID", "PAYLOAD"])
    assert [(r["_LINE"], r["EXTERNAL_ID"], r["PAYLOAD"]) for r in rows] == [
        (1, "u1", None),
        (2, None, "line is longer than 64 bytes"),
        (3, "u3", None),
    ]


# ----------------------------------------------------------------------------- which files
def test_files_outside_the_prefix_and_folder_markers_are_ignored(bucket):
    inside = ["cdi/events/a.jsonl", "cdi/events/2024/05/b.jsonl"]
    for key in [*inside, "cdi/events-old/c.jsonl", "other/d.jsonl", "cdi/e.jsonl"]:
        bucket.put(key, jsonl(ROWS[:1]))
    bucket.put("cdi/events/", b"")
    source = bucket.source("cdi/events")  # a folder: "cdi/events/"
    assert source.description == f"s3://{bucket.name}/cdi/events/"
    assert [f.key for f in source.list_files()] == sorted(inside)
    assert sorted({r["_FILE"] for r in scanned(source)}) == sorted(inside)


def test_the_last_modified_window_and_order_are_respected(bucket, tmp_path):
    def one(i: int) -> str:
        return jsonl([{"external_id": f"user-{i}", "payload": {"plan": str(i)}}])

    bucket.put("p/0.jsonl", one(0), at=T0)
    bucket.put("p/b.jsonl", one(2), at=T0 + HOUR)
    bucket.put("p/a.jsonl", one(1), at=T0 + HOUR)  # same second: key order
    bucket.put("p/3.jsonl", one(3), at=T0 + 2 * HOUR)
    source = bucket.source("p")

    rows = scanned(source, T0 + HOUR, T0 + 2 * HOUR)
    assert [(r["_FILE"], r["UPDATED_AT"]) for r in rows] == [
        ("p/a.jsonl", T0 + HOUR),
        ("p/b.jsonl", T0 + HOUR),
    ]
    assert [r["EXTERNAL_ID"] for r in scanned(source)] == ["user-0", "user-1", "user-2", "user-3"]
    later = scanned(source, T0 + HOUR, None)
    assert [r["EXTERNAL_ID"] for r in later] == ["user-1", "user-2", "user-3"]
    assert source.list_files(T0 + HOUR, T0 + 2 * HOUR) == [
        S3File("p/a.jsonl", len(one(1)), T0 + HOUR),
        S3File("p/b.jsonl", len(one(2)), T0 + HOUR),
    ]
    assert source.count(T0 + HOUR, T0 + 2 * HOUR) == 2 and source.count() == 4
    assert (source.min_updated_at(), source.max_updated_at()) == (T0, T0 + 2 * HOUR)

    manifest, valid, _ = delta(source, "attributes", tmp_path, T0 + HOUR, T0 + 2 * HOUR)
    assert [v["object"]["external_id"] for v in valid] == ["user-1", "user-2"]
    assert manifest.max_updated_at == (T0 + HOUR).isoformat()


def test_skip_keys_are_not_read(bucket):
    bucket.put("p/settled.jsonl", jsonl(ROWS[:2]), at=T0)
    bucket.put("p/new.jsonl", jsonl(ROWS[2:3]), at=T0 + HOUR)
    source = bucket.source("p", skip_keys={"p/settled.jsonl"})
    assert {r["_FILE"] for r in scanned(source)} == {"p/new.jsonl"}
    assert source.count() == 1
    assert source.min_updated_at() == T0  # the listing still shows it


def test_oversized_and_unsupported_files_are_listed_and_not_read(bucket, monkeypatch):
    monkeypatch.setattr(s3_source, "S3_MAX_FILE_BYTES", 200)
    bucket.put("p/small.jsonl", jsonl(ROWS[:1]))
    big = jsonl(ROWS[:3])
    bucket.put("p/big.jsonl", big)
    bucket.put("p/notes.txt", "hello")
    bucket.put("p/part.jsonl.gz", b"\x1f\x8b")
    source = bucket.source("p")
    assert [f.key for f in source.oversized_files()] == ["p/big.jsonl"]
    assert oversize_reason(source.oversized_files()[0]) == (
        f"file p/big.jsonl is {len(big):,} bytes; the limit is 200 bytes"
    )
    assert [f.key for f in source.unsupported_files()] == ["p/notes.txt", "p/part.jsonl.gz"]
    assert {r["_FILE"] for r in scanned(source)} == {"p/small.jsonl"}
    assert source.count() == 1
    monkeypatch.undo()
    assert oversize_reason(S3File("k.csv", 600 * 2**20, T0)) == (
        "file k.csv is 629,145,600 bytes; the limit is 512 MB"
    )


# ----------------------------------------------------------------------------- deletions
@pytest.mark.parametrize(
    "key, body",
    [
        ("d/a.csv", "external_id,payload\nuser-1,{}\n"),
        ("d/a.parquet", parquet(pa.table({"EXTERNAL_ID": ["user-1"], "payload": ["{}"]}))),
        ("d/a.jsonl", '{"external_id": "user-1", "PAYLOAD": "{}"}\n'),
    ],
)
def test_a_deletion_file_with_a_payload_column_is_refused(bucket, key, body):
    bucket.put(key, body)
    with pytest.raises(SourceError, match="has a PAYLOAD column; a deletion sync refuses"):
        bucket.source("d").check_shape(DATA_TYPES["deletions"])


def test_any_deletion_file_or_line_with_a_payload_fails_the_sync(bucket, tmp_path):
    bucket.put("d/old.jsonl", '{"external_id": "user-1"}\n{"external_id": "u", "payload": "{}"}\n', at=T0)
    bucket.put("d/new.csv", "external_id,braze_id\nuser-2,\n", at=T0 + HOUR)
    source = bucket.source("d")
    assert source.check_shape(DATA_TYPES["deletions"]) == ["UPDATED_AT", "EXTERNAL_ID", "BRAZE_ID"]
    with pytest.raises(SourceError, match="d/old.jsonl line 2 has a payload column"):
        delta(source, "deletions", tmp_path)


def test_deletion_files_without_payload_delete_by_identifier(bucket, tmp_path):
    bucket.put(
        "d/a.csv", "external_id,alias_name,alias_label,braze_id\nuser-1,,,\n,a-1,crm,\n,,,5f0c1b2a9d\n"
    )
    _, valid, rejected = delta(bucket.source("d"), "deletions", tmp_path)
    assert rejected == []
    assert [v["object"] for v in valid] == [
        ["external_ids", "user-1"],
        ["user_aliases", {"alias_name": "a-1", "alias_label": "crm"}],
        ["braze_ids", "5f0c1b2a9d"],
    ]


# ----------------------------------------------------------------------------- bounded memory
class CountingClient:
    """The boto3 client, counting the object bytes the adapter has read so far."""

    def __init__(self, client: Any):
        self.client, self.bytes_read, self.gets = client, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def get_object(self, **kwargs: Any) -> dict:
        response = self.client.get_object(**kwargs)
        body, spy = response["Body"], self
        self.gets += 1

        class Body:
            def read(self, amount: int | None = None) -> bytes:
                data = body.read(amount)
                spy.bytes_read += len(data)
                return data

            def close(self) -> None:
                body.close()

        response["Body"] = Body()
        return response


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_a_file_is_streamed_in_batches_of_batch_rows(bucket, kind):
    rng = random.Random(7)
    rows = [
        {
            "external_id": f"user-{i}",
            "payload": {"name": "app_open", "properties": {"blob": rng.randbytes(100).hex()}},
        }
        for i in range(20_000)
    ]
    body = {
        "jsonl": lambda: jsonl(rows).encode(),
        "csv": lambda: csv_text(rows).encode(),
        "parquet": lambda: parquet(
            pa.table(
                {
                    "external_id": [r["external_id"] for r in rows],
                    "payload": [json.dumps(r["payload"]) for r in rows],
                }
            ),
            row_group_size=2_000,
        ),
    }[kind]()
    assert len(body) > 3 * 2**20
    bucket.put(f"big/file.{kind}", body)
    spy = CountingClient(bucket.client)
    source = bucket.source("big", client=spy, buffer_bytes=256 * 1024)

    batches = source.scan(None, None, True, 500, columns=["UPDATED_AT", "EXTERNAL_ID", "PAYLOAD"])
    first = next(batches)
    assert first.num_rows == 500
    assert spy.bytes_read < len(body) / 4, "the first batch came before most of the file was read"
    sizes = [first.num_rows] + [b.num_rows for b in batches]
    assert sizes == [500] * 40
    # Read once, no more: one streaming GET (Parquet: one for the footer, one for the row groups).
    assert 0.9 * len(body) <= spy.bytes_read <= len(body) + 256 * 1024
    assert spy.gets == (2 if kind == "parquet" else 1)


# ----------------------------------------------------------------------------- Dagster resource
def test_from_a_dagster_s3_resource(bucket):
    bucket.put("p/a.jsonl", jsonl(ROWS[:2]))
    resource = S3Resource(
        endpoint_url=bucket.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    source = S3Source.from_resource(resource, bucket.name, "p/")
    assert [r["EXTERNAL_ID"] for r in scanned(source)] == ["user-1", None]
    assert source.preview(1).num_rows == 1


# ----------------------------------------------------------------------------- the whole sync
def test_s3_sync_end_to_end_through_dagster_with_its_new_file_sensor(s3_endpoint, monkeypatch, tmp_path):
    """syncs.yaml `source: {type: s3, bucket, prefix}` with dagster-aws's S3Resource: the events of
    every file reach the emulator once, a bad line is rejected with its file and line, a rerun
    sends nothing, and the sensor launches a run only when a new file lands."""
    from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig
    from braze_assets_tests.conftest import API_KEY, Harness, sync_config

    bucket = Bucket(s3_endpoint, monkeypatch)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    lines = [
        json.dumps(
            {
                "external_id": f"user-{i}",
                "payload": json.dumps({"name": "app_open", "properties": {"seq": i}}),
            }
        )
        for i in range(5)
    ]
    lines.insert(2, '{"external_id": "user-x", "payload": "{\\"name\\": ')  # cut off
    bucket.put("cdi/events/batch-1.jsonl", "\n".join(lines) + "\n", at=now - HOUR)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emulator:
        harness = Harness(tmp_path, emulator)
        harness.syncs = [
            sync_config("s3_events", "events", "x", max_row_error_rate=0.5, sensor={"enabled": True})
        ]
        harness.syncs[0]["source"] = {"type": "s3", "bucket": bucket.name, "prefix": "cdi/events"}
        harness.extra_resources["s3"] = S3Resource(endpoint_url=s3_endpoint, region_name="us-east-1")
        first = harness.run("s3_events")
        assert first.result.success and first.outcome.accepted == 5
        assert sorted(e["properties"]["seq"] for e in emulator.store.events()) == list(range(5))
        assert [e["location"] for e in first.delta.rejected_examples] == ["cdi/events/batch-1.jsonl:3"]
        rerun = harness.run("s3_events")
        assert rerun.outcome.requests == 0
        assert rerun.delta.rows_read == 0 and rerun.delta.parts_skipped == 1, "not read twice"

        import dagster as dg

        sensor = harness.definitions().resolve_sensor_def("s3_events_sensor")
        instance = dg.DagsterInstance.ephemeral()
        with dg.build_sensor_context(instance=instance, resources=harness.resources()) as ctx:
            tick = sensor.evaluate_tick(ctx)
        with dg.build_sensor_context(
            instance=instance, cursor=tick.cursor, resources=harness.resources()
        ) as ctx:
            assert not sensor.evaluate_tick(ctx).run_requests, "nothing new"
        bucket.put(
            "cdi/events/batch-2.jsonl",
            json.dumps(
                {
                    "external_id": "user-9",
                    "payload": json.dumps({"name": "app_open", "properties": {"seq": 9}}),
                }
            )
            + "\n",
            at=now,
        )
        with dg.build_sensor_context(
            instance=instance, cursor=tick.cursor, resources=harness.resources()
        ) as ctx:
            assert len(sensor.evaluate_tick(ctx).run_requests) == 1, "a new file was noticed"
        after_new_file = harness.run("s3_events")
        assert after_new_file.outcome.accepted == 1 and after_new_file.delta.rows_read == 1
        assert sorted(e["properties"]["seq"] for e in emulator.store.events()) == [0, 1, 2, 3, 4, 9]


def test_held_rows_of_a_file_released_for_resending_are_read_again(s3_endpoint, monkeypatch, tmp_path):
    """A file whose rows were all settled, some as held, is skipped by later runs; once a person
    releases the held rows for resending, the file is read again and those rows go out."""
    from braze_assets.braze.emulator import BrazeEmulator, EmulatorConfig, FaultConfig
    from braze_assets_tests.conftest import API_KEY, Harness, sync_config
    from braze_assets_tests.test_release_held import _release

    bucket = Bucket(s3_endpoint, monkeypatch)
    now = dt.datetime.now(UTC).replace(microsecond=0)
    lines = [
        json.dumps(
            {"external_id": f"user-{i}", "payload": json.dumps({"name": "open", "properties": {"seq": i}})}
        )
        for i in range(3)
    ]
    bucket.put("cdi/events/batch-1.jsonl", "\n".join(lines) + "\n", at=now - HOUR)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with BrazeEmulator(EmulatorConfig(api_key=API_KEY)) as emulator:
        harness = Harness(tmp_path, emulator)
        harness.syncs = [sync_config("s3_events", "events", "x")]
        harness.syncs[0]["source"] = {"type": "s3", "bucket": bucket.name, "prefix": "cdi/events"}
        harness.extra_resources["s3"] = S3Resource(endpoint_url=s3_endpoint, region_name="us-east-1")
        emulator.set_faults(FaultConfig(rate_drop_before=1.0))  # never reached Braze: held
        assert harness.run("s3_events").outcome.held == 3
        emulator.set_faults(FaultConfig())
        assert harness.run("s3_events").delta.parts_skipped == 1, "every row settled: skipped"
        result, _, _ = _release(harness, "s3_events")  # the default mode: resend
        assert result.success
        again = harness.run("s3_events")
        assert again.delta.parts_skipped == 0 and again.outcome.accepted == 3
        assert sorted(e["properties"]["seq"] for e in emulator.store.events()) == [0, 1, 2]
        assert harness.run("s3_events").delta.parts_skipped == 1, "settled again: skipped again"
