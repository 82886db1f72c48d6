"""No acked message is lost when the embedded Valkey dies (docs/durability.md).

chatd runs with its embedded Valkey (no Redis URL) and `embedded.appendfsync`. Under
traffic the valkey-server child is SIGKILLed (found through its pid file
`<data_dir>/valkey/chatd-valkey.pid`): no shutdown, no final fsync.

1. chatd notices, starts the server again on the same AOF by itself, and serves again
   with no restart: sends acked again within a bound, connected readers get every
   acked message in order (after de-dup by seq), the log holds every acked message.
2. The server is SIGKILLed again, and chatd with it right after (so nobody fsyncs or
   restarts anything); chatd is started again on the same data dir: every message
   acked in either round is in the log at its acked seq.

A process kill keeps what the server had write()n to the AOF, which Valkey does
before it replies in every appendfsync mode; what `always` adds (fsync before the
reply) only matters when the machine itself goes down, which a test cannot do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from chatd.embedded import PID_FILE, EmbeddedValkey
from tests.client import FAST_ENV, Api, User, Ws, connect
from tests.cluster.support import LOAD_ENV, history, send
from tests.harness import ChatdNode, ChatdNodes
from tests.scaleout.test_redis_outage import seqs_of

RECOVERY_BOUND_S = 10.0


def valkey_pid(node: ChatdNode) -> int:
    return int((node.data_dir / "valkey" / PID_FILE).read_text().strip())


async def stream(ws: Ws, room: str, prefix: str, acks: dict[str, int],
                 stop: asyncio.Event, errors: list[float]) -> None:
    """Send until `stop`, retrying each client_msg_id while `unavailable`."""
    k = 0
    while not stop.is_set():
        cmid = f"{prefix}{k:05d}"
        while not stop.is_set():
            try:
                reply = await send(ws, room, cmid, timeout=20)
            except (AssertionError, ConnectionError):
                return  # the connection died with its node (round 2)
            if reply["type"] == "ack":
                acks[cmid] = reply["seq"]
                break
            assert reply["code"] == "unavailable", reply
            errors.append(time.monotonic())
            await asyncio.sleep(0.02)
        k += 1
        await asyncio.sleep(0.003)


@pytest.mark.parametrize("appendfsync", ["always", "everysec", "no"])
async def test_acked_messages_survive_sigkill_of_the_embedded_valkey(
        chatd_nodes: ChatdNodes, appendfsync: str) -> None:
    (node,) = await chatd_nodes.start(1, redis_url="embedded", env=FAST_ENV | LOAD_ENV | {
        "CHATD_EMBEDDED__APPENDFSYNC": appendfsync})
    chatd_nodes.report_log_problems = False  # the kills are on purpose
    socket = EmbeddedValkey(Path(node.data_dir)).socket_path
    async with aioredis.Redis(unix_socket_path=str(socket), decode_responses=True) as r:
        assert (await r.config_get("appendfsync"))["appendfsync"] == appendfsync
        assert (await r.config_get("appendonly"))["appendonly"] == "yes"
    async with aiohttp.ClientSession() as http:
        (alice, *readers), room = await Api(http, node.url).group_of(3, name="durable")
        sender = await connect(http, node.ws_url, alice)
        reader_ws = [await connect(http, node.ws_url, u) for u in readers]
        acks: dict[str, int] = {}

        # --- 1: the server is killed; chatd restarts it and carries on.
        errors: list[float] = []
        stop = asyncio.Event()
        streamer = asyncio.create_task(stream(sender, room, "a", acks, stop, errors))
        await asyncio.sleep(0.7)
        old_pid = valkey_pid(node)
        acked_before = len(acks)
        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + RECOVERY_BOUND_S
        while len(acks) <= acked_before + 20 or not errors:
            assert not streamer.done(), streamer.result()
            assert time.monotonic() < deadline, (
                f"not serving again {RECOVERY_BOUND_S}s after the kill: {len(acks)} acks, "
                f"{len(errors)} refusals")
            await asyncio.sleep(0.05)
        recovered_s = time.monotonic() - killed_at
        stop.set()
        await streamer
        assert valkey_pid(node) != old_pid and node.running and node.starts == 1
        await node.wait_ready(timeout=5)
        expected = sorted(acks.values())
        assert expected == list(range(1, len(expected) + 1))
        for ws in (sender, *reader_ws):
            await ws.wait_for(lambda f, ws=ws: len(seqs_of(ws, room)) >= len(expected),
                              timeout=20)
            assert seqs_of(ws, room) == expected
            assert ws.closed_code is None
        await check_log(http, node, readers[0], room, acks)
        round1 = len(acks)

        # --- 2: the server is killed, and chatd right after it; then chatd starts again.
        stop = asyncio.Event()
        streamer = asyncio.create_task(stream(sender, room, "b", acks, stop, errors))
        await asyncio.sleep(0.7)
        os.kill(valkey_pid(node), signal.SIGKILL)
        node.kill()
        stop.set()
        await streamer
        assert len(acks) > round1
        await node.start()
        await check_log(http, node, readers[0], room, acks)
        print(f"\nembedded appendfsync={appendfsync}: valkey SIGKILLed under traffic, "
              f"serving again {recovered_s:.2f}s later with no chatd restart "
              f"({len(errors)} sends refused meanwhile); then valkey and chatd SIGKILLed: "
              f"all {len(acks)} acked messages in the log after the restart")


async def check_log(http: aiohttp.ClientSession, node: ChatdNode, user: User, room: str,
                    acks: dict[str, int]) -> None:
    log = await history(http, node.url, user, room)
    stored = {m["client_msg_id"]: m["seq"] for m in log}
    missing = {c: s for c, s in acks.items() if stored.get(c) != s}
    assert missing == {}, f"{len(missing)} acked messages lost, e.g. {list(missing)[:5]}"
    assert [m["seq"] for m in log] == list(range(1, len(log) + 1))
