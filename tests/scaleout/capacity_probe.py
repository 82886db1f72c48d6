"""Small, bounded measurements behind the capacity model in docs/scaling.md.

    python -m tests.scaleout.capacity_probe            # about a minute

Not a test (pytest does not collect it) and not the benchmark (bench/ is): it
measures what the benchmark does not report, on loopback with the test harness:

1. Redis memory per stored message: one chatd node on a private Valkey, N messages
   of a 64-character body into one room; INFO used_memory before and after, then
   again after deleting the idempotency keys (they expire after
   limits.idempotency_ttl_s, 24 h by default), and MEMORY USAGE of the room's log.
2. Redis memory per connected user: M users each open one WebSocket; used_memory
   before and after (presence and the node's user set; the sessions are counted
   apart, they exist with or without a connection).
3. The cost of appendfsync: one chatd with its embedded Valkey per mode, 8
   concurrent senders keeping 32 sends in flight each for a few seconds; acked sends
   per second.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.client import FAST_ENV, Api, Ws, connect
from tests.cluster.support import LOAD_ENV
from tests.harness import ChatdNodes, ValkeyProcess, find_valkey_binaries

BODY = "x" * 64


async def used_memory(valkey: ValkeyProcess) -> int:
    async with valkey.client() as r:
        await r.execute_command("MEMORY", "PURGE")  # type: ignore[no-untyped-call]
        return int((await r.info("memory"))["used_memory"])


async def pump(ws: Ws, room: str, prefix: str, count: int, window: int) -> float:
    """Send `count` messages with at most `window` unacked; returns seconds taken."""
    sent = acked = 0
    started = time.monotonic()
    seen = 0
    while acked < count:
        while sent < count and sent - acked < window:
            await ws.send({"type": "send", "id": f"{prefix}{sent}", "room_id": room,
                           "client_msg_id": f"{prefix}{sent}", "body": BODY})
            sent += 1
        await ws.wait_for(lambda f, seen=seen: len(ws.frames) > seen, timeout=30)
        for f in ws.frames[seen:]:
            if f.get("type") == "ack":
                acked += 1
            elif f.get("type") == "error":
                raise RuntimeError(f"send refused: {f}")
        seen = len(ws.frames)
    return time.monotonic() - started


async def memory_figures(base: Path, messages: int = 5000, users: int = 500) -> dict[str, Any]:
    valkey = ValkeyProcess(find_valkey_binaries(), base / "valkey")
    nodes = ChatdNodes(base / "chatd")
    try:
        await valkey.start()
        (node,) = await nodes.start(1, redis_url=valkey, env=FAST_ENV | LOAD_ENV)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            api = Api(http, node.url)
            alice, bob = await api.register(), await api.register()
            room = await api.group(alice, [bob])
            ws = await connect(http, node.ws_url, alice)
            await pump(ws, room, "warm", 100, 32)
            await asyncio.sleep(0.5)
            before = await used_memory(valkey)
            await pump(ws, room, "m", messages, 32)
            await asyncio.sleep(1.0)  # inbox entries handled and deleted
            after = await used_memory(valkey)
            async with valkey.client() as r:
                [log_key] = [k async for k in r.scan_iter(match="*:log", count=1000)]
                log_bytes = int(await r.memory_usage(log_key, samples=0))
                idem = [k async for k in r.scan_iter(match="*:idem:*", count=1000)]
                idem_sample = [int(await r.memory_usage(k)) for k in idem[:200]]
                await r.delete(*idem)
            without_idem = await used_memory(valkey)
            await ws.close()

            people = [await api.register() for _ in range(users)]
            mem_users = await used_memory(valkey)
            conns = []
            for u in people:
                conns.append(await connect(http, node.ws_url, u))
            await asyncio.sleep(1.0)
            mem_conns = await used_memory(valkey)
            for c in conns:
                await c.close()
        return {
            "messages": messages,
            "bytes_per_message_total": round((after - before) / messages),
            # `before` held the warm-up's 100 idempotency keys, deleted with the rest.
            "bytes_per_message_without_idempotency_key": round(
                (without_idem - before + 100 * statistics.median(idem_sample)) / messages),
            "log_bytes_per_message": round(log_bytes / (messages + 100)),
            "idempotency_key_bytes_median": statistics.median(idem_sample),
            "users_connected": users,
            "bytes_per_connected_user": round((mem_conns - mem_users) / users),
        }
    finally:
        await nodes.close()
        valkey.close()


async def fsync_figures(base: Path, seconds: float = 4.0) -> dict[str, float]:
    out = {}
    for mode in ("always", "everysec", "no"):
        nodes = ChatdNodes(base / f"fsync-{mode}")
        try:
            (node,) = await nodes.start(1, redis_url="embedded", env=FAST_ENV | LOAD_ENV | {
                "CHATD_EMBEDDED__APPENDFSYNC": mode})
            async with aiohttp.ClientSession() as http:
                api = Api(http, node.url)
                senders = [await api.register() for _ in range(8)]
                room = await api.group(senders[0], senders[1:])
                sockets = [await connect(http, node.ws_url, u) for u in senders]
                await asyncio.gather(*(pump(ws, room, f"w{i}-", 50, 32)
                                       for i, ws in enumerate(sockets)))
                per_sender = 2000
                started = time.monotonic()
                await asyncio.gather(*(pump(ws, room, f"s{i}-", per_sender, 32)
                                       for i, ws in enumerate(sockets)))
                took = time.monotonic() - started
                out[mode] = round(per_sender * len(sockets) / took)
                for ws in sockets:
                    await ws.close()
        finally:
            await nodes.close()
    return out


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="chatd-capacity-") as tmp:
        base = Path(tmp)
        memory = await memory_figures(base / "memory")
        print(json.dumps({"memory": memory}, indent=2), flush=True)
        fsync = await fsync_figures(base)
        print(json.dumps({"acked_sends_per_s_by_appendfsync": fsync}, indent=2), flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
