"""Inbox entries are trimmed once handed to sockets (chatd/broker.py).

Trims wait for a later read (TRIM_EVERY_S), so a node's inbox must still empty
soon after traffic stops, and reads are NOACK: nothing is ever pending. And on
a standalone server the node reads one room inbox, whatever the rooms'
partitions, and keeps inbox reads queued ahead of the one Redis is blocking.
"""

from __future__ import annotations

import asyncio

import aiohttp

from chatd import keys
from chatd.broker import GROUP, READ_AHEAD
from tests.client import FAST_ENV, Api, connect_all
from tests.harness import ChatdNodes, ValkeyProcess

MESSAGES = 40


async def test_inbox_is_emptied_after_a_burst_and_nothing_pends(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=FAST_ENV)
    async with valkey.client() as admin, aiohttp.ClientSession() as http:
        (alice, bob), room = await Api(http, node.url).group_of(2)
        bob_ws, alice_ws = await connect_all(http, (node, bob), (node, alice))
        for i in range(MESSAGES):
            await alice_ws.send_message(room, f"m{i}")
        got = await bob_ws.wait_messages(room, MESSAGES)
        assert [m["seq"] for m in got] == list(range(1, MESSAGES + 1))

        # On one server every room's events share one inbox per node, whatever
        # the room's partition (keys.inbox_partition).
        inbox = keys.inbox(0, node.node_id)
        assert await admin.keys(f"{keys.PREFIX}:*:inbox:{node.node_id}") == [inbox.encode()]
        # The last trim goes out with the read after the burst's: within fanout.block_ms.
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            pending = (await admin.xpending(inbox, GROUP))["pending"]
            length = await admin.xlen(inbox)
            if pending == length == 0:
                break
            assert asyncio.get_running_loop().time() < deadline, (
                f"{pending} pending, {length} left in {inbox} 5 s after the burst")
            await asyncio.sleep(0.05)

        # The reader is blocked with reads queued behind it (its unparsed input),
        # topped up before fewer than half of READ_AHEAD remain.
        (reader,) = [line for line in (await admin.execute_command(
            "CLIENT", "LIST", "TYPE", "normal")).decode().splitlines()
            if "cmd=xreadgroup" in line]
        fields = dict(kv.split("=", 1) for kv in reader.split(" ") if "=" in kv)
        assert "b" in fields["flags"], reader
        one_read = len(f"XREADGROUP GROUP {GROUP} {node.node_id} ")  # a lower bound
        assert int(fields["qbuf"]) >= READ_AHEAD // 2 * one_read, reader
        await alice_ws.close()
        await bob_ws.close()
