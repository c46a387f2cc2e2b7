"""Asset checks on each sync's delta: the pandera schema, the row-error rate, the deletion ceiling.

All three are blocking: when one fails with ERROR severity the run does not deliver, and no state
changes (the ledger and watermark only move in `<sync>_sync_results`); the sync log records the
run as an error, with the check's reason.

Each check function is a generator: besides its own result it yields the result for every day of
a ranged run (`partition_reports.py`). Dagster runs a check's generator as it runs any op's; its
decorator is annotated for a function returning one result, hence the type-check exemptions.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg
import pandera.pandas as pa

from braze_assets import delta_store
from braze_assets.assets import SyncAssets
from braze_assets.config import SyncConfig
from braze_assets.delta import DeltaManifest
from braze_assets.partition_reports import check_for_each_partition
from braze_assets.sync_outcome import SyncOutcome

#: What `<sync>_delta` hands downstream: one ready Braze object per settled-to-be row.
DELTA_OUTPUT_SCHEMA = pa.DataFrameSchema(
    {
        "row_hash": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{32}$"), unique=True),
        "updated_at": pa.Column("datetime64[us, UTC]", nullable=False),
        "identifier": pa.Column(str),
        # one or more lookup hashes (lookup.py): 32 hex digits each, space-separated
        "identifier_hash": pa.Column(
            str, pa.Check.str_matches(r"^[0-9a-f]{32}( [0-9a-f]{32})*$"), nullable=True
        ),
        "object": pa.Column(
            object, pa.Check(lambda s: s.map(len) > 2, element_wise=False, name="non_empty_object")
        ),
        "data_points": pa.Column("int32", pa.Check.ge(0)),
        # attributes syncs sending only what changed (attribute_diff.py); null otherwise
        "user_key": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{32}$"), nullable=True),
        "payload_hash": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{32}$"), nullable=True),
        "remember": pa.Column(str, nullable=True),
        "payload_attributes": pa.Column(None, pa.Check.ge(0), nullable=True),  # int, or float with nulls
        "data_points_saved": pa.Column(None, pa.Check.ge(0), nullable=True),
    },
    name="braze_delta_output",
    strict=True,
)


def _finish(
    context: dg.AssetCheckExecutionContext,
    sync: SyncConfig,
    delta: DeltaManifest,
    name: str,
    result: dg.AssetCheckResult,
) -> Iterator[dg.AssetCheckResult | dg.AssetCheckEvaluation]:
    """A check's result, for the run and for each day of a ranged run (`partition_reports.py`).

    A blocking check that fails with ERROR ends the run before anything is sent: the sync log
    records that run as an error, with the check's own words."""
    if not result.passed and result.severity == dg.AssetCheckSeverity.ERROR:
        store = context.resources.delivery_state.store(sync.name)
        detail = f"delivery blocked by the {name} check: {result.description}"
        outcome = SyncOutcome.failed_before_delivery(
            sync.name, sync.data_type, context.run.run_id, detail, delta
        )
        store.log.record_run(outcome.to_dict())
    yield from check_for_each_partition(context, context.check_specs[0].asset_key, name, result)
    yield result


