"""Room order under concurrent load across nodes (PROTOCOL.md s3, Guarantees 1 and 2).

20 senders, spread over 3 nodes, each pipeline 200 sends into one group room at
once. Every member connection on every node (the senders' own and one pure
listener per node) must see seq 1..4000 exactly once and in order, and each
sender's messages must appear in the order it sent them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from tests.client import FAST_ENV, Api, Ws, connect
from tests.conftest import RedisBackend
from tests.harness import ChatdNodes

log = logging.getLogger(__name__)

SENDERS = 20
PER_SENDER = 200
TOTAL = SENDERS * PER_SENDER

LOAD_ENV = FAST_ENV | {
    "CHATD_LIMITS__SEND_RATE_PER_S": "100000",
    "CHATD_LIMITS__SEND_BURST": "100000",
    "CHATD_LIMITS__FRAME_RATE_PER_S": "100000",
    "CHATD_LIMITS__FRAME_BURST": "100000",
}


class Counter:
    """Incremental view of one connection's frames (Ws.wait_messages rescans: O(n^2))."""

    def __init__(self, ws: Ws, room_id: str) -> None:
        self.ws = ws
        self.room_id = room_id
        self.seen = 0
        self.messages: list[dict[str, Any]] = []
        self.acks: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []

    def update(self) -> None:
        frames = self.ws.frames
        for frame in frames[self.seen:]:
            kind = frame.get("type")
            if kind == "message" and frame["room_id"] == self.room_id:
                self.messages.append(frame)
            elif kind == "ack":
                self.acks[frame["id"]] = frame
            elif kind == "error":
                self.errors.append(frame)
        self.seen = len(frames)


async def wait_until(check: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_concurrent_senders_on_three_nodes_all_see_one_order(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    nodes = await chatd_nodes.start(3, **redis_backend.chatd_args, env=LOAD_ENV)
    async with aiohttp.ClientSession() as http:
        api = Api(http, nodes[0].url)
        owner = await api.register()
        senders = list(await asyncio.gather(*(api.register() for _ in range(SENDERS))))
        listeners = list(await asyncio.gather(*(api.register() for _ in nodes)))
        room = await api.group(owner, senders + listeners, name="ordering")

        sender_ws = list(await asyncio.gather(*(
            connect(http, nodes[i % len(nodes)].ws_url, user) for i, user in enumerate(senders))))
        listener_ws = list(await asyncio.gather(*(
            connect(http, node.ws_url, user) for node, user in zip(nodes, listeners, strict=True))))
        all_ws = sender_ws + listener_ws
        counters = [Counter(ws, room) for ws in all_ws]
        # Each node's welcome names the node: the senders really are spread over all three.
        assert {ws.of_type("welcome")[0]["node_id"] for ws in sender_ws} == {
            n.node_id for n in nodes}
        assert {ws.of_type("welcome")[0]["node_id"] for ws in listener_ws} == {
            n.node_id for n in nodes}

        def cmid(i: int, k: int) -> str:
            return f"s{i:02d}-{k:04d}"

        async def pump(i: int, ws: Ws) -> None:
            for k in range(PER_SENDER):
                await ws.send({"type": "send", "id": f"r{i}-{k}", "room_id": room,
                               "client_msg_id": cmid(i, k), "body": f"sender {i} message {k}"})

        started = time.monotonic()
        await asyncio.gather(*(pump(i, ws) for i, ws in enumerate(sender_ws)))
        sent_s = time.monotonic() - started

        def all_acked() -> bool:
            for c in counters[:SENDERS]:
                c.update()
                assert not c.errors, f"send errors: {c.errors[:3]}"
            return all(len(c.acks) == PER_SENDER for c in counters[:SENDERS])

        await wait_until(all_acked, 45, "every send to be acked")
        acked_s = time.monotonic() - started

        def all_delivered() -> bool:
            for c in counters:
                c.update()
                assert c.ws.closed_code is None, f"a member connection closed: {c.ws.closed_code}"
            return all(len(c.messages) >= TOTAL for c in counters)

        await wait_until(all_delivered, 45, f"{TOTAL} messages on every member connection")
        delivered_s = time.monotonic() - started
        await asyncio.sleep(0.3)  # anything extra (a duplicate) would show up now
        for c in counters:
            c.update()

        # Acks: each sender's seqs rise in the order it sent, none is a duplicate.
        seq_of: dict[str, int] = {}
        for i, c in enumerate(counters[:SENDERS]):
            acks = [c.acks[f"r{i}-{k}"] for k in range(PER_SENDER)]
            assert [a["client_msg_id"] for a in acks] == [cmid(i, k) for k in range(PER_SENDER)]
            assert not any(a["duplicate"] for a in acks)
            seqs = [a["seq"] for a in acks]
            assert seqs == sorted(seqs) and len(set(seqs)) == PER_SENDER, f"sender {i}: {seqs}"
            seq_of.update({a["client_msg_id"]: a["seq"] for a in acks})
        assert sorted(seq_of.values()) == list(range(1, TOTAL + 1))

        expected = list(range(1, TOTAL + 1))
        reference = {m["seq"]: m for m in counters[-1].messages}
        for n, c in enumerate(counters):
            got = [m["seq"] for m in c.messages]
            pairs = enumerate(zip(got, expected, strict=False))
            assert got == expected, (
                f"connection {n}: {len(got)} messages, first disorder at index "
                f"{next((j for j, (x, y) in pairs if x != y), None)}")
            # Every connection sees the same message under each seq, and it matches the ack.
            for m in c.messages:
                assert m["client_msg_id"] == reference[m["seq"]]["client_msg_id"]
                assert seq_of[m["client_msg_id"]] == m["seq"]
        # Per sender, its messages appear in the order it sent them.
        by_id = {s.user_id: i for i, s in enumerate(senders)}
        for i in range(SENDERS):
            mine = [m["client_msg_id"] for m in counters[-1].messages
                    if by_id.get(m["sender_id"]) == i]
            assert mine == [cmid(i, k) for k in range(PER_SENDER)]

        rate = TOTAL / delivered_s
        print(f"\nordering: {TOTAL} messages from {SENDERS} senders on {len(nodes)} nodes; "
              f"sent in {sent_s:.2f}s, all acked at {acked_s:.2f}s, delivered to "
              f"{len(counters)} connections at {delivered_s:.2f}s: {rate:.0f} msg/s stored, "
              f"{rate * len(counters):.0f} frames/s delivered")
        assert delivered_s < 60
        for ws in all_ws:
            await ws.close()
