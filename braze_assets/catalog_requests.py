"""What Braze's catalog item endpoints answer, read for delivery (docs/braze-contract.md, catalogs).

A `400 {"errors": [{"id", "message", "parameter_values": [item ids]}]}` refuses the whole request
but names the items at fault: those fail with Braze's words, and the rest of the request is sent
again without them. `catalog-not-found` (a 404, or a 400 naming it) is a global error: every
request of the sync would get it, so the sync stops with what to do.
"""

from __future__ import annotations

from typing import Any

import orjson

from braze_assets.braze.client import BrazeAuthError, RequestOutcome


class CatalogNotFoundError(BrazeAuthError):
    """Braze has no such catalog: stop the sync (as a refused key does), change nothing."""


def item_ids(objects: list[bytes], rows: list[int]) -> dict[str, int]:
    """The item id of each row of a request (objects are `[op, item]`), by id."""
    return {orjson.loads(objects[i])[1]["id"]: i for i in rows}


def items_body(objects: list[bytes], rows: list[int]) -> bytes:
    """A request body of these rows' items."""
    return b'{"items":[' + b",".join(orjson.dumps(orjson.loads(objects[i])[1]) for i in rows) + b"]}"


def _errors(result: RequestOutcome) -> list[dict[str, Any]]:
    errors = result.body.get("errors") if isinstance(result.body, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []


def catalog_missing(result: RequestOutcome, catalog: str, sync: str) -> CatalogNotFoundError | None:
    """The global error of a missing catalog, or None: any 404, or a 400 whose errors say
    `catalog-not-found` (Braze documents that error under both statuses)."""
    if result.kind != "rejected" or result.status not in (400, 404):
        return None
    named = [e for e in _errors(result) if e.get("id") == "catalog-not-found"]
    if result.status == 400 and not named:
        return None
    why = "catalog-not-found" if named else f"404 ({result.message})"
    return CatalogNotFoundError(
        f"Braze has no catalog {catalog!r} ({why}): create it, with its fields, in Braze "
        f"(Data Settings > Catalogs) before syncing {sync}; no item was sent."
    )


def items_at_fault(result: RequestOutcome, ids: dict[str, int]) -> dict[int, str]:
    """The rows a 400 names, with Braze's error id and message for each."""
    if result.kind != "rejected" or result.status != 400:
        return {}
    named: dict[int, str] = {}
    for error in _errors(result):
        message = f"{error.get('id') or 'error'}: {error.get('message') or result.message}"
        for value in error.get("parameter_values") or []:
            row = ids.get(str(value))
            if row is not None and row not in named:
                named[row] = message
    return named


def request_message(result: RequestOutcome) -> str:
    """Why Braze refused a whole request, in its own words (its error ids and messages)."""
    errors = _errors(result)
    if not errors:
        return f"Braze refused the request: {result.message}"
    return "Braze refused the request: " + "; ".join(
        f"{e.get('id') or 'error'}: {e.get('message') or ''}".strip() for e in errors
    )
