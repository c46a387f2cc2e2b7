"""Ratios, phase split and the issue's targets, computed from the rows of one run."""

from __future__ import annotations

import os

from benchmarks.report import Row

GIB_MIB = 1024


def _find(rows: list[Row], case: str, data_type: str = "attributes", latency: float = 0.0) -> Row | None:
    for row in rows:
        if (
            row.case.startswith(case)
            and row.data_type == data_type
            and row.latency_ms == latency
            and row.seconds
            and not row.extra.get("error")
        ):
            return row
    return None


def _ratio(a: Row | None, b: Row | None) -> float | None:
    if a is None or b is None or not b.objects_per_s:
        return None
    return a.objects_per_s / b.objects_per_s


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def summary(rows: list[Row], args) -> str:
    out = ["## Ratios (same run)", ""]
    for latency in (0.0, 50.0):
        e2e = _find(rows, "braze_assets e2e", latency=latency)
        raw = _find(rows, "raw ceiling", latency=latency)
        delivery = None
        if e2e is not None and raw is not None:
            delivery = e2e.objects / e2e.extra["delivery_s"] / raw.objects_per_s
        out.append(
            f"- **{latency:g} ms**: braze_assets e2e = {_pct(_ratio(e2e, raw))} of the raw "
            f"ceiling (its delivery phase alone: {_pct(delivery)}); speed-up over the naive "
            f"`requests` loop {_x(_ratio(e2e, _find(rows, 'naive', latency=latency)))}, over "
            f"braze-client {_x(_ratio(e2e, _find(rows, 'braze-client', latency=latency)))}"
        )
    one, five = _find(rows, "braze_assets e2e"), _find(rows, "memory at 5x")
    if one and five and one.peak_rss_mib and five.peak_rss_mib is not None:
        out.append(
            f"- peak RSS: {one.peak_rss_mib:,.0f} MiB at {one.rows:,} rows, "
            f"{five.peak_rss_mib:,.0f} MiB at {five.rows:,} rows "
            f"(×{five.peak_rss_mib / one.peak_rss_mib:.2f} for ×{five.rows / one.rows:g} "
            "rows)"
        )
    for row in (r for r in rows if "share" in r.extra):
        e2e = _find(rows, "braze_assets e2e", latency=row.latency_ms)
        if e2e is not None:
            unlimited = e2e.objects / e2e.extra["delivery_s"] / 75
            admitted = row.admitted / row.seconds
            out.append(
                f"- {row.case}, {row.latency_ms:g} ms: {admitted:,.0f} requests/s admitted against "
                f"{row.extra['limit_per_s']:,.0f} allowed; the same delivery without a limit did "
                f"{unlimited:,.0f} requests/s in this run, so "
                + (
                    "the sender's own speed, not its pacing, bounds the share"
                    if unlimited < 0.95 * row.extra["limit_per_s"]
                    else "pacing decides the share"
                )
            )
    raw = _find(rows, "raw ceiling")
    if raw is not None and raw.objects_per_s < 75_000:
        out.append(
            f"- the emulator's own ceiling here ({raw.objects_per_s:,.0f} objects/s at 0 ms) is "
            "below Braze's 75,000 objects/s: on this machine the absolute e2e target cannot "
            "be shown, the ratio to the ceiling is the figure to read"
        )
    out += [
        "",
        "## Phase split (0 ms)",
        "",
        (
            "| type | delta: read + hash + validate + write Parquet, rows/s | delivery, objects/s "
            "| e2e, objects/s | validation + payload alone, rows/s |"
        ),
        "|---|---:|---:|---:|---:|",
    ]
    for data_type in ("attributes", "events", "purchases"):
        e2e = _find(rows, "braze_assets e2e", data_type)
        alone = _find(rows, "validation + payload, 1 process", data_type)
        if e2e is None:
            continue
        out.append(
            f"| {data_type} | {e2e.rows / e2e.extra['delta_s']:,.0f} | "
            f"{e2e.objects / e2e.extra['delivery_s']:,.0f} | {e2e.objects_per_s:,.0f} | "
            f"{alone.objects_per_s if alone else 0:,.0f} |"
        )
    out += ["", "## Targets", ""]
    if args.quick:
        out += [
            (
                "`--quick` run: sizes and time boxes are too small for these to mean anything; "
                "run without `--quick` for the real figures."
            ),
            "",
        ]
    out += targets_table(rows)
    return "\n".join(out) + "\n"


def targets_table(rows: list[Row], starting: str = "") -> list[str]:
    """The targets measured by `rows` (those whose name starts with `starting`), as table lines;
    an unmet one says why, from what this run measured, and what would move it."""
    out = ["| target | measured | met | why not, measured in this run; what would move it |"]
    out.append("|---|---|---|---|")
    for target, value, met, why in _targets(rows):
        if target.startswith(starting):
            out.append(f"| {target} | {value} | {'yes' if met else 'no'} | {'' if met else why} |")
    return out


def _cores() -> int:
    return os.cpu_count() or 1


def _sending_cpu(row: Row | None) -> str:
    """Where a delivery's CPU went, per request: the run's process and the emulator's, and the
    requests per second the machine's cores could carry at that cost with nothing else running."""
    if row is None or not row.requests or "delivery_cpu_s" not in row.extra:
        return "CPU not measured"
    run_ms = 1000 * row.extra["delivery_cpu_s"] / row.requests
    emulator_ms = 1000 * row.extra.get("emulator_cpu_s", 0.0) / row.requests
    # with the state in PostgreSQL, its server's CPU over the whole case (delta included)
    server_ms = 1000 * row.extra.get("state_server_cpu_s", 0.0) / row.requests
    server = f", {server_ms:.2f} ms in the PostgreSQL server" if "state_server_cpu_s" in row.extra else ""
    per_request = run_ms + emulator_ms + server_ms
    most = 1000 * _cores() / per_request if per_request else 0
    return (
        f"CPU per request: {run_ms:.2f} ms in the run's process, {emulator_ms:.2f} ms in the "
        f"emulator{server}, so {_cores()} cores carry at most {most:,.0f} requests/s"
    )


