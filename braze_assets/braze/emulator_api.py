"""The local Braze emulator's API endpoints: what every API request goes through (rate limit, auth,
faults, latency) and the handlers of ``/users/track``, ``/users/delete``, ``/users/export/ids`` and the
catalog endpoints (``docs/braze-contract.md`` B1-B3, B2a).

Kept apart from the server in :mod:`braze_assets.braze.emulator`, which owns the event loop, the routes,
the admin endpoints and the command line, so the contract a client sees reads in one place. The checks
themselves are in :mod:`braze_assets.braze.emulator_validation` and
:mod:`braze_assets.braze.emulator_catalogs`; what is accepted goes to the store.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from braze_assets.braze.contract import MAX_BODY_BYTES
from braze_assets.braze.emulator_catalogs import (
    CATALOG_ITEMS_PATH,
    catalog_not_found,
    check_items,
    invalid_request,
    name_taken,
    new_catalog,
)
from braze_assets.braze.emulator_faults import FaultConfig, RateWindow, draw, drop
from braze_assets.braze.emulator_store import EmulatorStore
from braze_assets.braze.emulator_validation import (
    MSG_ALL_INVALID,
    Identity,
    RequestError,
    delete_ids,
    export_request,
    track_arrays,
    validate_object,
)

if TYPE_CHECKING:
    from braze_assets.braze.emulator import EmulatorConfig

REASONS = {
    401: "Invalid API Key",  # B1.5
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Rate Limit Exceeded",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


async def read_json(request: web.Request) -> Any:
    """B1.2: bodies over 4 MB -> 413; unparsable JSON -> 400."""
    too_large = RequestError(413, "Request Entity Too Large")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestError(400, "Invalid JSON") from None


_EXPORT_PATH = "/users/export/ids"
Processor = Callable[[web.Request], Awaitable[tuple[int, dict]]]


class EmulatorApi:
    """The API endpoints over one store. ``faults`` and each of the ``windows`` (by rate-limit bucket) are
    set by the emulator's control methods before it serves, and replaced by them while it does: one
    assignment each, so a request in flight sees either the old or the new setting, never half of each."""

    def __init__(self, config: EmulatorConfig, store: EmulatorStore):
        self.config = config
        self.store = store
        self._auth = f"Bearer {config.api_key}"
        self.faults: tuple[FaultConfig, random.Random]
        self.windows: dict[str, RateWindow] = {}

    # --- pipeline ----------------------------------------------------------------------------------
    def admit(self, request: web.Request, headers: dict[str, str], bucket: str | None) -> int:
        """B3 rate limit of the ``bucket``'s window (``None``: not limited), then B4 auth: 429 or 401 (or
        0 when admitted). Every API request counts toward its window; with a limit set every answer carries
        ``X-RateLimit-*`` except MAU-style 429s, which carry only ``X-Ratelimit-Retry-After``."""
        window = self.windows[bucket] if bucket else None
        if window is not None and window.limit is not None:
            now = time.time()
            allowed = window.take(now)
            if allowed or not self.config.mau_style_429:
                headers.update(window.headers())
            if not allowed:
                headers["X-Ratelimit-Retry-After"] = str(max(1, math.ceil(window.resets_at - now)))
                return 429
        return 0 if request.headers.get("Authorization") == self._auth else 401

    async def handle(
        self, request: web.Request, process: Processor, bucket: str | None = "users"
    ) -> web.StreamResponse:
        """Admission, "before" faults, processing, "after" faults, latency, answer (B1-B3; the
        ambiguous case: docs/architecture.md, Delivery guarantees). ``bucket`` names the rate-limit
        window: ``users`` (``/users/track``, ``/users/delete``), ``export``, ``items`` (catalog items)."""
        faults, rng = self.faults
        headers: dict[str, str] = {}
        body: dict = {}
        if bucket == "items":
            self.store.record_catalog_request()
        status = self.admit(request, headers, bucket)
        if not status:
            before = draw(rng, faults.rate_429, faults.rate_5xx_before, faults.rate_drop_before)
            if before == 0:
                status, headers["X-Ratelimit-Retry-After"] = 429, str(faults.retry_after_s)
            elif before == 1:
                status = rng.choice((502, 503))
            elif before == 2:
                self.store.record_request("dropped")
                return drop(request)
        if not status:
            try:
                status, body = await process(request)
            except RequestError as error:
                status, body = error.status, {"message": error.message}
            after = draw(rng, faults.rate_5xx_after, faults.rate_drop_after, faults.rate_timeout_after)
            if after == 0:
                status, body = rng.choice((500, 504)), {}
            elif after == 1:
                self.store.record_request("dropped")
                return drop(request)
            elif after == 2:
                self.store.record_request("timeout")
                await asyncio.sleep(faults.timeout_s)  # the client has given up by now
                return json_response(504, {"message": REASONS[504]}, headers)
        self.store.record_request(str(status))
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        return json_response(status, body or {"message": REASONS[status]}, headers)

    # --- endpoints ---------------------------------------------------------------------------------
    async def track(self, request: web.Request) -> tuple[int, dict]:
        """``POST /users/track`` (B1): validate every object, apply the valid ones, report the rest."""
        arrays = track_arrays(await read_json(request), self.config.legacy_batching)
        full = not self.config.lean
        body: dict[str, Any] = {"message": "success"}
        accepted: list[tuple[str, dict, Identity]] = []
        errors: list[dict] = []
        for array, objects in arrays.items():
            accepted_before = len(accepted)
            for index, obj in enumerate(objects):
                result = validate_object(array, obj, full)
                if isinstance(result, str):
                    errors.append({"type": result, "input_array": array, "index": index})
                else:
                    accepted.append((array, obj, result))
            body[f"{array}_processed"] = len(accepted) - accepted_before
        self.store.record_track(accepted, len(errors))
        if not accepted:  # B1.4: nothing valid -> 400 with every error
            return 400, {"message": MSG_ALL_INVALID, **({"errors": errors} if errors else {})}
        if errors:
            body["errors"] = errors
        return 201, body

    async def delete(self, request: web.Request) -> tuple[int, dict]:
        """``POST /users/delete`` (B2): one identifier kind, at most 50; answers the number queued."""
        ids = delete_ids(await read_json(request))
        self.store.record_deletions(ids)
        return 201, {"deleted": len(ids), "message": "success"}

    async def export(self, request: web.Request) -> tuple[int, dict]:
        """``POST /users/export/ids``: the users found with the requested fields, and the ids that
        match nobody. Read-only, so an "after" fault loses only the answer."""
        users, invalid = self.store.export(export_request(await read_json(request)))
        missing = {"invalid_user_ids": invalid} if invalid else {}
        return 201, {"users": users, **missing, "message": "success"}

    async def catalog_create(self, request: web.Request) -> tuple[int, dict]:
        """``POST /catalogs`` (B2a): one catalog and its fields; 201 with the catalog as listed."""
        catalog = new_catalog(await read_json(request))
        if isinstance(catalog, list):
            return 400, invalid_request(catalog)
        created = self.store.create_catalog(catalog)
        if created is None:
            return 400, name_taken(catalog.name)
        return 201, {"catalogs": [created], "message": "success"}

    async def catalog_list(self, _request: web.Request) -> tuple[int, dict]:
        """``GET /catalogs``: every catalog, in one page."""
        return 200, {"catalogs": self.store.catalogs(), "message": "success"}

    async def catalog_items(self, request: web.Request, method: str) -> tuple[int, dict]:
        """``PUT`` (replace, creating missing items) or ``DELETE /catalogs/{catalog}/items`` (B2a): 404 for
        an unknown catalog; one bad item refuses the whole request with 400 and errors naming the items;
        else all are stored and the answer is 202, queued."""
        name = request.match_info["catalog"]
        fields = self.store.catalog_fields(name)
        if fields is None:
            return self.config.catalog_not_found_status, catalog_not_found(name)
        items, errors = check_items(method, fields, await read_json(request))
        if errors:
            self.store.record_catalog_refusal()
            return 400, invalid_request(errors)
        if not self.store.record_catalog_items(name, method, items):
            return self.config.catalog_not_found_status, catalog_not_found(name)
        return 202, {"message": "success"}

    async def unknown(self, request: web.Request) -> web.Response:
        """Any other path: 404 (405 for a wrong method on an API path); counted, never rate limited."""
        path = request.path
        api = path in ("/users/track", "/users/delete", _EXPORT_PATH, "/catalogs")
        status = 405 if api or CATALOG_ITEMS_PATH.fullmatch(path) else 404
        self.store.record_request(str(status))
        return json_response(status, {"message": REASONS[status]})
