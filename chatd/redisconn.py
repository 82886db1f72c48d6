"""The only place that builds Redis clients.

A node holds two clients to the same server or cluster:

- `cmd`: commands and scripts, strings decoded (short timeouts, retried,
  because every write chatd makes is idempotent).
- `reader`: blocking stream reads, raw bytes so message frames go to sockets
  without a decode/encode round, with a socket timeout above the block time
  (a blocking XREADGROUP must not be cut by its own client: redis-py #2807).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from chatd.config import ConfigError, Settings, redact_url

log = logging.getLogger("chatd.redis")



@dataclass
class RedisConn:
    cmd: Any  # Redis | RedisCluster: their command mixins are typed apart, so Any
    reader: Any
    is_cluster: bool

    async def close(self) -> None:
        await self.cmd.aclose()
        await self.reader.aclose()


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.25, base=0.02), retries=2)


def _standalone(url: str, settings: Settings, *, decode: bool, read_timeout: float) -> Redis:
    return Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=read_timeout,
        socket_connect_timeout=settings.redis.connect_timeout_s,
        max_connections=settings.redis.max_connections,
        health_check_interval=0,
        retry=_retry(),
    )


def _cluster(settings: Settings, *, decode: bool, read_timeout: float) -> RedisCluster:
    nodes = []
    for item in settings.redis.cluster_nodes:
        host, _, port = item.rpartition(":")
        nodes.append(ClusterNode(host, int(port)))
    return RedisCluster(
        startup_nodes=nodes,
        decode_responses=decode,
        socket_timeout=read_timeout,
        socket_connect_timeout=settings.redis.connect_timeout_s,
        max_connections=settings.redis.max_connections,
        retry=_retry(),
    )


def build(settings: Settings, url: str) -> RedisConn:
    """Build the clients; `url` is the resolved standalone URL (embedded or configured)."""
    block_s = settings.fanout.block_ms / 1000
    read_timeout = block_s + settings.redis.socket_timeout_s
    if settings.redis.cluster_nodes:
        return RedisConn(
            cmd=_cluster(settings, decode=True, read_timeout=settings.redis.socket_timeout_s),
            reader=_cluster(settings, decode=False, read_timeout=read_timeout),
            is_cluster=True,
        )
    return RedisConn(
        cmd=_standalone(url, settings, decode=True, read_timeout=settings.redis.socket_timeout_s),
        reader=_standalone(url, settings, decode=False, read_timeout=read_timeout),
        is_cluster=False,
    )


async def connect(settings: Settings, url: str) -> RedisConn:
    """Connect patiently, then fail with one clear ConfigError line (exit 2)."""
    target = ",".join(settings.redis.cluster_nodes) or redact_url(url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.redis.startup_timeout_s
    attempt = 0
    while True:
        attempt += 1
        conn = build(settings, url)
        try:
            await conn.cmd.ping()
            await conn.reader.ping()
            await _check_version(conn)
            return conn
        except (RedisError, OSError) as e:
            await conn.close()
            if loop.time() >= deadline:
                raise ConfigError(f"cannot reach Redis at {target}: {e}") from None
            log.warning("redis not reachable yet", extra={"target": target, "attempt": attempt,
                                                          "error": str(e)})
            await asyncio.sleep(min(0.2 * attempt, 1.0))


async def _check_version(conn: RedisConn) -> None:
    cmd = conn.cmd
    targets = cmd.get_primaries() if conn.is_cluster else [None]
    for target in targets:
        info = await (cmd.info("server", target_nodes=target) if target else cmd.info("server"))
        version = str(info.get("redis_version", "0"))
        if int(version.split(".")[0]) < 7:
            raise ConfigError(f"Redis {version} is too old: chatd needs Redis or Valkey 7+")
