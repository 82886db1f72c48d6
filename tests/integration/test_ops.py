"""Operations on real processes: /healthz, /readyz across a Redis outage, /metrics,
NOSCRIPT recovery after SCRIPT FLUSH, and the SIGTERM drain with an open WebSocket.

Every test runs one chatd subprocess on a private valkey-server (the `valkey` fixture).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatd import config, redisconn
from chatd.loops import Loop
from chatd.metrics import Metrics
from tests.client import FAST_ENV, PASSWORD, Api, User, connect
from tests.harness import ChatdNode, ChatdNodes, ValkeyProcess, assert_clean_logs

SHUTDOWN_S = 5.0
ENV = {**FAST_ENV, "CHATD_SERVER__SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_S),
       "CHATD_REDIS__SOCKET_TIMEOUT_S": "0.5", "CHATD_REDIS__CONNECT_TIMEOUT_S": "0.5"}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


@pytest.fixture
async def node(chatd_nodes: ChatdNodes, valkey: ValkeyProcess) -> ChatdNode:
    [started] = await chatd_nodes.start(1, redis_url=valkey, env=ENV)
    return started


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


async def wait_status(session: aiohttp.ClientSession, url: str, status: int,
                      within_s: float) -> float:
    """Poll until GET url answers `status`; the seconds it took."""
    t0 = time.monotonic()
    last: object = None
    while time.monotonic() - t0 < within_s:
        try:
            last, _ = await get(session, url)
        except (aiohttp.ClientError, TimeoutError) as e:
            last = repr(e)
        if last == status:
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} did not answer {status} within {within_s}s (last: {last})")


async def users_and_room(api: Api) -> tuple[User, User, str]:
    alice, bob = await api.register(), await api.register()
    return alice, bob, await api.group(alice, [bob])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# --- liveness and readiness -----------------------------------------------------------------


async def test_healthz_and_readyz(node: ChatdNode, session: aiohttp.ClientSession) -> None:
    status, body = await get(session, node.url + "/healthz")
    assert status == 200 and body == {"status": "ok"}
    status, body = await get(session, node.url + "/readyz")
    assert status == 200
    assert body["status"] == "ready" and body["draining"] is False
    assert body["node_id"] == node.node_id
    assert body["loops"] and all(body["loops"].values())


async def test_readyz_follows_a_redis_outage(node: ChatdNode, valkey: ValkeyProcess,
                                            session: aiohttp.ClientSession) -> None:
    api = Api(session, node.url)
    alice, bob, room = await users_and_room(api)

    await valkey.stop()
    await wait_status(session, node.url + "/readyz", 503, within_s=5)
    status, body = await get(session, node.url + "/readyz")
    assert status == 503 and body["status"] == "not ready"
    status, _ = await get(session, node.url + "/healthz")
    assert status == 200  # alive, only not ready: no restart wanted
    status, body = await api.call("POST", "/api/v1/login", json_body={
        "username": alice.username, "password": PASSWORD})
    assert status == 503 and body["error"]["code"] == "unavailable"

    await valkey.start()
    await wait_status(session, node.url + "/readyz", 200, within_s=10)

    ws_alice = await connect(session, node.ws_url, alice)
    ws_bob = await connect(session, node.ws_url, bob)
    ack = await ws_alice.send_message(room, "after the outage")
    assert ack["type"] == "ack" and ack["seq"] == 1, ack
    message = await ws_bob.wait_type("message", room_id=room)
    assert message["body"] == "after the outage" and message["seq"] == 1
    await ws_alice.close()
    await ws_bob.close()


async def test_hello_during_a_redis_outage_closes_1011(
        chatd_nodes: ChatdNodes, node: ChatdNode, valkey: ValkeyProcess,
        session: aiohttp.ClientSession) -> None:
    alice = await Api(session, node.url).register()
    await valkey.stop()
    await wait_status(session, node.url + "/readyz", 503, within_s=5)
    chatd_nodes.report_log_problems = False  # the assertion below reports them
    ws = await connect(session, node.ws_url, None, hello=False)
    await ws.send({"type": "hello", "token": alice.token})
    assert await ws.wait_closed(timeout=10) == 1011
    assert_clean_logs(node)


async def test_http_during_a_redis_outage_is_503(
        chatd_nodes: ChatdNodes, node: ChatdNode, valkey: ValkeyProcess,
        session: aiohttp.ClientSession) -> None:
    api = Api(session, node.url)
    alice = await api.register()
    await valkey.stop()
    await wait_status(session, node.url + "/readyz", 503, within_s=5)
    chatd_nodes.report_log_problems = False
    status, body = await api.call("GET", "/api/v1/me", user=alice)
    assert (status, body["error"]["code"]) == (503, "unavailable")
    assert_clean_logs(node)


# --- metrics --------------------------------------------------------------------------------


async def test_metrics(node: ChatdNode, session: aiohttp.ClientSession) -> None:
    api = Api(session, node.url)
    alice, _, room = await users_and_room(api)
    ws = await connect(session, node.ws_url, alice)
    ack = await ws.send_message(room, "counted", client_msg_id="once")
    assert ack["type"] == "ack"
    again = await ws.send_message(room, "counted", client_msg_id="once")
    assert again["duplicate"] is True
    error = await ws.send_message("no_such_room", "nowhere")
    assert error["type"] == "error" and error["code"] == "not_found"

    async with session.get(node.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    for name in ("chatd_connections", "chatd_frames_in", "chatd_frames_out", "chatd_sends",
                 "chatd_inbox_entries", "chatd_redis_call_seconds", "chatd_errors",
                 "chatd_delivery_lag_seconds", "chatd_gc_full_pause_seconds",
                 "chatd_gc_frozen_objects", "chatd_inbox_paced_waits"):
        assert f"# TYPE {name}" in text, name
    values = samples(text)
    assert values[("chatd_connections", ())] == 1.0  # the open WebSocket
    assert values[("chatd_gc_frozen_objects", ())] > 10_000  # what startup froze (cli.py)
    assert values[("chatd_frames_in_total", ())] == 3.0  # three sends (hello is not counted)
    # The welcome, two acks, the error, and the message itself once it came back.
    assert values[("chatd_frames_out_total", ())] >= 4.0
    assert values[("chatd_inbox_entries_total", ())] >= 1.0
    assert values[("chatd_inbox_paced_waits_total", ())] == 0.0  # a small room never waits
    assert values[("chatd_sends_total", (("duplicate", "false"),))] == 1.0
    assert values[("chatd_sends_total", (("duplicate", "true"),))] == 1.0
    assert values[("chatd_errors_total", (("code", "not_found"),))] == 1.0
    assert values[("chatd_redis_call_seconds_count", (("script", "send_message"),))] >= 1.0
    # The message came back through the node's inbox: its age was observed then.
    reads = values[("chatd_delivery_lag_seconds_count", ())]
    assert reads >= 1.0
    assert values[("chatd_delivery_lag_seconds_bucket", (("le", "+Inf"),))] == reads
    assert 0.0 <= values[("chatd_delivery_lag_seconds_sum", ())] < reads

    await ws.close()
    await asyncio.sleep(0.2)
    async with session.get(node.url + "/metrics") as resp:
        values = samples(await resp.text())
    assert values[("chatd_connections", ())] == 0.0


# --- scripts flushed behind chatd's back ------------------------------------------------------


async def test_script_flush_is_survived(node: ChatdNode, valkey: ValkeyProcess,
                                        session: aiohttp.ClientSession) -> None:
    api = Api(session, node.url)
    alice, bob, room = await users_and_room(api)
    ws = await connect(session, node.ws_url, alice)
    assert (await ws.send_message(room, "before"))["seq"] == 1

    client = valkey.client()
    try:
        assert await client.script_flush() is True
    finally:
        await client.aclose()

    ack = await ws.send_message(room, "after SCRIPT FLUSH")
    assert ack["type"] == "ack" and ack["seq"] == 2, ack
    again = await api.login(bob.username)  # login runs scripts too (bucket, session)
    assert again.user_id == bob.user_id
    status, me = await api.call("GET", "/api/v1/me", user=again)
    assert status == 200 and me["user_id"] == bob.user_id
    await ws.close()
    assert_clean_logs(node)


# --- graceful drain ---------------------------------------------------------------------------


async def test_sigterm_closes_websockets_with_1001_and_exits_0(
        node: ChatdNode, session: aiohttp.ClientSession) -> None:
    api = Api(session, node.url)
    alice, bob, room = await users_and_room(api)
    ws_alice = await connect(session, node.ws_url, alice)
    ws_bob = await connect(session, node.ws_url, bob)
    assert (await ws_alice.send_message(room, "last words"))["type"] == "ack"
    await ws_bob.wait_type("message", room_id=room)

    t0 = time.monotonic()
    node.terminate()
    assert await ws_alice.wait_closed(timeout=SHUTDOWN_S) == 1001
    assert await ws_bob.wait_closed(timeout=SHUTDOWN_S) == 1001
    assert await node.wait_exit(timeout=SHUTDOWN_S + 2) == 0
    assert time.monotonic() - t0 < SHUTDOWN_S
    assert_clean_logs(node)


async def test_a_loop_stops_while_its_step_talks_to_redis(valkey: ValkeyProcess) -> None:
    """The drain stops every background loop; one caught mid-step must stop too.

    On Python 3.11 redis-py's `asyncio.wait_for` around a socket write can swallow the
    cancel (CPython gh-86296): the step then returns normally, and a loop that went on
    would hang `runner.cleanup()` (the drain, or the exit 2 on a busy port) for ever.
    """
    settings = config.load(None, {}, {"redis.url": valkey.url})
    conn = await redisconn.connect(settings, valkey.url)

    async def step() -> None:  # like the janitor's sweep: many short commands in a row
        deadline = time.monotonic() + 1.0
        p = 0
        while time.monotonic() < deadline:
            await conn.cmd.xrange(f"chatd:{{{p % 16}}}:pending", "-", "+", count=10)
            p += 1

    loop = Loop("busy", step, Metrics(), interval_s=5.0)
    loop.start()
    task = loop._task
    assert task is not None
    try:
        await asyncio.sleep(0.05)  # inside a step
        stop = asyncio.ensure_future(loop.stop())
        done, _ = await asyncio.wait({stop}, timeout=2)
        stopped = stop in done
    finally:
        while not task.done():  # end it for sure, however often the cancel is swallowed
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)
        await asyncio.wait_for(stop, 1)
        await conn.close()
    assert stopped, "Loop.stop() did not return within 2 s"
