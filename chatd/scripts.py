"""Loads `lua/*.lua` once and runs them by SHA.

redis-py's `register_script` keeps the SHA and reloads the script on NOSCRIPT
(after `SCRIPT FLUSH`, a Redis restart or a cluster failover). On a standalone
server scripts run on the pipelined connection (`multiplex.py`), which does
the same in `_call`: EVALSHA, and EVAL (which caches it again) on NOSCRIPT.
Domain errors leave Lua as `CHATD_<CODE> message` and become `ChatError` in
this one place.

On a Redis Cluster two more things happen here:

- A slot that is being migrated (resharding) or whose master is changing
  (failover) answers TRYAGAIN, ASK, MOVED or CLUSTERDOWN. Each of these means
  the script did **not** run. redis-py follows them for a few tries and then
  gives up ("TTL exhausted"): a multi-key script whose slot is half-migrated
  gets TRYAGAIN until the migration of the slot ends. So a script is tried
  again here, with a short backoff, for up to `settle_s` (the node's
  `redis.socket_timeout_s`), then the caller gets `unavailable` (every chatd
  write is idempotent, so the client's retry is safe).
- `durability.replicas`: `WAIT` counts the replicas that acknowledged the
  writes of *the connection it runs on*, so the script and its `WAIT` must
  share one connection. The cluster client picks a connection per command, so
  on a cluster both are pipelined on a plain connection to the slot's master
  (`RedisConn.master_client`), found from the cluster client's slot map and
  re-routed on MOVED (and sent with ASKING on ASK).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatd.errors import ChatError, TooManyConnections
from chatd.metrics import Metrics
from chatd.multiplex import Multiplexed
from chatd.redisconn import write_race_in_redis_py

_CODES = {
    "CHATD_BAD_REQUEST": "bad_request",
    "CHATD_NOT_FOUND": "not_found",
    "CHATD_FORBIDDEN": "forbidden",
    "CHATD_CONFLICT": "conflict",
    "CHATD_TOO_LARGE": "too_large",
}

# Cluster replies meaning "not run: the slot is moving or its master changing"
# (ClusterError: redis-py gave up following them, "TTL exhausted"). MovedError
# and ClusterDownError are subclasses of AskError and ClusterError.
_UNSETTLED: tuple[type[Exception], ...] = (TryAgainError, AskError, ClusterError,
                                           SlotNotCoveredError)
_MAX_BACKOFF_S = 0.2


def sources() -> dict[str, str]:
    """Script name (file stem) -> Lua source with the `_*.lua` libraries prepended."""
    folder = resources.files("chatd") / "lua"
    files = sorted((e.name, e.read_text(encoding="utf-8")) for e in folder.iterdir()
                   if e.name.endswith(".lua"))
    lib = "\n".join(text for name, text in files if name.startswith("_"))
    return {name.removesuffix(".lua"): f"{lib}\n{text}"
            for name, text in files if not name.startswith("_")}


class Scripts:
    def __init__(self, client: Any, metrics: Metrics, *, settle_s: float = 2.0,
                 master_client: Callable[[str, int], Any] | None = None,
                 mux: Multiplexed | None = None) -> None:
        """`master_client(host, port)`, given on a cluster, returns a plain client to
        one master (for script + WAIT on one connection); `settle_s` bounds the retries
        of a script while its cluster slot is moving. With `mux` (standalone) scripts
        run there, but those followed by a WAIT: it would hold up every other caller."""
        self._client = client
        self._mux = mux
        self._metrics = metrics
        self._settle_s = settle_s
        self._master_client = master_client
        self._scripts = {name: client.register_script(src) for name, src in sources().items()}
        self._latency = {name: metrics.redis_latency.labels(name) for name in self._scripts}

    async def load_all(self) -> None:
        """SCRIPT LOAD everything at start, so a broken script fails the start, not a send."""
        for script in self._scripts.values():
            await self._client.script_load(script.script)

    async def run(self, name: str, keys: Sequence[str], args: Sequence[Any], *,
                  replicas: int = 0, wait_ms: int = 0) -> Any:
        """Run a script; with `replicas`, also WAIT for them on the same connection
        (WAIT covers the writes of the connection it runs on) and return both replies."""
        started = time.perf_counter()
        try:
            return await self._settled(name, keys, args, replicas, wait_ms)
        except _UNSETTLED as e:  # before ResponseError: most of them are ResponseErrors
            raise ChatError("unavailable", "storage is being rebalanced, retry later") from e
        except ResponseError as e:
            raise to_chat_error(e) from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise ChatError("unavailable", "storage is unavailable, retry later") from e
        except RuntimeError as e:
            # redis-py's cluster client can close a pooled connection under a command in
            # flight when it refreshes the topology (failover): uvloop then raises
            # "unable to perform operation on <TCPTransport closed=True ...>". Nothing was
            # answered, so it is a lost connection like any other.
            raise ChatError("unavailable", "storage is unavailable, retry later") from e
        except (AttributeError, TypeError) as e:  # the same race, inside redis-py
            if not write_race_in_redis_py(e):
                raise
            raise ChatError("unavailable", "storage is unavailable, retry later") from e
        finally:
            self._latency[name].observe(time.perf_counter() - started)

    async def _settled(self, name: str, keys: Sequence[str], args: Sequence[Any],
                       replicas: int, wait_ms: int) -> Any:
        """Attempts while the cluster answers "not run, try again" (module docstring)."""
        deadline = time.monotonic() + self._settle_s
        delay = 0.01
        route: tuple[str, int, bool] | None = None  # WAIT path: (host, port, asking)
        while True:
            try:
                if not replicas:
                    return await self._call(name, keys, args)
                if self._master_client is None:
                    return await self._run_and_wait(self._client, name, keys, args,
                                                    replicas, wait_ms, asking=False)
                return await self._on_master(route, name, keys, args, replicas, wait_ms)
            except _UNSETTLED as e:
                if time.monotonic() + delay > deadline:
                    raise
                route = None
                if isinstance(e, AskError) and self._master_client is not None:
                    # MovedError too: go where the slot is (ASKING for a slot in migration).
                    route = (e.host, int(e.port), not isinstance(e, MovedError))
                    if isinstance(e, MovedError):
                        await self._refresh(keys[0])
                    continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_BACKOFF_S)

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        script = self._scripts[name]
        if self._mux is None:
            return await script(keys=keys, args=args)
        try:
            return await self._mux.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except ResponseError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        return await self._mux.execute("EVAL", script.script, len(keys), *keys, *args)

    async def _on_master(self, route: tuple[str, int, bool] | None, name: str,
                         keys: Sequence[str], args: Sequence[Any], replicas: int,
                         wait_ms: int) -> Any:
        """Cluster + WAIT: script and WAIT pipelined on a plain connection to the master
        of the keys' slot (or to where the last MOVED/ASK pointed)."""
        assert self._master_client is not None
        if route is None:
            node = self._client.get_node_from_key(keys[0])
            route = (node.host, int(node.port), False)
        host, port, asking = route
        try:
            return await self._run_and_wait(self._master_client(host, port), name, keys, args,
                                            replicas, wait_ms, asking=asking)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # That master may be gone (failover): let the cluster client find the new
            # one, so the client's retry (same client_msg_id) goes there.
            await self._refresh(keys[0])
            raise

    async def _run_and_wait(self, client: Any, name: str, keys: Sequence[str],
                            args: Sequence[Any], replicas: int, wait_ms: int, *,
                            asking: bool) -> Any:
        async with client.pipeline(transaction=False) as pipe:
            if asking:
                pipe.execute_command("ASKING")
            await self._scripts[name](keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", replicas, wait_ms)
            replies = await pipe.execute()
        return replies[-2:]

    async def _refresh(self, key: str) -> None:
        """Make the cluster client learn who serves `key` now: it follows MOVED and
        rediscovers the cluster after connection errors, updating its slot map."""
        with contextlib.suppress(RedisError, OSError):
            await self._client.exists(key)


def to_chat_error(e: RedisError) -> Exception:
    text = str(e)
    head, _, rest = text.partition(" ")
    if head == "CHATD_TOO_MANY":
        return TooManyConnections(rest)
    if head == "CHATD_RATE_LIMITED":
        return ChatError("rate_limited", "too many messages, retry later",
                         retry_after_ms=int(rest))
    code = _CODES.get(head)
    if code is None:
        return e
    return ChatError(code, rest or code)  # type: ignore[arg-type]
