"""A dead node's inboxes do not grow for ever (docs/scaling.md, "Losing a chatd node").

A node holding a member's connection is SIGKILLed while the room stays busy. Until
the janitor declares it dead (its heartbeat older than fanout.node_ttl_s, checked
every fanout.janitor_interval_s) the send script still appends to its inbox; the
inbox is capped by `MAXLEN ~ fanout.inbox_max_len` meanwhile. Then its inbox keys
are deleted within node_ttl_s + janitor_interval_s of the kill (plus the clean-up's
own time) and later sends do not recreate them.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from chatd import keys
from tests.client import FAST_ENV, Api, connect
from tests.cluster.support import LOAD_ENV, PARTITIONS
from tests.harness import ChatdNodes, ValkeyProcess

NODE_TTL_S = 4.0
JANITOR_INTERVAL_S = 0.5
INBOX_MAX_LEN = 100  # the smallest allowed
# MAXLEN ~ trims whole stream nodes (stream-node-max-entries, 100 by default): the
# stream may hold up to one node more than the cap.
STREAM_NODE_ENTRIES = 100
ENV = FAST_ENV | LOAD_ENV | {
    "CHATD_FANOUT__NODE_TTL_S": str(NODE_TTL_S),
    "CHATD_FANOUT__JANITOR_INTERVAL_S": str(JANITOR_INTERVAL_S),
    "CHATD_FANOUT__HEARTBEAT_INTERVAL_S": "0.5",
    "CHATD_FANOUT__INBOX_MAX_LEN": str(INBOX_MAX_LEN),
}
CLEANUP_SLACK_S = 1.5


async def test_inbox_of_a_dead_node_is_capped_then_deleted(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    a, victim = await chatd_nodes.start(2, redis_url=valkey, env=ENV)
    chatd_nodes.report_log_problems = False
    redis = valkey.client(decode_responses=True)
    try:
        async with aiohttp.ClientSession() as http:
            api = Api(http, a.url)
            alice, bob = await api.register(), await api.register()
            room = await api.group(alice, [bob], name="busy")
            p = keys.partition_of(room, PARTITIONS)
            inbox = keys.inbox(keys.inbox_partition(p, cluster=False), victim.node_id)
            sender = await connect(http, a.ws_url, alice)
            bob_v = await connect(http, victim.ws_url, bob)
            assert victim.node_id in await redis.smembers(keys.room_nodes(p, room))

            victim.kill()
            killed_at = time.monotonic()
            await bob_v.wait_closed()
            lengths: list[int] = []
            sent = 0
            gone_after: float | None = None
            while time.monotonic() - killed_at < NODE_TTL_S + JANITOR_INTERVAL_S + 5:
                for _ in range(20):  # about 20 sends per 50 ms: well past the cap
                    await sender.send({"type": "send", "room_id": room,
                                       "client_msg_id": f"m{sent}", "body": "x"})
                    sent += 1
                await asyncio.sleep(0.05)
                exists = await redis.exists(inbox)
                lengths.append(await redis.xlen(inbox))
                if not exists and gone_after is None:
                    gone_after = time.monotonic() - killed_at
                if gone_after is not None and time.monotonic() - killed_at > gone_after + 1:
                    break
            assert gone_after is not None, f"the dead node's inbox is still there {lengths[-3:]}"
            bound = NODE_TTL_S + JANITOR_INTERVAL_S + CLEANUP_SLACK_S
            assert gone_after < bound, (gone_after, bound)
            # While it existed it grew to the cap, and no further.
            assert sent > 10 * INBOX_MAX_LEN
            assert max(lengths) >= INBOX_MAX_LEN, lengths
            assert max(lengths) <= INBOX_MAX_LEN + STREAM_NODE_ENTRIES, max(lengths)
            # Every key of the dead node is gone and stays gone under further traffic.
            await sender.wait_for(lambda f: sum(x.get("type") == "ack"
                                                for x in sender.frames) >= sent, timeout=20)
            leftovers = [k async for k in redis.scan_iter(match=f"*{victim.node_id}*")]
            assert leftovers == [], leftovers
            assert victim.node_id not in await redis.smembers(keys.room_nodes(p, room))
            print(f"\ndead node inbox: {sent} sends; inbox length peaked at {max(lengths)} "
                  f"(cap {INBOX_MAX_LEN}); deleted {gone_after:.2f}s after the kill "
                  f"(bound {NODE_TTL_S} + {JANITOR_INTERVAL_S} s + {CLEANUP_SLACK_S} s slack)")
            await sender.close()
    finally:
        await redis.aclose()
