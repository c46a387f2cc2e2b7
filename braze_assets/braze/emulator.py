"""A local emulator of Braze's user-data REST API (``/users/track``, ``/users/delete``,
``/users/export/ids``) and its catalogs (``/catalogs``, ``/catalogs/{name}/items``), like moto for AWS.

A real ``aiohttp`` HTTP server on loopback that enforces the documented contract (``docs/braze-contract.md``
B1-B3; the endpoints live in :mod:`braze_assets.braze.emulator_api`, object rules in
:mod:`braze_assets.braze.emulator_validation`), stores what it accepted so tests and the demo can query
it, and injects faults (:mod:`braze_assets.braze.emulator_faults`) both before and after processing a
request (docs/architecture.md, Delivery guarantees) on every API endpoint alike. ``/users/export/ids``
answers from what was stored (identifiers, attributes, and per event name and product_id the
``first``/``last`` time and ``count``); it has its own rate-limit window (``export_rate_limit``, Braze's
default being 250 requests per minute), unlimited unless set. Catalogs (B2a; checks in
:mod:`braze_assets.braze.emulator_catalogs`) are created with ``POST /catalogs`` or exist from the start
(``EmulatorConfig.catalogs``, ``--catalog``); ``PUT``/``DELETE`` of their items share one rate-limit
window of their own (``catalog_rate_limit``; Braze: 16,000 per minute). This module holds the settings,
the server's lifecycle, its routes, the control methods, the admin endpoints and the command line.

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
import os
import random
import signal
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import orjson
from aiohttp import web

from braze_assets.braze.contract import MAX_BODY_BYTES
from braze_assets.braze.emulator_api import REASONS, EmulatorApi, json_response
from braze_assets.braze.emulator_catalogs import configured_catalog, parse_catalog_option
from braze_assets.braze.emulator_faults import FaultConfig, RateWindow
from braze_assets.braze.emulator_store import EmulatorStore

#: The API pipeline and endpoint handlers live in `emulator_api.py`, the fault and rate-limit rules in
#: `emulator_faults.py`; the public names stay importable from here, where they were first.
__all__ = ["DEFAULT_API_KEY", "BrazeEmulator", "EmulatorConfig", "FaultConfig", "main"]

DEFAULT_API_KEY = "local-emulator-key"


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
    #: the status of a `catalog-not-found` answer: Braze documents it under both 404 and 400
    catalog_not_found_status: int = 404


class BrazeEmulator:
    """The server: runs in a background thread with its own event loop (``start``/``stop`` or ``with``)."""

    def __init__(self, config: EmulatorConfig | None = None):
        self.config = config or EmulatorConfig()
        catalogs = [configured_catalog(name, fields) for name, fields in self.config.catalogs.items()]
        self.store = EmulatorStore(lean=self.config.lean, catalogs=catalogs)
        self.base_url = ""
        self._api = EmulatorApi(self.config, self.store)
        self.set_faults(self.config.faults)
        self.set_rate_limit(self.config.rate_limit, self.config.rate_window_s)
        self.set_export_rate_limit(self.config.export_rate_limit, self.config.export_rate_window_s)
        self.set_catalog_rate_limit(self.config.catalog_rate_limit, self.config.catalog_rate_window_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- control -----------------------------------------------------------------------------------
    def set_faults(self, faults: FaultConfig) -> None:
        """Swap the fault configuration (thread-safe: one attribute assignment); reseeds the draws."""
        self._api.faults = (faults, random.Random(faults.seed))

    def set_rate_limit(self, limit: int | None, window_s: float = 3.0) -> None:
        """Swap the rate limit (``None`` = unlimited) and start a fresh window."""
        self._api.windows["users"] = RateWindow(limit, window_s)

    def set_export_rate_limit(self, limit: int | None, window_s: float = 60.0) -> None:
        """Swap ``/users/export/ids``'s own rate limit (``None`` = unlimited; Braze: 250 per minute)."""
        self._api.windows["export"] = RateWindow(limit, window_s)

    def set_catalog_rate_limit(self, limit: int | None, window_s: float = 60.0) -> None:
        """Swap the window the catalog item endpoints share (``None`` = unlimited; Braze: 16,000/minute)."""
        self._api.windows["items"] = RateWindow(limit, window_s)

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
        # Ctrl-C and stop requests are for the main thread: a process-wide signal the kernel
        # hands to this thread instead (it may, while this thread answers requests) sets
        # Python's flag but never wakes a main thread blocked in a system call, such as
        # `braze-assets ui` waiting for its child, which would then never stop.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
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
        api = self._api
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/users/track", partial(api.handle, process=api.track))
        app.router.add_post("/users/delete", partial(api.handle, process=api.delete))
        app.router.add_post("/users/export/ids", partial(api.handle, process=api.export, bucket="export"))
        app.router.add_post("/catalogs", partial(api.handle, process=api.catalog_create, bucket=None))
        app.router.add_get("/catalogs", partial(api.handle, process=api.catalog_list, bucket=None))
        for method in ("PUT", "DELETE"):
            items = partial(api.catalog_items, method=method)
            app.router.add_route(
                method, "/catalogs/{catalog}/items", partial(api.handle, process=items, bucket="items")
            )
        app.router.add_get("/_emulator/{name}", self._admin_read)
        app.router.add_get("/_emulator/catalogs/{catalog}", self._admin_catalog)
        app.router.add_post("/_emulator/reset", self._admin_reset)
        app.router.add_post("/_emulator/faults", self._admin_faults)
        app.router.add_post("/_emulator/rate_limit", self._admin_rate_limit)
        app.router.add_route("*", "/{tail:.*}", api.unknown)
        return app

    # --- admin -------------------------------------------------------------------------------------
    async def _admin_read(self, request: web.Request) -> web.Response:
        """``GET /_emulator/{health,stats,profiles,events,purchases,deletions,catalogs}``."""
        name = request.match_info["name"]
        if name == "health":
            return json_response(200, {"status": "ok"})
        if name not in ("stats", "profiles", "events", "purchases", "deletions", "catalogs"):
            return json_response(404, {"message": REASONS[404]})
        return json_response(200, getattr(self.store, name)())

    async def _admin_catalog(self, request: web.Request) -> web.Response:
        """``GET /_emulator/catalogs/{catalog}``: its items by id (404 if there is no such catalog)."""
        try:
            return json_response(200, self.store.catalog_items(request.match_info["catalog"]))
        except KeyError:
            return json_response(404, {"message": REASONS[404]})

    async def _admin_reset(self, _request: web.Request) -> web.Response:
        """Forget everything stored and counted (configured catalogs come back empty), and start fresh
        rate-limit windows."""
        self.store.reset()
        users, export, items = (self._api.windows[bucket] for bucket in ("users", "export", "items"))
        self.set_rate_limit(users.limit, users.window_s)
        self.set_export_rate_limit(export.limit, export.window_s)
        self.set_catalog_rate_limit(items.limit, items.window_s)
        return json_response(200, {"message": "reset"})

    async def _admin_faults(self, request: web.Request) -> web.Response:
        try:
            faults = FaultConfig(**orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, TypeError, ValueError) as error:
            return json_response(400, {"message": f"Invalid fault configuration: {error}"})
        self.set_faults(faults)
        return json_response(200, dataclasses.asdict(faults))

    async def _admin_rate_limit(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            limit, window_s = body.get("limit"), float(body.get("window_s", 3.0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return json_response(400, {"message": 'Expected {"limit": int | null, "window_s": number}'})
        if not (limit is None or (isinstance(limit, int) and limit > 0)) or window_s <= 0:
            return json_response(
                400, {"message": "'limit' must be a positive integer or null, 'window_s' positive"}
            )
        self.set_rate_limit(limit, window_s)
        return json_response(200, {"limit": limit, "window_s": window_s})


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