def build_checks(assets: SyncAssets) -> list[dg.AssetChecksDefinition]:
    sync = assets.sync
    delta_key = assets.delta.key

    @dg.asset_check(  # type: ignore[arg-type]  # a generator: see the module docstring
        asset=delta_key,
        name="pandera_schema",
        blocking=True,
        required_resource_keys={"delivery_state"},
        description=f"Every source row passed the cdi_{sync.data_type} pandera schema "
        "(WARN: rejected rows are listed, never sent) and the rows handed "
        "to Braze match the delta schema (ERROR otherwise).",
    )
    def pandera_schema(
        context: dg.AssetCheckExecutionContext, delta: DeltaManifest
    ) -> Iterator[dg.AssetCheckResult | dg.AssetCheckEvaluation]:
        output_failures = 0
        with delta_store.open_input(delta.valid_path) as source:
            for batch in delta_store.parquet_batches(source, 50_000):
                try:
                    DELTA_OUTPUT_SCHEMA.validate(batch.to_pandas(), lazy=True)
                except pa.errors.SchemaErrors as err:
                    output_failures += len(err.failure_cases)
        metadata: dict[str, Any] = {
            "rows_checked": delta.valid + delta.rejected,
            "rows_failing_source_schema": delta.rejected,
            "reasons": dg.MetadataValue.json(delta.rejected_reasons),
            "examples": dg.MetadataValue.json(delta.rejected_examples),
            "output_schema_failures": output_failures,
        }
        checked = delta.valid + delta.rejected
        if output_failures:
            result = dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata=metadata,
                description=f"{output_failures:,} problems in the rows handed to Braze: a bug, "
                "delivery is blocked",
            )
        else:
            if delta.rejected:
                top = next(iter(delta.rejected_reasons), "")
                description = (
                    f"{delta.rejected:,} of {checked:,} rows failed the cdi_{sync.data_type} schema "
                    f"and are rejected with their reasons, never sent (most common: {top}); the other "
                    "rows match it"
                )
            else:
                description = f"all {checked:,} rows match the cdi_{sync.data_type} schema"
            result = dg.AssetCheckResult(
                passed=delta.rejected == 0,
                severity=dg.AssetCheckSeverity.WARN,
                metadata=metadata,
                description=description,
            )
        yield from _finish(context, sync, delta, "pandera_schema", result)

    @dg.asset_check(  # type: ignore[arg-type]  # a generator: see the module docstring
        asset=delta_key,
        name="row_error_rate",
        blocking=True,
        required_resource_keys={"delivery_state"},
        description=f"Blocks delivery when more than {sync.max_row_error_rate:.0%} of "
        "the rows evaluated this run fail validation.",
    )
    def row_error_rate(
        context: dg.AssetCheckExecutionContext, delta: DeltaManifest
    ) -> Iterator[dg.AssetCheckResult | dg.AssetCheckEvaluation]:
        evaluated = delta.valid + delta.rejected
        rate = delta.rejected / evaluated if evaluated else 0.0
        judged = evaluated >= sync.min_rows_for_error_rate
        description = (
            f"{delta.rejected:,} of {evaluated:,} rows rejected ({rate:.1%}); "
            f"threshold {sync.max_row_error_rate:.0%}"
        )
        if not judged:
            description += (
                f"; not judged below {sync.min_rows_for_error_rate:,} rows "
                "(min_rows_for_error_rate): the rejected rows are listed, never sent"
            )
        yield from _finish(
            context,
            sync,
            delta,
            "row_error_rate",
            dg.AssetCheckResult(
                passed=not judged or rate <= sync.max_row_error_rate,
                severity=dg.AssetCheckSeverity.ERROR,
                description=description,
                metadata={
                    "error_rate": round(rate, 4),
                    "threshold": sync.max_row_error_rate,
                    "rows_rejected": delta.rejected,
                    "rows_evaluated": evaluated,
                },
            ),
        )

    checks = [pandera_schema, row_error_rate]
    if sync.data_type == "deletions":

        @dg.asset_check(  # type: ignore[arg-type]  # a generator: see the module docstring
            asset=delta_key,
            name="mass_deletion_guard",
            blocking=True,
            description=f"Blocks a run that would delete more than "
            f"{sync.max_deletions:,} users (deletes are permanent).",
        )
        def mass_deletion_guard(
            context: dg.AssetCheckExecutionContext, delta: DeltaManifest
        ) -> Iterator[dg.AssetCheckResult | dg.AssetCheckEvaluation]:
            yield from _finish(
                context,
                sync,
                delta,
                "mass_deletion_guard",
                dg.AssetCheckResult(
                    passed=delta.valid <= sync.max_deletions,
                    severity=dg.AssetCheckSeverity.ERROR,
                    description=(
                        f"{delta.valid:,} users would be deleted; ceiling "
                        f"{sync.max_deletions:,} (raise max_deletions in syncs.yaml if "
                        "this is intended)"
                    ),
                    metadata={"users_to_delete": delta.valid, "ceiling": sync.max_deletions},
                ),
            )

        checks.append(mass_deletion_guard)
    return checks
