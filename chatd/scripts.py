"""Loads `lua/*.lua` once and runs them by SHA.

redis-py's `register_script` keeps the SHA and reloads the script on NOSCRIPT
(after `SCRIPT FLUSH`, a Redis restart or a cluster failover), so there is no
second fallback here. Domain errors leave Lua as `CHATD_<CODE> message` and
become `ChatError` in this one place.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chatd.errors import ChatError, TooManyConnections
from chatd.metrics import Metrics

_CODES = {
    "CHATD_BAD_REQUEST": "bad_request",
    "CHATD_NOT_FOUND": "not_found",
    "CHATD_FORBIDDEN": "forbidden",
    "CHATD_CONFLICT": "conflict",
    "CHATD_TOO_LARGE": "too_large",
}


def sources() -> dict[str, str]:
    """Script name (file stem) -> Lua source with the `_*.lua` libraries prepended."""
    folder = resources.files("chatd") / "lua"
    files = sorted((e.name, e.read_text(encoding="utf-8")) for e in folder.iterdir()
                   if e.name.endswith(".lua"))
    lib = "\n".join(text for name, text in files if name.startswith("_"))
    return {name.removesuffix(".lua"): f"{lib}\n{text}"
            for name, text in files if not name.startswith("_")}


class Scripts:
    def __init__(self, client: Any, metrics: Metrics) -> None:
        self._client = client
        self._metrics = metrics
        self._scripts = {name: client.register_script(src) for name, src in sources().items()}

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
            if not replicas:
                return await self._scripts[name](keys=keys, args=args)
            async with self._client.pipeline(transaction=False) as pipe:
                await self._scripts[name](keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", replicas, wait_ms)
                return await pipe.execute()
        except ResponseError as e:
            raise to_chat_error(e) from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise ChatError("unavailable", "storage is unavailable, retry later") from e
        finally:
            self._metrics.redis_latency.labels(name).observe(time.perf_counter() - started)


def to_chat_error(e: RedisError) -> Exception:
    text = str(e)
    head, _, rest = text.partition(" ")
    if head == "CHATD_TOO_MANY":
        return TooManyConnections(rest)
    code = _CODES.get(head)
    if code is None:
        return e
    return ChatError(code, rest or code)  # type: ignore[arg-type]
