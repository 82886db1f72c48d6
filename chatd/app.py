"""The application factory: routes, the node's resources as cleanup contexts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from redis.exceptions import RedisError

from chatd import api_accounts, api_messages, api_rooms, http, keys, ops, redisconn, webclient, ws
from chatd.appkeys import FANOUT, NODE, SETTINGS
from chatd.broker import Broker
from chatd.capacity import Sockets, cap_for
from chatd.config import Settings, redact_url
from chatd.embedded import embedded_for
from chatd.errors import ChatError
from chatd.fanout import Fanout
from chatd.heartbeat import heartbeat_loop
from chatd.janitor import Janitor, cleanup_node
from chatd.logs import error_text
from chatd.loops import Loop
from chatd.metrics import Metrics
from chatd.node import Node, check_meta, claim_data_dir, node_id_for
from chatd.protocol import CLOSE_GOING_AWAY, CLOSE_RESUME_REQUIRED
from chatd.scripts import Scripts

log = logging.getLogger("chatd.app")

_PROBE_INTERVAL_S = 1.0


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=settings.server.max_http_body_bytes,
                          middlewares=[http.errors_middleware])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_node_ctx)
    app.on_response_prepare.append(http.on_prepare)
    app.on_shutdown.append(_close_websockets)
    ops.add_routes(app)
    api_accounts.add_routes(app)
    api_rooms.add_routes(app)
    api_messages.add_routes(app)
    ws.add_routes(app)
    webclient.add_routes(app)
    return app


async def _node_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(claim_data_dir(settings.data_path).close)
        url = settings.redis.url
        embedded = embedded_for(settings)
        if embedded is not None:
            url = await embedded.start()
            stack.push_async_callback(embedded.stop)
        redis = await redisconn.connect(settings, url)
        stack.push_async_callback(redis.close)
        metrics = Metrics()
        metrics.full_collections.watch()
        stack.callback(metrics.full_collections.unwatch)
        scripts = Scripts(redis.cmd, metrics, settle_s=settings.redis.socket_timeout_s,
                          master_client=redis.master_client if redis.is_cluster else None,
                          mux=redis.mux)
        node = Node(settings=settings, node_id=node_id_for(settings), redis=redis,
                    scripts=scripts, metrics=metrics,
                    sockets=Sockets(cap_for(settings.limits.max_connections_per_node)))
        metrics.connections.set_function(lambda: node.sockets.open)
        metrics.connections_max.set(node.sockets.cap)
        node.survivors.watch()
        stack.callback(node.survivors.unwatch)
        stack.push_async_callback(node.stop_loops)
        await scripts.load_all()
        await check_meta(node)
        fanout = Fanout(node)
        app[NODE] = node
        app[FANOUT] = fanout
        # What a previous life under this node id left (interest, inboxes, presence).
        await cleanup_node(node, node.node_id)
        broker = Broker(node, fanout, on_fenced=_fenced(node, fanout))
        await broker.join()
        node.add_loop(Loop("redis-probe", _probe(node), metrics, interval_s=_PROBE_INTERVAL_S))
        if embedded is not None:
            node.add_loop(Loop("embedded-valkey",
                               functools.partial(embedded.revive,
                                                 settings.redis.startup_timeout_s),
                               metrics, interval_s=_PROBE_INTERVAL_S))
        for loop in broker.loops():
            node.add_loop(loop)
        node.add_loop(heartbeat_loop(node, fanout))
        janitor = Janitor(node, alive_since=lambda: broker.beating_since)
        node.add_loop(Loop("janitor", janitor.step, metrics,
                           interval_s=settings.fanout.janitor_interval_s))
        log.info("node started", extra={
            "node_id": node.node_id, "max_connections": node.sockets.cap,
            "redis": ",".join(settings.redis.cluster_nodes) or redact_url(url)})
        yield
        node.draining = True
        await node.stop_loops()
        await _leave(node)


async def _close_websockets(app: web.Application) -> None:
    """Graceful drain: queued frames go out, then every socket closes with 1001."""
    node = app[NODE]
    node.draining = True
    conns = app[FANOUT].all_conns()
    for conn in conns:
        conn.close(CLOSE_GOING_AWAY, flush=True)
    await asyncio.gather(*(c.closed(timeout_s=2.0) for c in conns))


async def _leave(node: Node) -> None:
    """Say goodbye so others need not wait for the janitor; best effort."""
    try:
        await asyncio.wait_for(cleanup_node(node, node.node_id), timeout=5)
        await node.redis.cmd.zrem(keys.NODES, node.node_id)
    except (RedisError, OSError, ChatError, TimeoutError) as e:
        log.warning("could not deregister; the janitor will", extra={"error": error_text(e)})


def _fenced(node: Node, fanout: Fanout) -> Callable[[], Awaitable[None]]:
    async def fenced() -> None:
        # Our interest is gone: clients must resume elsewhere or here, from the log.
        for conn in fanout.all_conns():
            conn.close(CLOSE_RESUME_REQUIRED)
        fanout.forget_interest()
        await cleanup_node(node, node.node_id)

    return fenced


def _probe(node: Node) -> Callable[[], Awaitable[None]]:
    async def probe() -> None:
        await node.redis.cmd.ping()

    return probe
