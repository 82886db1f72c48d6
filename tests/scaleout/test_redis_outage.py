"""A standalone Redis that goes away under traffic (docs/durability.md, "Redis outages").

Two chatd nodes share one Valkey; a sender streams into a room whose readers sit on
both nodes. The Valkey is then either stopped (SIGTERM: the port closes, connects are
refused) or frozen (SIGSTOP: connects succeed, replies never come, which is what a
hung or partitioned server looks like), and later brought back. Checked:

- while it is away: both nodes' /readyz answer 503 within a bound, every send is
  answered `unavailable` within a bound derived from redis.socket_timeout_s and the
  retries (measured and printed), and every WebSocket stays open;
- after it is back, with no chatd restart: /readyz 200, sends acked again, and every
  connected reader has every acked message, once (after de-dup by seq) and in order;
  the log holds each acked message at its acked seq.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.client import FAST_ENV, Api, Ws, connect
from tests.cluster.support import LOAD_ENV, history, send
from tests.harness import ChatdNode, ChatdNodes, ValkeyProcess

SOCKET_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 0.5
RETRIES = 2  # chatd.redisconn._RETRIES: each command is tried 1 + RETRIES times
ENV = FAST_ENV | LOAD_ENV | {
    "CHATD_REDIS__SOCKET_TIMEOUT_S": str(SOCKET_TIMEOUT_S),
    "CHATD_REDIS__CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S),
}
# A send is a token-bucket script, then the send script; either failing ends it. Each
# Redis call: (1 + RETRIES) attempts of at most connect + read timeout, a backoff
# capped at 0.25 s between them, and at most one pool wait of socket_timeout_s.
SEND_BOUND_S = (1 + RETRIES) * (SOCKET_TIMEOUT_S + CONNECT_TIMEOUT_S) + RETRIES * 0.25 \
    + SOCKET_TIMEOUT_S + 1.0  # + 1 s of slack for a busy test machine
READY_BOUND_S = 1.0 + SEND_BOUND_S  # the probe runs every second and takes one call
OUTAGE_S = 3.0


async def readyz(http: aiohttp.ClientSession, node: ChatdNode) -> int:
    async with http.get(f"{node.url}/readyz") as r:
        return r.status


async def wait_status(http: aiohttp.ClientSession, nodes: list[ChatdNode], status: int,
                      within_s: float) -> float:
    started = time.monotonic()
    while not all([await readyz(http, n) == status for n in nodes]):
        assert time.monotonic() - started < within_s, f"/readyz not {status} in {within_s}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def stop_redis(valkey: ValkeyProcess) -> tuple[Callable[[], Awaitable[None]],
                                               Callable[[], Awaitable[None]]]:
    async def down() -> None:
        await valkey.stop()

    async def up() -> None:
        await valkey.start()

    return down, up


def freeze_redis(valkey: ValkeyProcess) -> tuple[Callable[[], Awaitable[None]],
                                                 Callable[[], Awaitable[None]]]:
    async def down() -> None:
        assert valkey.pid is not None
        os.kill(valkey.pid, signal.SIGSTOP)

    async def up() -> None:
        assert valkey.pid is not None
        os.kill(valkey.pid, signal.SIGCONT)

    return down, up


# A Redis away for longer than fanout.node_ttl_s leaves every node's heartbeat stale;
# the janitor must not take that as every other node being dead (which would close
# all their connections with 4009).
SHORT_TTL = {"CHATD_FANOUT__NODE_TTL_S": "1.5", "CHATD_FANOUT__JANITOR_INTERVAL_S": "0.3",
             "CHATD_FANOUT__HEARTBEAT_INTERVAL_S": "0.3"}


@pytest.mark.parametrize(("how", "outage_s", "env"), [
    pytest.param("stopped", OUTAGE_S, {}, id="stopped"),
    pytest.param("frozen", OUTAGE_S + 1, {}, id="frozen"),
    pytest.param("stopped", 4.0, SHORT_TTL, id="stopped-past-node-ttl"),
])
async def test_redis_outage_under_traffic(valkey: ValkeyProcess, chatd_nodes: ChatdNodes,
                                          how: str, outage_s: float,
                                          env: dict[str, str]) -> None:
    a, b = await chatd_nodes.start(2, redis_url=valkey, env=ENV | env)
    chatd_nodes.report_log_problems = False  # the outage is on purpose
    down, up = (stop_redis if how == "stopped" else freeze_redis)(valkey)
    async with aiohttp.ClientSession() as http:
        api = Api(http, a.url)
        (alice, *readers), room = await api.group_of(4, name="outage")
        sender = await connect(http, a.ws_url, alice)
        reader_ws = [await connect(http, (a, b)[i % 2].ws_url, u)
                     for i, u in enumerate(readers)]
        everyone = [sender, *reader_ws]

        acks: dict[str, int] = {}
        failures: list[tuple[float, float]] = []  # (sent at, seconds to `unavailable`)
        phase = {"down_at": None, "up_at": None}
        first_ack_after_up: list[float] = []
        stop = asyncio.Event()

        async def stream() -> None:
            k = 0
            while not stop.is_set():
                cmid = f"m{k:05d}"
                while True:  # retry the same client_msg_id until acked
                    t0 = time.monotonic()
                    reply = await send(sender, room, cmid, timeout=30)
                    if reply["type"] == "ack":
                        acks[cmid] = reply["seq"]
                        if phase["up_at"] is not None and not first_ack_after_up:
                            first_ack_after_up.append(time.monotonic() - phase["up_at"])
                        break
                    assert reply["code"] == "unavailable", reply
                    failures.append((t0, time.monotonic() - t0))
                    await asyncio.sleep(0.02)
                k += 1
                await asyncio.sleep(0.005)

        streamer = asyncio.create_task(stream())
        await asyncio.sleep(0.5)
        assert acks, "traffic flows before the outage"
        await down()
        phase["down_at"] = down_at = time.monotonic()
        try:
            not_ready_after = await wait_status(http, [a, b], 503, READY_BOUND_S)
            # An HTTP send is refused as promptly.
            t0 = time.monotonic()
            status, body = await api.call("POST", f"/api/v1/rooms/{room}/messages",
                                          user=readers[0],
                                          json_body={"client_msg_id": "http-1", "body": "x"})
            http_s = time.monotonic() - t0
            assert status == 503 and body["error"]["code"] == "unavailable", (status, body)
            await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - down_at)))
            for ws in everyone:
                assert ws.closed_code is None, f"closed with {ws.closed_code} during the outage"
            assert not streamer.done(), streamer
        finally:
            await up()
        phase["up_at"] = up_at = time.monotonic()
        ready_after = await wait_status(http, [a, b], 200, 20)
        deadline = time.monotonic() + 20
        while not first_ack_after_up:
            assert not streamer.done(), streamer.result()
            assert time.monotonic() < deadline, "sends never acked again"
            await asyncio.sleep(0.05)
        # Live traffic after the outage, for longer than node_ttl_s when it is short (so
        # a janitor that took the others for dead would have acted by now).
        await asyncio.sleep(3.0 if env else 0.5)
        stop.set()
        await streamer

        # Sends refused because of the outage: their attempt overlapped it.
        during = [took for t, took in failures if t < up_at and t + took > down_at]
        assert during, "no send was tried during the outage"
        assert max(during) < SEND_BOUND_S, (max(during), SEND_BOUND_S)
        assert http_s < SEND_BOUND_S, http_s
        expected = sorted(acks.values())
        assert expected == list(range(1, len(expected) + 1))
        for ws in everyone:
            await ws.wait_for(lambda f, ws=ws: len(seqs_of(ws, room)) >= len(expected),
                              timeout=20)
            seqs = seqs_of(ws, room)
            assert seqs == expected, (len(seqs), len(expected))
            assert ws.closed_code is None
        log = await history(http, b.url, readers[0], room)
        assert {m["client_msg_id"]: m["seq"] for m in log} == acks
        print(f"\nredis {how} for {up_at - down_at:.1f}s: /readyz 503 after "
              f"{not_ready_after:.2f}s; {len(during)} sends refused, slowest after "
              f"{max(during):.2f}s (bound {SEND_BOUND_S:.2f}s), HTTP send {http_s:.2f}s; "
              f"back: /readyz 200 after {ready_after:.2f}s, first ack after "
              f"{first_ack_after_up[0]:.2f}s; {len(acks)} messages acked, all delivered")
        for ws in everyone:
            await ws.close()


def seqs_of(ws: Ws, room: str) -> list[int]:
    """The room's seqs as a client would keep them: duplicates (by seq) dropped."""
    out: list[int] = []
    seen: set[int] = set()
    for m in ws.messages(room):
        if m["seq"] not in seen:
            seen.add(m["seq"])
            out.append(m["seq"])
    return out