_MORE_CORES = (
    "what would move it: cores of the emulator's own (Braze runs elsewhere), fewer CPU-ms per "
    "request in the run (its ledger work in a process of its own)"
)


def _targets(rows: list[Row]):
    """(target, measured, met, why not) for each target this run measured."""
    raw = _find(rows, "raw ceiling")
    ceiling = f"the emulator's own ceiling here: {raw.objects_per_s:,.0f} objects/s; " if raw else ""
    for data_type in ("attributes", "events", "purchases"):
        e2e = _find(rows, "braze_assets e2e", data_type)
        if e2e:
            yield (
                f"e2e {data_type}, 0 ms, no limit ≥ 75,000 objects/s",
                f"{e2e.objects_per_s:,.0f}",
                e2e.objects_per_s >= 75_000,
                f"{ceiling}the delta took {e2e.extra.get('delta_s', 0.0):.1f} of {e2e.seconds:.1f} s; "
                f"delivery: {_sending_cpu(e2e)}",
            )
    e2e = _find(rows, "braze_assets e2e")
    ratio = _ratio(e2e, raw)
    why = "not measured"
    if e2e is not None and "delta_s" in e2e.extra:
        why = (
            f"the delta took {e2e.extra['delta_s']:.1f} of {e2e.seconds:.1f} s before the first "
            f"request (the blocking checks decide first); delivery: {_sending_cpu(e2e)}; {_MORE_CORES}"
        )
    yield "e2e ≥ 50% of the raw ceiling (0 ms)", _pct(ratio), (ratio or 0) >= 0.5, why
    for row in rows:
        if "share" in row.extra:
            share, refused = row.extra["share"], row.refused_share
            yield (
                f"{row.case}, {row.latency_ms:g} ms: ≥ 95% of allowed rate, ≤ 1% 429s",
                f"{share:.1%}, {refused:.2%}",
                share >= 0.95 and refused <= 0.01,
                f"{_sending_cpu(row)} against the {row.extra['limit_per_s']:,.0f} allowed; {_MORE_CORES}",
            )
    for times, limit_gib in ((5, 1.0), (20, 1.2)):
        sized = _find(rows, f"memory at {times}x")
        if sized and sized.peak_rss_mib is not None:
            yield (
                f"peak RSS ≤ {limit_gib:g} GiB at {sized.rows:,} rows",
                f"{sized.peak_rss_mib:,.0f} MiB",
                sized.peak_rss_mib <= limit_gib * GIB_MIB,
                f"the delta peaked at {sized.extra.get('peak_rss_delta_mib', 0):,.0f} MiB; "
                "the rest is delivery",
            )
    for data_type in ("attributes", "events", "purchases"):
        # The product's path when the machine has the cores: batches prepared on worker processes.
        pooled = next((r for r in rows if " workers" in r.case and r.data_type == data_type), None)
        alone = pooled or _find(rows, "validation + payload, 1 process", data_type)
        if alone:
            workers = int(alone.extra.get("workers") or 1)
            per_row_us = 1e6 * workers / alone.objects_per_s if alone.objects_per_s else 0
            yield (
                f"validation + payload ({data_type}) ≥ 200,000 rows/s ({alone.case.split(', ')[-1]})",
                f"{alone.objects_per_s:,.0f}",
                alone.objects_per_s >= 200_000,
                f"{per_row_us:.1f} µs per row in each of {workers} process(es) on {_cores()} cores "
                "(Python per row: parse, check, build the object; `--profile` lists the functions); "
                "what would move it: more cores "
                "(the workers scale), checks done column-wise instead of per row",
            )
    first = next((r for r in rows if r.case.startswith("first sync") and "floor_s" in r.extra), None)
    if first is not None:
        ratio = first.seconds / first.extra["floor_s"]
        floor, delta_s = first.extra["floor_s"], first.extra.get("delta_s", 0.0)
        yield (
            f"{first.case}, 50 ms, {first.rows:,} rows: ≤ 1.3× Braze's floor",
            f"{first.seconds:.1f} s = {ratio:.2f}×",
            ratio <= 1.3,
            f"nothing may be sent before the blocking checks have the whole delta ({delta_s:.1f} s), "
            f"and Braze's limit alone takes {floor:.1f} s: at least {(delta_s + floor) / floor:.2f}× "
            "with this delta; what would move it: a faster delta (more cores for its workers)",
        )
    for other in ("naive", "braze-client"):
        for latency in (50.0, 0.0):
            ours, theirs = (
                _find(rows, "braze_assets e2e", latency=latency),
                _find(rows, other, latency=latency),
            )
            speedup = _ratio(ours, theirs)
            if speedup is None and not any(r.case.startswith(other) for r in rows):
                continue  # not measured in this run (`--case throughput`)
            why = f"{other} not measured (see its row)"
            if ours is not None and theirs is not None:
                why = (
                    f"{ours.objects_per_s:,.0f} against {theirs.objects_per_s:,.0f} objects/s; of "
                    f"braze_assets' {ours.seconds:.1f} s, {ours.extra.get('delta_s', 0.0):.1f} s went to "
                    f"the delta before the first request; delivery: {_sending_cpu(ours)}"
                )
            yield (f"speed-up over {other} ≥ 10× ({latency:g} ms)", _x(speedup), (speedup or 0) >= 10, why)
