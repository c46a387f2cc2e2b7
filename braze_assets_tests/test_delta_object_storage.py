"""Delta files and manifests on object storage (`BRAZE_ASSETS_DELTA_URL`) against moto's S3 server.

moto's `ThreadedMotoServer` listens on loopback (port 0: the OS picks one), and pyarrow's S3
filesystem talks to it over HTTP as it would to S3 (`S3_ENDPOINT_URL`). Syncs run their real job
(`Harness`) on the DuckDB source against the Braze emulator; the ledger and watermark stay in the
local state directory. What must hold: nothing of a delta is left on the local disk, a step in a
pod that never saw the delta step's disk delivers it, prune and the held rows' object lookup work
on the bucket, and a wrong setting fails with an error that names it.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid

import boto3
import dagster as dg
import moto.s3.models
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from braze_assets import delta_store
from braze_assets.automation import incremental_range, range_tags
from braze_assets.definitions import default_resources
from braze_assets.delta_files import SEALED, DeltaFiles, delta_root, staged
from braze_assets.delta_schema import VALID_SCHEMA, no_diff_columns
from braze_assets.resources import manifest_root
from braze_assets.sources.factory import make_source, resource_key
from braze_assets_tests.conftest import Harness, cdi_row, events_rows, seqs, sync_config

UTC = dt.UTC
PREFIX = "team/deltas"


class Bucket:
    """A fresh bucket, with BRAZE_ASSETS_DELTA_URL pointing into it."""

    def __init__(self, endpoint: str, monkeypatch: pytest.MonkeyPatch):
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "S3_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(name, value)
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.name = f"deltas-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=self.name)
        self.url = f"s3://{self.name}/{PREFIX}"
        monkeypatch.setenv(delta_store.DELTA_URL_ENV, self.url)

    def keys(self, under: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=under)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def parquet(self, key: str) -> pa.Table:
        body = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        return pq.read_table(pa.BufferReader(body))


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> Bucket:
    return Bucket(s3_endpoint, monkeypatch)


def _ts() -> dt.datetime:
    return dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(hours=2)


def _events_with_bad_rows(harness: Harness, n: int) -> None:
    """`n` valid events, an exact copy of the first (sent once), and two rows with no identifier."""
    ts = _ts()
    rows = events_rows(n, ts)
    no_id = [
        cdi_row(ts.replace(tzinfo=None), json.dumps({"name": "app_open", "properties": {"seq": -i}}))
        for i in (1, 2)
    ]
    harness.table("ev", [*rows, dict(rows[0]), *no_id])
    harness.syncs = [sync_config("ev_sync", "events", "main.ev")]


def _materialize(harness: Harness, keys: dg.PartitionKeyRange, asset: str) -> dg.ExecuteInProcessResult:
    """One asset of the `ev_sync` job, in a run of its own, as a pod would run that step."""
    job = harness.definitions().resolve_job_def("ev_sync_job")
    return job.execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        tags=range_tags(keys),
        asset_selection=[dg.AssetKey(asset)],
        raise_on_error=False,
    )


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(
        event.event_specific_data.error.to_string() for event in result.get_step_failure_events()
    )


def test_a_sync_keeps_its_delta_files_and_manifests_in_the_bucket(tmp_path, braze, bucket):
    harness = Harness(tmp_path, braze)
    _events_with_bad_rows(harness, 30)
    run = harness.run("ev_sync")

    assert run.result.success, _failure_text(run.result)
    assert seqs(braze) == list(range(30))  # every valid row, the exact copy once
    assert harness.ledger("ev_sync") == {"accepted": 30, "invalid": 2}
    run_id = run.result.run_id
    files = f"{PREFIX}/files/ev_sync/{run_id}"
    assert run.delta.valid_path == f"s3://{bucket.name}/{files}/valid.parquet"
    assert bucket.keys(f"{PREFIX}/files/") == sorted(
        [f"{files}/{SEALED}", f"{files}/rejected.parquet", f"{files}/valid.parquet"]
    )
    valid = bucket.parquet(f"{files}/valid.parquet")
    assert sorted(orjson.loads(o)["properties"]["seq"] for o in valid["object"].to_pylist()) == list(
        range(30)
    )
    assert bucket.parquet(f"{files}/rejected.parquet").num_rows == 2
    manifests = bucket.keys(f"{PREFIX}/manifests/")
    assert f"{PREFIX}/manifests/ev_sync_delta/runs/{run_id}.json" in manifests
    assert len(manifests) == 2  # and the one of the run's partition range
    stored = json.loads(bucket.client.get_object(Bucket=bucket.name, Key=manifests[0])["Body"].read())
    assert stored["valid"] == 30 and stored["duplicate_rows"] == 1 and stored["rejected"] == 2

    assert list(tmp_path.rglob("*.parquet")) == []
    assert not (tmp_path / "deltas").exists() and not (tmp_path / "state" / "deltas").exists()


def test_the_results_step_delivers_in_a_pod_that_never_saw_the_delta_step(tmp_path, braze, bucket):
    first = Harness(tmp_path / "delta-pod", braze)
    _events_with_bad_rows(first, 25)
    sync = first.config("ev_sync")
    resources = first.resources()
    keys = incremental_range(
        sync,
        resources["delivery_state"],
        dt.datetime.now(UTC),
        make_source(sync, resources[resource_key(sync)]),
    )
    delta = _materialize(first, keys, "ev_sync_delta")
    assert delta.success, _failure_text(delta)
    assert braze.store.events() == []
    shutil.rmtree(first.tmp_path)  # the delta step's pod is gone, with its disk

    second = Harness(tmp_path / "results-pod", braze)
    second.syncs = first.syncs
    results = _materialize(second, keys, "ev_sync_sync_results")

    assert results.success, _failure_text(results)
    assert delta.run_id != results.run_id
    assert seqs(braze) == list(range(25))
    assert second.ledger("ev_sync") == {"accepted": 25, "invalid": 2}
    assert list(second.tmp_path.rglob("*.parquet")) == []


def _put_run(files: DeltaFiles[str], run_id: str, objects: dict[str, dict]) -> None:
    """A run's delta files written as the delta step writes them (locally, then sealed)."""
    run_dir = files.run_dir(run_id)
    with staged(f"{run_dir}/valid.parquet", f"{run_dir}/rejected.parquet") as (valid, rejected):
        pq.write_table(
            pa.table(
                {
                    "row_hash": list(objects),
                    "updated_at": [dt.datetime(2024, 5, 1, tzinfo=UTC)] * len(objects),
                    "identifier": ["EXTERNAL_ID=***"] * len(objects),
                    "identifier_hash": [None] * len(objects),
                    "object": [orjson.dumps(o) for o in objects.values()],
                    "data_points": [1] * len(objects),
                    **no_diff_columns(len(objects)),
                },
                schema=VALID_SCHEMA,
            ),
            valid,
        )
        pq.write_table(pa.table({"row_hash": pa.array([], pa.string())}), rejected)


