"""The HTTP transport under `BrazeClient`: aiohttp's connection pool behind httpx's transport API.

`httpx_aiohttp.AiohttpTransport` is general: per request it converts httpx's header object for
aiohttp, builds a timeout, and hands the answer back as a stream read in chunks. Delivery sends
thousands of requests that differ only in their body, to a handful of URLs with the same headers,
and reads every (small) answer whole. So this transport converts the headers in one pass, keeps
its timeouts, and reads each answer in one call: the same httpx `Request` in, the same httpx
`Response` out, measured at about a fifth of the sender's CPU less (benchmarks/RESULTS.md).
Anything it does not specialise (proxies, streamed bodies) goes through the general path.
"""

from __future__ import annotations

from typing import Any

import httpx
from aiohttp import ClientTimeout
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import map_aiohttp_exceptions


class LeanAiohttpTransport(AiohttpTransport):
    """`AiohttpTransport` for many small requests with the same headers, read whole."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._timeouts: dict[tuple[tuple[str, Any], ...], ClientTimeout] = {}

    def _timeout(self, timeout: dict[str, Any]) -> ClientTimeout:
        key = tuple(sorted(timeout.items()))
        found = self._timeouts.get(key)
        if found is None:
            found = self._timeouts[key] = ClientTimeout(
                sock_connect=timeout.get("connect"),
                sock_read=timeout.get("read"),
                connect=timeout.get("pool"),
            )
        return found

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.proxy is not None or not isinstance(request.stream, httpx.ByteStream):
            return await super().handle_async_request(request)
        if self.client is None or callable(self.client):
            self.client = self.get_client()
        client = self.client
        # One pass over the raw pairs (aiohttp would walk httpx's header object key by key);
        # aiohttp sets Content-Length from the body itself.
        plain = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in request.headers.raw
            if name.lower() != b"content-length"
        }
        with map_aiohttp_exceptions():
            async with client.request(
                request.method,
                str(request.url),
                headers=plain,
                data=request.content or None,
                allow_redirects=False,
                auto_decompress=False,
                compress=False,
                timeout=self._timeout(request.extensions.get("timeout", {})),
                server_hostname=request.extensions.get("sni_hostname"),
            ) as response:
                content = await response.read()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            content=content,
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )
