"""A real aiohttp server on 127.0.0.1 that plays many sites at once, told apart by the Host header.

Each test host name (a.test, b.test, ...) is mapped to 127.0.0.1 with the config key
`resolve_hosts` and admitted with `allow_hosts`, so requests go through the downloader's guarded
resolver and client exactly as for public hosts. Every site serves its own robots.txt and
/.well-known/tdmrep.json (or a status, a redirect, a stall) and small JPEGs at any other path;
`?h=Name:value` adds a response header. Every request is logged (host, path, monotonic time).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Optional

from aiohttp import web
from PIL import Image

STALL_S = 60.0  # a stalled policy file ends by itself; clients give up long before


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (64, 48))
    for x in range(64):
        for y in range(48):
            image.putpixel((x, y), ((x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256))
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Site:
    """What one host serves: a file body (str/bytes), an int status, ('redirect', location), 'stall',
    or None (404) for robots.txt and tdmrep.json."""

    def __init__(self, robots=None, tdmrep=None, files: Optional[dict] = None):
        self.robots = robots
        self.tdmrep = tdmrep
        self.files = files or {}  # path -> same kinds as above, for extra paths (redirect targets)


class PolicyServer:
    def __init__(self):
        self.sites: dict[str, Site] = {}
        self.log: list[tuple[str, str, float]] = []
        self.image = _jpeg()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="policy-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _serve(self):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - aiohttp exposes no getter
        self._ready.set()
        self._loop.run_forever()

    async def _answer(self, spec, request) -> web.StreamResponse:
        if spec is None:
            return web.Response(status=404, text="not found")
        if spec == "stall":
            await asyncio.sleep(STALL_S)
            return web.Response(text="late")
        if isinstance(spec, int):
            return web.Response(status=spec, text=f"status {spec}")
        if isinstance(spec, tuple) and spec[0] == "redirect":
            raise web.HTTPFound(spec[1])
        return web.Response(body=spec if isinstance(spec, bytes) else spec.encode(), content_type="text/plain")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        host = (request.host or "").rsplit(":", 1)[0].lower()
        self.log.append((host, request.path_qs, time.monotonic()))
        site = self.sites.get(host, Site())
        if request.path == "/robots.txt":
            return await self._answer(site.robots, request)
        if request.path == "/.well-known/tdmrep.json":
            return await self._answer(site.tdmrep, request)
        if request.path in site.files:
            return await self._answer(site.files[request.path], request)
        headers = {}
        for item in request.query.getall("h", []):
            name, _, value = item.partition(":")
            headers.setdefault(name.strip(), []).append(value.strip())
        response = web.Response(body=self.image, content_type="image/jpeg")
        for name, values in headers.items():
            for value in values:
                response.headers.add(name, value)
        return response

    # --- for tests ----------------------------------------------------------------------------
    def url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.port}{path}"

    def config_overrides(self, hosts) -> dict:
        """resolve_hosts + allow_hosts for these names (build_config keyword arguments)."""
        return {"resolve_hosts": {h: "127.0.0.1" for h in hosts}, "allow_hosts": [f"{h}:{self.port}" for h in hosts]}

    def requests(self, host: str, path: Optional[str] = None) -> list[tuple[str, str, float]]:
        return [entry for entry in self.log if entry[0] == host and (path is None or entry[1] == path)]

    def close(self):
        async def stop():
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
