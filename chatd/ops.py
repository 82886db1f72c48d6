"""Operational endpoints: liveness, readiness, Prometheus metrics (no auth, no prefix).

They answer on the node's port and, with `server.ops_port`, on a port of the node's
own, where nothing else answers: behind one port shared by workers (workers.py) a
request reaches whichever worker the kernel picks, and a monitor needs each.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from chatd.appkeys import NODE
from chatd.node import Node

# On the app of the ops port: the node's app, whose node it reports on.
SERVED = web.AppKey("served", web.Application)


def _node(request: web.Request) -> Node:
    return request.app.get(SERVED, request.app)[NODE]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = _node(request)
    loops = {loop.name: loop.running and loop.healthy for loop in node.loops}
    ready = node.ready()
    body = {"status": "ready" if ready else "not ready", "node_id": node.node_id,
            "draining": node.draining, "loops": loops}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = _node(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


def ops_app(served: web.Application) -> web.Application:
    """These endpoints alone, reporting on `served`'s node (`server.ops_port`)."""
    app = web.Application()
    app[SERVED] = served
    add_routes(app)
    return app
