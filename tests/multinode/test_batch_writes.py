"""A node that falls behind hands out its inbox in batches (conn.WriteBatch joins each
connection's frames of a batch into one write): every frame still arrives, once and
in seq order, on every connection.

The receiving node is stopped (SIGSTOP) while another node stores the messages, so
that when it resumes its inbox holds many entries per read, and the replies to the
reads it had queued arrive together (broker._read_ahead hands them over as one batch).
"""

from __future__ import annotations

import os
import signal

import aiohttp

from tests.client import FAST_ENV, Api, connect
from tests.conftest import RedisBackend
from tests.harness import ChatdNodes, assert_clean_logs

MESSAGES = 60  # well past the reads a node keeps queued, so later reads return many


async def test_a_node_that_fell_behind_delivers_every_batched_frame_in_order(
        redis_backend: RedisBackend, chatd_nodes: ChatdNodes) -> None:
    sender_node, behind = await chatd_nodes.start(2, **redis_backend.chatd_args, env=FAST_ENV | {
        "CHATD_LIMITS__SEND_RATE_PER_S": "1000", "CHATD_LIMITS__SEND_BURST": "1000"})
    async with aiohttp.ClientSession() as http:
        (alice, bob, carol), room = await Api(http, sender_node.url).group_of(3)
        sender = await connect(http, sender_node.ws_url, alice)
        readers = [await connect(http, behind.ws_url, user) for user in (bob, carol, bob)]

        assert behind.pid is not None
        os.kill(behind.pid, signal.SIGSTOP)
        try:
            for i in range(MESSAGES):
                assert (await sender.send_message(room, f"m{i}"))["seq"] == i + 1
        finally:
            os.kill(behind.pid, signal.SIGCONT)

        for ws in readers:
            got = await ws.wait_messages(room, MESSAGES)
            assert [m["seq"] for m in got] == list(range(1, MESSAGES + 1))
            assert [m["body"] for m in got] == [f"m{i}" for i in range(MESSAGES)]
        for ws in (sender, *readers):
            await ws.close()
    assert_clean_logs(sender_node, behind)
