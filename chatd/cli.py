"""Command line: parse flags, load settings, run the server, return an exit code."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from aiohttp import web

from chatd import config, listen, logs, ops
from chatd.app import create_app
from chatd.config import EXIT_CONFIG
from chatd.embedded import EmbeddedError
from chatd.workers import report_alive, supervise, worker_count

log = logging.getLogger("chatd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line and exit 2, like every other configuration error."""
        self.exit(EXIT_CONFIG, f"chatd: {message}\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(prog="chatd", description="Self-hosted real-time chat server.")
    p.add_argument("--config", type=Path, help="config file (default: ./config.toml if present)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080)")
    p.add_argument("--node-id", help="this node's id (default: generated, kept in the data dir)")
    p.add_argument("--redis-url", help="'embedded' (default) or redis://, rediss://, unix:// URL")
    p.add_argument("--redis-cluster", help="HOST:PORT,... of a Redis/Valkey Cluster")
    p.add_argument("--data-dir", help="data directory (default ./data)")
    p.add_argument("--ops-port", type=int,
                   help="also serve /healthz, /readyz, /metrics here (worker N: + N)")
    p.add_argument("--workers", type=int,
                   help="processes serving the port, each a node (default 1; 0 = one per core)")
    # Set by the supervisor of server.workers > 1 (workers.py) for each worker it runs.
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> config.Settings:
    path = args.config
    if path is None and Path("config.toml").is_file():
        path = Path("config.toml")
    cluster = None
    if args.redis_cluster is not None:
        cluster = [n.strip() for n in args.redis_cluster.split(",") if n.strip()]
    return config.load(path, os.environ, {
        "server.host": args.host,
        "server.port": args.port,
        "server.node_id": args.node_id,
        "server.data_dir": args.data_dir,
        "server.workers": args.workers,
        "server.ops_port": args.ops_port,
        "redis.url": args.redis_url,
        "redis.cluster_nodes": cluster,
    })


async def serve(settings: config.Settings, *, worker: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain; as worker `worker` of a supervisor
    (workers.py) when given: on a port shared with the other workers."""
    # Before the app starts: a node sizes its connection cap from this limit (capacity.py).
    max_open_files = listen.raise_open_files_limit()
    # aiohttp's keep-alive timer also runs from connect (aiohttp >= 3.14.4) and is not
    # pushed back by a partial request: a client that sends nothing, or trickles its
    # headers, holds its socket at most this long. Lingering is how long aiohttp reads
    # the unread rest of a body after answering, before it closes.
    request_timeout = settings.server.request_timeout_s
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False,
                           shutdown_timeout=settings.server.shutdown_timeout_s,
                           keepalive_timeout=request_timeout, lingering_time=request_timeout)
    ops_runner = None
    if settings.server.ops_port:
        ops_runner = web.AppRunner(ops.ops_app(app), handle_signals=False,
                                   keepalive_timeout=request_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    alive: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        await _listen(runner, settings, settings.server.port, reuse_port=worker is not None)
        if ops_runner is not None:
            await ops_runner.setup()
            await _listen(ops_runner, settings, settings.server.ops_port + (worker or 0),
                          reuse_port=False)
        # Everything allocated so far (modules, app, scripts) lives as long as the
        # process: moving it out of the collector's reach makes each full
        # collection, a pause of the whole event loop, scan only what traffic made.
        gc.freeze()
        url = listen.http_url(settings.server.host, settings.server.port)
        # Each connection takes one file: the figure that bounds the node's connections.
        log.info("chatd ready", extra={"url": url, "max_open_files": max_open_files})
        # stdout, so that stderr stays JSON lines for log collectors.
        print(f"chatd ready: web client on {url}", flush=True)
        if worker is not None and settings.server.worker_timeout_s:
            # Until the process ends: a worker drained on its own (SIGTERM to it) is watched too.
            alive = asyncio.create_task(report_alive(settings.server.worker_timeout_s))
        await stop.wait()
        log.info("draining")
    finally:
        await runner.cleanup()
        if ops_runner is not None:  # last: /readyz says "draining" until the drain is done
            await ops_runner.cleanup()
        if alive is not None:
            alive.cancel()


async def _listen(runner: web.AppRunner, settings: config.Settings, port: int, *,
                  reuse_port: bool) -> None:
    host = settings.server.host
    try:
        for sock in listen.bind(host, port, settings.server.send_timeout_s,
                                reuse_port=reuse_port):
            await web.SockSite(runner, sock).start()
    except OSError as e:
        raise config.ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except config.ConfigError as e:
        print(f"chatd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(settings.server.log_level, settings.server.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on platforms without it
        runner = asyncio.run
    else:
        runner = uvloop.run
    count = worker_count(settings.server.workers)
    try:
        if args.worker is None and count > 1:
            code = runner(supervise(settings, count, argv))
        else:
            code = runner(serve(settings, worker=args.worker)) or 0
    except (config.ConfigError, EmbeddedError) as e:
        print(f"chatd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # a second Ctrl-C during the drain
        return 130
    log.info("stopped")
    return code