def test_prune_keeps_the_newest_runs_by_when_they_were_sealed(tmp_path, bucket, monkeypatch):
    files = DeltaFiles(delta_root(tmp_path), "ev_sync")
    # Neither the objects' LastModified (moto's clock runs backwards here) nor the names (in the
    # reverse order) tell which run was written last: only when each was sealed does.
    written = [f"run-{9 - n}" for n in range(7)]
    for n, run in enumerate(written):
        stamp = dt.datetime(2024, 5, 1, 12) - dt.timedelta(minutes=n)
        monkeypatch.setattr(moto.s3.models, "utcnow", lambda stamp=stamp: stamp)
        _put_run(files, run, {f"h-{run}": {"external_id": run}})

    assert files.prune(keep=5) == 2

    # (an empty key ending in "/" may be left where a prefix was emptied: not a run)
    kept = {key.split("/")[4] for key in bucket.keys(f"{PREFIX}/files/ev_sync/")} - {""}
    assert kept == set(written[2:])
    assert bucket.keys(f"{PREFIX}/files/ev_sync/{written[0]}/") == []
    assert not list(tmp_path.iterdir())  # nothing was written locally
    assert files.prune(keep=5) == 0


def test_held_rows_objects_are_found_in_the_bucket(tmp_path, bucket):
    files = DeltaFiles(delta_root(tmp_path), "ev_sync")
    _put_run(files, "older", {"h1": {"external_id": "u1"}, "h2": {"external_id": "u2"}})
    _put_run(files, "own", {"h3": {"external_id": "u3"}})

    found = files.objects(["h1", "h3", "missing"], ["own", "gone-run"])

    assert {h: orjson.loads(o) for h, o in found.items()} == {
        "h1": {"external_id": "u1"},
        "h3": {"external_id": "u3"},
    }


def test_an_unknown_scheme_is_refused_naming_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(delta_store.DELTA_URL_ENV, "ftp://files.example.com/deltas")
    for build in (
        lambda: delta_root(tmp_path),
        lambda: manifest_root(tmp_path),
        lambda: default_resources([]),
    ):
        with pytest.raises(delta_store.DeltaStoreError, match=r"BRAZE_ASSETS_DELTA_URL.*'ftp'"):
            build()


def test_a_missing_bucket_fails_the_run_naming_the_setting(tmp_path, braze, bucket, monkeypatch):
    missing = f"nowhere-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv(delta_store.DELTA_URL_ENV, f"s3://{missing}/deltas")
    harness = Harness(tmp_path, braze)
    _events_with_bad_rows(harness, 3)

    run = harness.run("ev_sync")

    assert not run.result.success
    text = _failure_text(run.result)
    assert "BRAZE_ASSETS_DELTA_URL" in text and missing in text and "does not exist" in text
    assert braze.store.events() == [] and harness.ledger("ev_sync") == {}
    assert list(tmp_path.rglob("*.parquet")) == []
