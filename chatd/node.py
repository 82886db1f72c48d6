"""The state one chatd node shares between its handlers: settings, Redis, scripts, loops."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from redis.exceptions import RedisError

from chatd import keys
from chatd.capacity import Sockets, cap_for
from chatd.config import ConfigError, Settings
from chatd.errors import ChatError
from chatd.gcfreeze import FreezeSurvivors
from chatd.logs import error_text
from chatd.loops import Loop
from chatd.metrics import Metrics
from chatd.redisconn import RedisConn
from chatd.scripts import Scripts

log = logging.getLogger("chatd.node")


@dataclass
class Node:
    settings: Settings
    node_id: str
    redis: RedisConn
    scripts: Scripts
    metrics: Metrics
    secret: str = ""
    loops: list[Loop] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    usernames: dict[str, str] = field(default_factory=dict)  # immutable, so cacheable
    redis_ok: bool = True
    draining: bool = False
    survivors: FreezeSurvivors = field(default_factory=FreezeSurvivors)
    sockets: Sockets = field(default_factory=lambda: Sockets(cap_for(0)))
    # Redis' clock minus ours, from the last heartbeat (off by at most its round trip).
    # Stream ids, message `ts` and session expiry are on Redis' clock, and nodes may
    # run on hosts whose clocks differ from the Redis host's.
    clock_offset_ms: float = 0.0

    @property
    def partitions(self) -> int:
        return self.settings.redis.partitions

    def inbox_prefix(self, p: int) -> str:
        """Where the scripts fan out the events of partition p's rooms (keys.inbox_partition)."""
        return keys.inbox_prefix(keys.inbox_partition(p, cluster=self.redis.is_cluster))

    def inboxes(self) -> list[str]:
        """This node's room inboxes."""
        cluster = self.redis.is_cluster
        return sorted({keys.inbox(keys.inbox_partition(p, cluster=cluster), self.node_id)
                       for p in range(self.partitions)})

    def redis_time_ms(self) -> float:
        """Now, on Redis' clock."""
        return time.time() * 1000 + self.clock_offset_ms

    def monotonic_at(self, redis_ms: float) -> float:
        """The `time.monotonic()` reading at which Redis' clock will read `redis_ms`."""
        return time.monotonic() + (redis_ms - self.redis_time_ms()) / 1000

    def ready(self) -> bool:
        return (not self.draining and self.redis_ok
                and all(loop.running and loop.healthy for loop in self.loops))

    def add_loop(self, loop: Loop) -> None:
        self.loops.append(loop)
        loop.start()

    async def stop_loops(self) -> None:
        for loop in reversed(self.loops):
            await loop.stop()
        self.loops.clear()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def spawn(self, make: Callable[[], Awaitable[object]], *, retry: bool = False) -> None:
        """Run work in the background, tracked so shutdown cancels it.

        With `retry`, storage failures are retried with capped backoff until the
        work succeeds: for clean-up that must not be lost to a Redis outage.
        """
        task = asyncio.create_task(self._attempts(make, retry))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _attempts(self, make: Callable[[], Awaitable[object]], retry: bool) -> None:
        delay = 0.1
        while True:
            try:
                await make()
                return
            except (ChatError, RedisError, OSError) as e:
                if not retry:
                    log.warning("background work failed", extra={"error": error_text(e)})
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def claim_data_dir(path: Path) -> IO[str]:
    """Hold an exclusive lock on the data dir for the life of the process.

    Two nodes on one data dir would share a node id and fight over the
    embedded server; the lock dies with the process, even on SIGKILL.
    """
    path.mkdir(parents=True, exist_ok=True)
    handle = (path / "chatd.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"data dir {path} is in use by another chatd process") from None
    return handle


def node_id_for(settings: Settings) -> str:
    """The configured id, else one generated once and kept in the data dir."""
    if settings.server.node_id:
        return settings.server.node_id
    path = settings.data_path / "node_id"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    node_id = f"n-{secrets.token_hex(6)}"
    _write_private(path, node_id)
    return node_id


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    path.chmod(0o600)


async def check_meta(node: Node) -> None:
    """Agree with every other node on the partition count and the signing secret.

    The first node to start records both; a later node with another partition
    count would route rooms to the wrong keys, so it refuses to start.
    """
    cmd = node.redis.cmd
    await cmd.hsetnx(keys.META, "partitions", node.partitions)
    recorded = int(await cmd.hget(keys.META, "partitions"))
    if recorded != node.partitions:
        raise ConfigError(f"redis.partitions is {node.partitions} but this Redis was set up "
                          f"with {recorded}; use the same value on every node")
    if node.settings.auth.secret:
        node.secret = node.settings.auth.secret
        return
    await cmd.hsetnx(keys.META, "secret", secrets.token_urlsafe(48))
    node.secret = str(await cmd.hget(keys.META, "secret"))
