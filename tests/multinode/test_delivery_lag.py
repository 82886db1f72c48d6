"""`chatd_delivery_lag_seconds` shows a node that fell behind (docs/protocol.md, Operations).

Two nodes on one Valkey; alice on node A, bob on node B. Node B is stopped (SIGSTOP) for
1.5 s while alice sends: A stores and acks, the messages wait in B's inbox. Once B runs
again, bob gets them all, and B's histogram has an observation above 1 s while A's, which
never fell behind, has none.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp

from tests.client import FAST_ENV, Api, connect_all, metric
from tests.harness import ChatdNode, ChatdNodes, ValkeyProcess

STOP_S = 1.5


async def slower_than_1s(http: aiohttp.ClientSession, node: ChatdNode) -> tuple[float, float]:
    """(observations over 1 s, all observations) of the node's delivery lag."""
    total = await metric(http, node.url, "chatd_delivery_lag_seconds_count")
    within = await metric(http, node.url, "chatd_delivery_lag_seconds_bucket", {"le": "1.0"})
    return total - within, total


async def test_a_node_that_fell_behind_shows_it(valkey: ValkeyProcess,
                                                chatd_nodes: ChatdNodes) -> None:
    a, b = await chatd_nodes.start(2, redis_url=valkey, env=FAST_ENV)
    async with aiohttp.ClientSession() as http:
        api = Api(http, a.url)
        alice, bob = await api.users(2)
        room = await api.direct(alice, bob)
        alice_ws, bob_ws = await connect_all(http, (a, alice), (b, bob))
        assert b.pid is not None
        os.kill(b.pid, signal.SIGSTOP)
        try:
            for i in range(3):
                ack = await alice_ws.send_message(room, f"while B is stopped {i}")
                assert ack["type"] == "ack", ack
            await asyncio.sleep(STOP_S)
        finally:
            os.kill(b.pid, signal.SIGCONT)
        got = await bob_ws.wait_messages(room, 3)
        assert [m["seq"] for m in got] == [1, 2, 3]
        late_b, reads_b = await slower_than_1s(http, b)
        late_a, reads_a = await slower_than_1s(http, a)
        assert late_b >= 1 and reads_b >= late_b, (late_b, reads_b)
        assert late_a == 0 and reads_a >= 1, (late_a, reads_a)
        await alice_ws.close()
        await bob_ws.close()
