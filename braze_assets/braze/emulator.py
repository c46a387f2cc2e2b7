"""A local emulator of Braze's user-data REST API (``/users/track``, ``/users/delete``,
``/users/export/ids``) and its catalogs (``/catalogs``, ``/catalogs/{name}/items``), like moto for AWS.

A real ``aiohttp`` HTTP server on loopback that enforces the documented contract (``docs/braze-contract.md``
B1-B3; object rules live in :mod:`braze_assets.braze.emulator_validation`), stores what it accepted so tests
and the demo can query it, and injects faults both before and after processing a request
(docs/architecture.md, Delivery guarantees)
on every API endpoint alike. ``/users/export/ids`` answers from what was stored (identifiers, attributes,
and per event name and product_id the ``first``/``last`` time and ``count``); it has its own rate-limit
window (``export_rate_limit``, Braze's default being 250 requests per minute), unlimited unless set.
Catalogs (B2a; checks in :mod:`braze_assets.braze.emulator_catalogs`) are created with ``POST /catalogs``
or exist from the start (``EmulatorConfig.catalogs``, ``--catalog``); ``PUT``/``DELETE`` of their items
share one rate-limit window of their own (``catalog_rate_limit``; Braze: 16,000 per minute).

Python::

    with BrazeEmulator(EmulatorConfig(rate_limit=3000)) as braze:
        ...  # send requests to braze.base_url, then inspect braze.store.profiles()

Command line: ``braze-emulator --port 4545`` (or ``python -m braze_assets.braze.emulator``); the admin
endpoints under ``/_emulator/`` (stats, profiles, events, purchases, deletions, catalogs, catalogs/{name},
reset, faults, rate_limit, health) need no key and are never counted, rate limited or faulted.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import math
import os
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from braze_assets.braze.contract import MAX_BODY_BYTES
from braze_assets.braze.emulator_catalogs import (
    CATALOG_ITEMS_PATH,
    catalog_not_found,
    check_items,
    configured_catalog,
    invalid_request,
    name_taken,
    new_catalog,
    parse_catalog_option,
)
from braze_assets.braze.emulator_store import EmulatorStore
from braze_assets.braze.emulator_validation import (
    MSG_ALL_INVALID,
    Identity,
    RequestError,
    delete_ids,
    export_request,
    is_number,
    track_arrays,
    validate_object,
)

DEFAULT_API_KEY = "local-emulator-key"
_REASONS = {
    401: "Invalid API Key",  # B1.5
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Rate Limit Exceeded",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass
class FaultConfig:
    """Fault injection rates (0..1), drawn for every API request (``/users/track``, ``/users/delete``,
    ``/users/export/ids``, the catalog endpoints). "before" faults refuse a request unprocessed (429,
    502/503, dropped connection); "after" faults process (store) it and then lose or spoil the answer
    (500/504, dropped connection, a stall past the client's timeout), the ambiguous case of
    docs/architecture.md."""

    rate_429: float = 0.0
    rate_5xx_before: float = 0.0
    rate_drop_before: float = 0.0
    rate_5xx_after: float = 0.0
    rate_drop_after: float = 0.0
    rate_timeout_after: float = 0.0
    timeout_s: float = 30.0
    retry_after_s: int = 1
    latency_ms: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        rates = [value for name, value in vars(self).items() if name.startswith("rate_")]
        if (
            not all(is_number(rate) and 0 <= rate <= 1 for rate in rates)
            or sum(rates[:3]) > 1
            or sum(rates[3:]) > 1
        ):
            raise ValueError("fault rates must be numbers in 0..1, summing to at most 1 before and after")
        if not (
            is_number(self.timeout_s) and is_number(self.latency_ms) and isinstance(self.retry_after_s, int)
        ):
            raise ValueError("timeout_s and latency_ms must be numbers, retry_after_s an integer")


@dataclass
class EmulatorConfig:
    """Server settings; ``rate_limit=None`` means unlimited, ``port=0`` picks a free port. ``lean`` checks
    request limits, auth and identifiers only and keeps only counters (for benchmarks). ``state_file``, if
    set, is loaded into the store on start (when it exists) and written on stop, so a demo keeps its data.
    ``catalogs`` exist from the start (and again after a reset): name -> ``{field: type}``, ``id`` implied,
    e.g. ``{"products": {"title": "string", "price": "number"}}``; ``catalog_rate_limit`` is the window
    the catalog item endpoints share (``None`` = unlimited; Braze: 16,000 per 60 seconds)."""

    api_key: str = field(default=DEFAULT_API_KEY, repr=False)
    host: str = "127.0.0.1"
    port: int = 0
    rate_limit: int | None = None
    rate_window_s: float = 3.0
    export_rate_limit: int | None = None
    export_rate_window_s: float = 60.0
    catalog_rate_limit: int | None = None
    catalog_rate_window_s: float = 60.0
    mau_style_429: bool = False
    legacy_batching: bool = False
    lean: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)
    state_file: str | None = None
    catalogs: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class _RateWindow:
    """Fixed window starting at the first request (B3); every API request counts, refused ones too."""

    limit: int | None
    window_s: float
    resets_at: float = 0.0
    used: int = 0

    def take(self, now: float) -> bool:
        if now >= self.resets_at:
            self.resets_at, self.used = now + self.window_s, 0
        self.used += 1
        return self.limit is None or self.used <= self.limit

    def headers(self) -> dict[str, str]:
        """The `X-RateLimit-*` headers of a limited window (none when unlimited)."""
        if self.limit is None:
            return {}
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - self.used)),
            "X-RateLimit-Reset": str(math.ceil(self.resets_at)),  # UTC epoch seconds (B3)
        }


def _draw(rng: random.Random, *rates: float) -> int:
    """One uniform draw against cumulative ``rates``; the index of the fault hit, or -1 for none."""
    if not any(rates):
        return -1
    point, edge = rng.random(), 0.0
    for index, rate in enumerate(rates):
        edge += rate
        if point < edge:
            return index
    return -1


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type="application/json"
    )


def _drop(request: web.Request) -> web.Response:
    """Close the connection without answering; aiohttp then fails to write the returned response and
    ignores that, so the client sees a disconnect."""
    if request.transport is not None:
        request.transport.close()
    return web.Response()


_EXPORT_PATH = "/users/export/ids"
_Processor = Callable[[web.Request], Awaitable[tuple[int, dict]]]


class BrazeEmulator:
    """The server: runs in a background thread with its own event loop (``start``/``stop`` or ``with``)."""

    def __init__(self, config: EmulatorConfig | None = None):
        self.config = config or EmulatorConfig()
        catalogs = [configured_catalog(name, fields) for name, fields in self.config.catalogs.items()]
        self.store = EmulatorStore(lean=self.config.lean, catalogs=catalogs)
        self.base_url = ""
        self._auth = f"Bearer {self.config.api_key}"
        self.set_faults(self.config.faults)
        self.set_rate_limit(self.config.rate_limit, self.config.rate_window_s)
        self.set_export_rate_limit(self.config.export_rate_limit, self.config.export_rate_window_s)
        self.set_catalog_rate_limit(self.config.catalog_rate_limit, self.config.catalog_rate_window_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- control -----------------------------------------------------------------------------------
    def set_faults(self, faults: FaultConfig) -> None:
        """Swap the fault configuration (thread-safe: one attribute assignment); reseeds the draws."""
        self._faults = (faults, random.Random(faults.seed))

    def set_rate_limit(self, limit: int | None, window_s: float = 3.0) -> None:
        """Swap the rate limit (``None`` = unlimited) and start a fresh window."""
        self._window = _RateWindow(limit, window_s)

    def set_export_rate_limit(self, limit: int | None, window_s: float = 60.0) -> None:
        """Swap ``/users/export/ids``'s own rate limit (``None`` = unlimited; Braze: 250 per minute)."""
        self._export_window = _RateWindow(limit, window_s)

    def set_catalog_rate_limit(self, limit: int | None, window_s: float = 60.0) -> None:
        """Swap the window the catalog item endpoints share (``None`` = unlimited; Braze: 16,000/minute)."""
        self._catalog_window = _RateWindow(limit, window_s)

    def start(self) -> str:
        """Listen on ``config.host:config.port`` and return the base URL once the socket is bound."""
        if self._thread is not None:
            raise RuntimeError("the emulator is already running")
        state = Path(self.config.state_file) if self.config.state_file else None
        if state is not None and state.exists():
            self.store.load(state.read_bytes())
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="braze-emulator", daemon=True)
        self._thread.start()
        try:
            port = ready.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        self.base_url = f"http://{host}:{port}"
        return self.base_url

    def stop(self) -> None:
        """Stop listening (in-flight requests get 0.25 s, then are cancelled); save ``state_file``."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None
        if self.config.state_file:
            state = Path(self.config.state_file)
            temporary = state.with_name(state.name + ".tmp")
            temporary.write_bytes(self.store.dump())
            temporary.replace(state)  # atomic: a crash never leaves half a file

    def __enter__(self) -> BrazeEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self, ready: concurrent.futures.Future[int]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.25)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.config.host, self.config.port).start())
        except BaseException as exc:  # e.g. the port is taken: start() re-raises it
            ready.set_exception(exc)
            loop.run_until_complete(runner.cleanup())
            loop.close()
            return
        ready.set_result(runner.addresses[0][1])
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        leftovers = asyncio.all_tasks(loop)  # handlers of clients that already left (timeout faults)
        for task in leftovers:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.close()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/users/track", partial(self._api, process=self._track))
        app.router.add_post("/users/delete", partial(self._api, process=self._delete))
        app.router.add_post("/users/export/ids", partial(self._api, process=self._export, bucket="export"))
        app.router.add_post("/catalogs", partial(self._api, process=self._catalog_create, bucket=None))
        app.router.add_get("/catalogs", partial(self._api, process=self._catalog_list, bucket=None))
        for method in ("PUT", "DELETE"):
            items = partial(self._catalog_items, method=method)
            app.router.add_route(
                method, "/catalogs/{catalog}/items", partial(self._api, process=items, bucket="items")
            )
        app.router.add_get("/_emulator/{name}", self._admin_read)
        app.router.add_get("/_emulator/catalogs/{catalog}", self._admin_catalog)
        app.router.add_post("/_emulator/reset", self._admin_reset)
        app.router.add_post("/_emulator/faults", self._admin_faults)
        app.router.add_post("/_emulator/rate_limit", self._admin_rate_limit)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        return app

    # --- API pipeline ------------------------------------------------------------------------------
    def _admit(self, request: web.Request, headers: dict[str, str], bucket: str | None) -> int:
        """B3 rate limit of the ``bucket``'s window (``None``: not limited), then B4 auth: 429 or 401 (or
        0 when admitted). Every API request counts toward its window; with a limit set every answer carries
        ``X-RateLimit-*`` except MAU-style 429s, which carry only ``X-Ratelimit-Retry-After``."""
        windows = {"users": self._window, "export": self._export_window, "items": self._catalog_window}
        window = windows[bucket] if bucket else None
        if window is not None and window.limit is not None:
            now = time.time()
            allowed = window.take(now)
            if allowed or not self.config.mau_style_429:
                headers.update(window.headers())
            if not allowed:
                headers["X-Ratelimit-Retry-After"] = str(max(1, math.ceil(window.resets_at - now)))
                return 429
        return 0 if request.headers.get("Authorization") == self._auth else 401

    async def _api(
        self, request: web.Request, process: _Processor, bucket: str | None = "users"
    ) -> web.StreamResponse:
        """Admission, "before" faults, processing, "after" faults, latency, answer (B1-B3; the
        ambiguous case: docs/architecture.md, Delivery guarantees). ``bucket`` names the rate-limit
        window: ``users`` (``/users/track``, ``/users/delete``), ``export``, ``items`` (catalog items)."""
        faults, rng = self._faults
        headers: dict[str, str] = {}
        body: dict = {}
        if bucket == "items":
            self.store.record_catalog_request()
        status = self._admit(request, headers, bucket)
        if not status:
            before = _draw(rng, faults.rate_429, faults.rate_5xx_before, faults.rate_drop_before)
            if before == 0:
                status, headers["X-Ratelimit-Retry-After"] = 429, str(faults.retry_after_s)
            elif before == 1:
                status = rng.choice((502, 503))
            elif before == 2:
                self.store.record_request("dropped")
                return _drop(request)
        if not status:
            try:
                status, body = await process(request)
            except RequestError as error:
                status, body = error.status, {"message": error.message}
            after = _draw(rng, faults.rate_5xx_after, faults.rate_drop_after, faults.rate_timeout_after)
            if after == 0:
                status, body = rng.choice((500, 504)), {}
            elif after == 1:
                self.store.record_request("dropped")
                return _drop(request)
            elif after == 2:
                self.store.record_request("timeout")
                await asyncio.sleep(faults.timeout_s)  # the client has given up by now
                return _json(504, {"message": _REASONS[504]}, headers)
        self.store.record_request(str(status))
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        return _json(status, body or {"message": _REASONS[status]}, headers)

    async def _read_json(self, request: web.Request) -> Any:
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

    async def _track(self, request: web.Request) -> tuple[int, dict]:
        """``POST /users/track`` (B1): validate every object, apply the valid ones, report the rest."""
        arrays = track_arrays(await self._read_json(request), self.config.legacy_batching)
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

    async def _delete(self, request: web.Request) -> tuple[int, dict]:
        """``POST /users/delete`` (B2): one identifier kind, at most 50; answers the number queued."""
        ids = delete_ids(await self._read_json(request))
        self.store.record_deletions(ids)
        return 201, {"deleted": len(ids), "message": "success"}

    async def _export(self, request: web.Request) -> tuple[int, dict]:
        """``POST /users/export/ids``: the users found with the requested fields, and the ids that
        match nobody. Read-only, so an "after" fault loses only the answer."""
        users, invalid = self.store.export(export_request(await self._read_json(request)))
        missing = {"invalid_user_ids": invalid} if invalid else {}
        return 201, {"users": users, **missing, "message": "success"}

    async def _catalog_create(self, request: web.Request) -> tuple[int, dict]:
        """``POST /catalogs`` (B2a): one catalog and its fields; 201 with the catalog as listed."""
        catalog = new_catalog(await self._read_json(request))
        if isinstance(catalog, list):
            return 400, invalid_request(catalog)
        created = self.store.create_catalog(catalog)
        if created is None:
            return 400, name_taken(catalog.name)
        return 201, {"catalogs": [created], "message": "success"}

    async def _catalog_list(self, _request: web.Request) -> tuple[int, dict]:
        """``GET /catalogs``: every catalog, in one page."""
        return 200, {"catalogs": self.store.catalogs(), "message": "success"}

    async def _catalog_items(self, request: web.Request, method: str) -> tuple[int, dict]:
        """``PUT`` (replace, creating missing items) or ``DELETE /catalogs/{catalog}/items`` (B2a): 404 for
        an unknown catalog; one bad item refuses the whole request with 400 and errors naming the items;
        else all are stored and the answer is 202, queued."""
        name = request.match_info["catalog"]
        fields = self.store.catalog_fields(name)
        if fields is None:
            return 404, catalog_not_found(name)
        items, errors = check_items(method, fields, await self._read_json(request))
        if errors:
            self.store.record_catalog_refusal()
            return 400, invalid_request(errors)
        if not self.store.record_catalog_items(name, method, items):
            return 404, catalog_not_found(name)
        return 202, {"message": "success"}

    async def _unknown(self, request: web.Request) -> web.Response:
        """Any other path: 404 (405 for a wrong method on an API path); counted, never rate limited."""
        path = request.path
        api = path in ("/users/track", "/users/delete", _EXPORT_PATH, "/catalogs")
        status = 405 if api or CATALOG_ITEMS_PATH.fullmatch(path) else 404
        self.store.record_request(str(status))
        return _json(status, {"message": _REASONS[status]})

    # --- admin -------------------------------------------------------------------------------------
    async def _admin_read(self, request: web.Request) -> web.Response:
        """``GET /_emulator/{health,stats,profiles,events,purchases,deletions,catalogs}``."""
        name = request.match_info["name"]
        if name == "health":
            return _json(200, {"status": "ok"})
        if name not in ("stats", "profiles", "events", "purchases", "deletions", "catalogs"):
            return _json(404, {"message": _REASONS[404]})
        return _json(200, getattr(self.store, name)())

    async def _admin_catalog(self, request: web.Request) -> web.Response:
        """``GET /_emulator/catalogs/{catalog}``: its items by id (404 if there is no such catalog)."""
        try:
            return _json(200, self.store.catalog_items(request.match_info["catalog"]))
        except KeyError:
            return _json(404, {"message": _REASONS[404]})

    async def _admin_reset(self, _request: web.Request) -> web.Response:
        """Forget everything stored and counted (configured catalogs come back empty), and start fresh
        rate-limit windows."""
        self.store.reset()
        self.set_rate_limit(self._window.limit, self._window.window_s)
        self.set_export_rate_limit(self._export_window.limit, self._export_window.window_s)
        self.set_catalog_rate_limit(self._catalog_window.limit, self._catalog_window.window_s)
        return _json(200, {"message": "reset"})

    async def _admin_faults(self, request: web.Request) -> web.Response:
        try:
            faults = FaultConfig(**orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, TypeError, ValueError) as error:
            return _json(400, {"message": f"Invalid fault configuration: {error}"})
        self.set_faults(faults)
        return _json(200, dataclasses.asdict(faults))

    async def _admin_rate_limit(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            limit, window_s = body.get("limit"), float(body.get("window_s", 3.0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return _json(400, {"message": 'Expected {"limit": int | null, "window_s": number}'})
        if not (limit is None or (isinstance(limit, int) and limit > 0)) or window_s <= 0:
            return _json(400, {"message": "'limit' must be a positive integer or null, 'window_s' positive"})
        self.set_rate_limit(limit, window_s)
        return _json(200, {"limit": limit, "window_s": window_s})


_FAULT_FLAGS = {  # command-line flag -> FaultConfig field
    "--fault-429": "rate_429",
    "--fault-5xx-before": "rate_5xx_before",
    "--fault-drop-before": "rate_drop_before",
    "--fault-5xx-after": "rate_5xx_after",
    "--fault-drop-after": "rate_drop_after",
    "--fault-timeout-after": "rate_timeout_after",
}


def main(argv: list[str] | None = None) -> None:
    """``braze-emulator``: run the emulator in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="braze-emulator", description="Local Braze REST API emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4545, help="0 picks a free port")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("BRAZE_API_KEY", DEFAULT_API_KEY),
        help="accepted Bearer key (default: $BRAZE_API_KEY, else the built-in local key); prefer the env var",
    )
    parser.add_argument(
        "--rate-limit", type=int, default=None, help="requests per window (default unlimited)"
    )
    parser.add_argument("--rate-window", type=float, default=3.0, help="window length in seconds")
    parser.add_argument(
        "--export-rate-limit",
        type=int,
        default=None,
        help="/users/export/ids requests per window (default unlimited; Braze's default is 250 per minute)",
    )
    parser.add_argument("--export-rate-window", type=float, default=60.0, help="its window in seconds")
    parser.add_argument(
        "--catalog",
        action="append",
        default=[],
        metavar="NAME:FIELD=TYPE,...",
        help="a catalog that exists from the start (repeatable), e.g. products:title=string,price=number",
    )
    parser.add_argument(
        "--catalog-rate-limit",
        type=int,
        default=None,
        help="requests per window the catalog item endpoints share (default unlimited; Braze: 16,000/min)",
    )
    parser.add_argument("--catalog-rate-window", type=float, default=60.0, help="its window in seconds")
    parser.add_argument(
        "--mau-style-429", action="store_true", help="429s carry only X-Ratelimit-Retry-After"
    )
    parser.add_argument(
        "--legacy-batching", action="store_true", help="75 objects per array instead of in total"
    )
    parser.add_argument(
        "--lean", action="store_true", help="check limits, auth and identifiers only; keep only counters"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every API answer")
    for flag, name in _FAULT_FLAGS.items():
        parser.add_argument(
            flag, dest=name, type=float, default=0.0, help=f"share of requests, 0..1 ({name})"
        )
    parser.add_argument("--timeout-s", type=float, default=30.0, help="how long a timeout fault stalls")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible fault draws")
    args = parser.parse_args(argv)
    try:
        faults = FaultConfig(
            timeout_s=args.timeout_s,
            latency_ms=args.latency_ms,
            seed=args.seed,
            **{name: getattr(args, name) for name in _FAULT_FLAGS.values()},
        )
        catalogs = dict(parse_catalog_option(text) for text in args.catalog)
    except ValueError as error:
        parser.error(str(error))
    config = EmulatorConfig(
        api_key=args.api_key,
        host=args.host,
        port=args.port,
        rate_limit=args.rate_limit,
        rate_window_s=args.rate_window,
        export_rate_limit=args.export_rate_limit,
        export_rate_window_s=args.export_rate_window,
        catalog_rate_limit=args.catalog_rate_limit,
        catalog_rate_window_s=args.catalog_rate_window,
        catalogs=catalogs,
        mau_style_429=args.mau_style_429,
        legacy_batching=args.legacy_batching,
        lean=args.lean,
        faults=faults,
    )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    with BrazeEmulator(config) as emulator:
        print(f"Braze emulator listening on {emulator.base_url}", flush=True)
        stopping.wait()


if __name__ == "__main__":
    main()
