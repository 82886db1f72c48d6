"""The only place that builds Redis clients.

A node holds these clients to the same server or cluster:

- `cmd` (redis-py): commands and scripts, strings decoded (short timeouts,
  retried, because every write chatd makes is idempotent).
- `raw`: reads of the room logs, raw bytes so stored message frames go to
  sockets without a decode/encode round (retried, like `cmd`).
- `reader`: blocking inbox reads (XREADGROUP), raw bytes, with a timeout
  above the block time (a blocking read must not be cut by its own client:
  redis-py #2807) and **no retries**: XREADGROUP moves the group past entries
  when Redis sends the reply, so a reply lost with its connection must surface
  as an error, after which the consumer catches up from its own cursor. A
  silent retry would read only new entries and strand those.

On a standalone server what runs per message goes through pipelined
connections instead (`multiplex.py`: a fraction of redis-py's CPU per call):
`raw`, `reader`, and `mux` (decoded) for scripts and for the commands every
connect and every authenticated request makes (`execute`, `execute_many`).
On a cluster `raw` and `reader` are redis-py clients, which route by slot,
and there is no `mux`.

On a cluster, `master_client(host, port)` also hands out plain clients to one
master, for the one thing the cluster client cannot do: run a script and a
`WAIT` on the same connection (`durability.replicas`, see scripts.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from chatd.config import ConfigError, Settings, redact_url
from chatd.multiplex import Arg, Multiplexed, entries

log = logging.getLogger("chatd.redis")

_RETRIES = 2



@dataclass
class RedisConn:
    cmd: Any  # Redis | RedisCluster: their command mixins are typed apart, so Any
    raw: Any  # RedisCluster | Multiplexed
    reader: Any
    is_cluster: bool
    mux: Multiplexed | None = None  # standalone only
    settings: Settings | None = None
    masters: dict[str, Redis] = field(default_factory=dict)

    async def log_range(self, key: str, start: str, end: str, count: int, *,
                        reverse: bool = False) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """XRANGE (or XREVRANGE from `start` down to `end`) of a room log, raw bytes."""
        if self.is_cluster:
            if reverse:
                return list(await self.raw.xrevrange(key, start, end, count=count))
            return list(await self.raw.xrange(key, start, end, count=count))
        return entries(await self.raw.execute("XREVRANGE" if reverse else "XRANGE",
                                              key, start, end, "COUNT", count))

    async def execute(self, *args: Arg) -> Any:
        """One command that is safe to run twice, its reply decoded (see `execute_many`)."""
        if self.mux is None:
            return await self.cmd.execute_command(*args)
        return await self.mux.execute(*args)

    async def execute_many(self, commands: Sequence[Sequence[Arg]]) -> list[Any]:
        """Commands that are safe to run twice, sent together; their replies decoded, in
        order. Replies are as Redis sends them on a standalone server (a set's members
        as a list, HEXISTS as 0 or 1), while the cluster client shapes some (a set, a
        bool): callers rely only on what both shapes share."""
        if not commands:
            return []
        if self.mux is None:
            async with self.cmd.pipeline(transaction=False) as pipe:
                for args in commands:
                    pipe.execute_command(*args)
                return list(await pipe.execute())
        return await self.mux.pipeline(commands)

    def master_client(self, host: str, port: int) -> Redis:
        """A plain client (own pool, no retries: the caller re-routes) to one cluster
        master, made on first use and kept until `close`."""
        name = f"{host}:{port}"
        client = self.masters.get(name)
        if client is None:
            assert self.settings is not None
            netloc = f"[{host}]:{port}" if ":" in host else name  # an IPv6 address
            client = self.masters[name] = _standalone(
                f"redis://{netloc}/0", self.settings, decode=True,
                read_timeout=_cmd_timeout(self.settings), retries=0)
        return client

    async def close(self) -> None:
        for client in (self.cmd, *self.masters.values()):
            await client.aclose()
        for client in (self.raw, self.reader, self.mux):
            if isinstance(client, Multiplexed):
                await client.close()
            elif client is not None:
                await client.aclose()

    async def ping(self) -> None:
        await self.cmd.ping()
        if self.is_cluster:
            await self.raw.ping()
            await self.reader.ping()
            return
        for client in (self.raw, self.reader, self.mux):
            assert isinstance(client, Multiplexed)
            await client.execute("PING")


def storage_failure(e: BaseException) -> bool:
    """An error meaning Redis could not be reached or answer (the caller answers
    `unavailable`), rather than a bug of chatd's."""
    return isinstance(e, RedisError | OSError) or write_race_in_redis_py(e)


def write_race_in_redis_py(e: BaseException) -> bool:
    """An AttributeError or TypeError raised inside redis-py: its asyncio connections
    fail that way, instead of with ConnectionError, when their writer is cleared under
    a command (redis-py #4287; the cluster client closes connections under commands in
    flight during a failover). Nothing was answered: a lost connection. The same types
    raised anywhere else are bugs, and must surface."""
    if not isinstance(e, AttributeError | TypeError):
        return False
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("redis.")


def _retry(retries: int) -> Retry:
    return Retry(ExponentialBackoff(cap=0.25, base=0.02), retries=retries)


def _standalone(url: str, settings: Settings, *, decode: bool, read_timeout: float,
                retries: int) -> Redis:
    # A blocking pool queues callers past max_connections instead of failing them.
    pool = BlockingConnectionPool.from_url(
        url,
        decode_responses=decode,
        socket_timeout=read_timeout,
        socket_connect_timeout=settings.redis.connect_timeout_s,
        max_connections=settings.redis.max_connections,
        timeout=settings.redis.socket_timeout_s,
        health_check_interval=0,
        retry=_retry(retries),
    )
    return Redis.from_pool(pool)


def _cluster(settings: Settings, *, decode: bool, read_timeout: float,
             retries: int) -> RedisCluster:
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
        retry=_retry(retries),
    )


def _cmd_timeout(settings: Settings) -> float:
    """Read timeout of the command client: a `WAIT` (durability.replicas) may block for
    wait_timeout_ms on top of the usual reply time, and must not be cut short by it."""
    extra = settings.durability.wait_timeout_ms / 1000 if settings.durability.replicas else 0
    return settings.redis.socket_timeout_s + extra


def build(settings: Settings, url: str) -> RedisConn:
    """Build the clients; `url` is the resolved standalone URL (embedded or configured)."""
    block_s = settings.fanout.block_ms / 1000
    timeout = settings.redis.socket_timeout_s
    if settings.redis.cluster_nodes:
        return RedisConn(
            cmd=_cluster(settings, decode=True, read_timeout=_cmd_timeout(settings),
                         retries=_RETRIES),
            raw=_cluster(settings, decode=False, read_timeout=timeout, retries=_RETRIES),
            reader=_cluster(settings, decode=False, read_timeout=block_s + timeout, retries=0),
            is_cluster=True, settings=settings)
    mux = functools.partial(Multiplexed, url, connect_timeout_s=settings.redis.connect_timeout_s,
                            timeout_s=timeout)
    return RedisConn(
        cmd=_standalone(url, settings, decode=True, read_timeout=_cmd_timeout(settings),
                        retries=_RETRIES),
        raw=mux(decode=False, retries=_RETRIES),
        reader=mux(decode=False),  # the block time is added per read
        mux=mux(decode=True, retries=_RETRIES),
        is_cluster=False, settings=settings)


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
            await conn.ping()
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
