"""Operational endpoints: liveness, readiness, Prometheus metrics (no auth, no prefix)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from chatd.appkeys import NODE


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    loops = {loop.name: loop.running and loop.healthy for loop in node.loops}
    ready = node.ready()
    body = {"status": "ready" if ready else "not ready", "node_id": node.node_id,
            "draining": node.draining, "loops": loops}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[NODE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
