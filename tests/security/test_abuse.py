"""Abusive clients are contained (issue 7, part 5; PROTOCOL.md s3 "Limits and close codes").

Five kinds of abuse, each against a node that a well-behaved pair keeps chatting on
(every message must arrive, in order), with the chatd process's resident memory measured
before, during (peak) and after, and its growth bounded:

* many connections that never send `hello`: each closed with 4002 after
  `limits.auth_timeout_s` (1 s here), the connection count back to where it was;
* slow HTTP clients (silent, trickling their headers, a body that stops short): each
  closed after `server.request_timeout_s` (1 s here), the short bodies answered 400;
* a sender at 10x its rate limit: `rate_limited` with `retry_after_ms`, only what was
  acked is stored and delivered, nothing more;
* a client that stops reading while its room is busy (a bare socket with a small receive
  buffer; `limits.send_queue_max` 64): closed with 4009 once its queue is full, having
  received a gap-free prefix of the room, and a resume gets the rest;
* a client sending frames of exactly `limits.max_frame_bytes` as fast as it can: each is
  answered (or rate limited) and the connection stays; one byte more closes with 1009, as
  do a frame header that claims 4 EiB, fragments adding up past the limit, and a
  compressed frame that inflates past it (permessage-deflate bomb).

Every test prints its figures on one line (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.client import Api, Ws, connect, metric
from tests.harness import ChatdNode, ChatdNodes, ValkeyProcess
from tests.security.support import (
    BASE_ENV,
    CLOSE_HELLO_TIMEOUT,
    CLOSE_RESUME_REQUIRED,
    CLOSE_TOO_BIG,
    MAX_FRAME_BYTES,
    OP_CLOSE,
    OP_CONT,
    OP_TEXT,
    SHORT_BODY,
    SILENT,
    TRICKLING,
    UNTHROTTLED,
    Bystanders,
    RawWs,
    assert_log_clean,
    client_frame,
    rss_kib,
    slow_http_client,
    summary,
)

MEMORY_BOUND_KIB = 50 * 1024  # RSS growth allowed for any one abuse (generous on purpose)


class Memory:
    """RSS of a node: before, the peak while sampling, after."""

    def __init__(self, node: ChatdNode) -> None:
        self.pid = node.pid
        self.before = rss_kib(self.pid)
        self.peak = self.before
        self.after = self.before

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        async def sample() -> None:
            while True:
                self.peak = max(self.peak, rss_kib(self.pid))
                await asyncio.sleep(0.05)

        task = asyncio.create_task(sample())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.after = rss_kib(self.pid)
            self.peak = max(self.peak, self.after)

    def check(self) -> dict[str, float]:
        figures = {"rss_before_mib": round(self.before / 1024, 1),
                   "rss_peak_mib": round(self.peak / 1024, 1),
                   "rss_after_mib": round(self.after / 1024, 1)}
        assert self.peak - self.before < MEMORY_BOUND_KIB, figures
        return figures


# --- connections that never say hello ---------------------------------------------------

CONNECTIONS = 300


async def test_connections_without_hello_are_closed_4002(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env={
        **BASE_ENV, "CHATD_LIMITS__AUTH_TIMEOUT_S": "1"})
    async with aiohttp.ClientSession() as http, Bystanders(http, node) as bystanders, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as flood:
        await asyncio.sleep(0.3)
        baseline = await metric(http, node.url, "chatd_connections")
        assert baseline == 2  # the bystanders
        memory = Memory(node)
        async with memory.sampling():
            started = time.monotonic()
            conns: list[Ws] = []
            for batch in range(CONNECTIONS // 50):
                opened = await asyncio.gather(*(flood.ws_connect(node.ws_url)
                                                for _ in range(50)))
                for raw in opened:
                    conns.append(Ws(raw))
                    conns[-1].start()
                if batch == 0:  # some of them at least say something that is not hello
                    await conns[0].ws.ping()
            opened_in = time.monotonic() - started
            peak_open = await metric(http, node.url, "chatd_connections")
            codes = await asyncio.gather(*(ws.wait_closed(timeout=10) for ws in conns))
            closed_in = time.monotonic() - started
        assert codes == [CLOSE_HELLO_TIMEOUT] * CONNECTIONS, set(codes)
        assert all(not ws.frames for ws in conns)  # not even an error frame
        assert closed_in < opened_in + 1 + 2, closed_in  # auth_timeout_s + slack
        deadline = time.monotonic() + 5
        while await metric(http, node.url, "chatd_connections") != baseline:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        chat = await bystanders.stop()
    assert_log_clean(node)
    summary("abuse: connections without hello", connections=CONNECTIONS,
            opened_s=round(opened_in, 2), all_closed_4002_s=round(closed_in, 2),
            server_connections_peak=int(peak_open), after=int(baseline),
            **memory.check(), bystanders=chat)


# --- slow HTTP clients -------------------------------------------------------------------

SLOW_CLIENTS = 300  # a third each: silent, headers trickled in, a body that stops short
REQUEST_TIMEOUT_S = 1.0


async def test_slow_http_clients_are_cut_off(valkey: ValkeyProcess,
                                            chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env={
        **BASE_ENV, "CHATD_SERVER__REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S)})
    async with aiohttp.ClientSession() as http, Bystanders(http, node) as bystanders:
        memory = Memory(node)
        async with memory.sampling():
            kinds = (SILENT, TRICKLING, SHORT_BODY)
            results = await asyncio.gather(*(slow_http_client(node, kinds[k % 3], within_s=10)
                                             for k in range(SLOW_CLIENTS)))
        chat = await bystanders.stop()
    silent, trickled, short = (results[k::3] for k in range(3))
    assert all(data == b"" for data, _ in silent + trickled)
    assert all(data.startswith(b"HTTP/1.1 400 ") for data, _ in short)
    # Closed by the timeout (libuv may start its timer from a loop time cached before
    # the accept: half of it is the bound); the short bodies after another one at most
    # (aiohttp's lingering read of the rest).
    assert all(REQUEST_TIMEOUT_S * 0.5 <= t < REQUEST_TIMEOUT_S + 3 for _, t in silent + trickled)
    assert all(REQUEST_TIMEOUT_S * 0.5 <= t < 2 * REQUEST_TIMEOUT_S + 3 for _, t in short)
    assert_log_clean(node)
    summary("abuse: slow HTTP clients", clients=SLOW_CLIENTS,
            closed_after_s=f"{min(t for _, t in results):.2f}-{max(t for _, t in results):.2f}",
            **memory.check(), bystanders=chat)


# --- a sender at 10x its rate ------------------------------------------------------------

RATE, BURST = 20, 40  # config.toml defaults of limits.send_rate_per_s / send_burst
FLOOD_S = 3.0


async def test_sender_at_ten_times_its_rate_is_limited_and_nothing_extra_is_stored(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=BASE_ENV)
    async with aiohttp.ClientSession() as http, Bystanders(http, node) as bystanders:
        api = Api(http, node.url)
        abuser, reader = await api.register(), await api.register()
        room = await api.direct(abuser, reader)
        ws = await connect(http, node.ws_url, abuser)
        reader_ws = await connect(http, node.ws_url, reader)
        memory = Memory(node)
        sent = 0
        async with memory.sampling():
            started = time.monotonic()
            while time.monotonic() - started < FLOOD_S:
                sent += 1
                await ws.send({"type": "send", "id": f"f{sent}", "room_id": room,
                               "client_msg_id": f"flood-{sent}", "body": f"flood {sent}"})
                # 10x the rate: one every 1/(10*RATE) s
                await asyncio.sleep(max(0.0, started + sent / (10 * RATE) - time.monotonic()))
            elapsed = time.monotonic() - started
            await ws.wait_for(lambda f: f.get("id") == f"f{sent}", timeout=15)
            window = time.monotonic() - started  # the bucket refilled until the last reply
        replies = {f["id"]: f for f in ws.frames if str(f.get("id", "")).startswith("f")}
        assert len(replies) == sent
        acked = {rid: f for rid, f in replies.items() if f["type"] == "ack"}
        refused = [f for f in replies.values() if f["type"] == "error"]
        assert all(f["code"] == "rate_limited" and f["retry_after_ms"] > 0 for f in refused)
        assert sent >= 9 * RATE * FLOOD_S
        allowed = BURST + RATE * window
        assert BURST <= len(acked) <= allowed + 2, (len(acked), allowed)
        assert len(refused) >= sent - allowed - 2

        # Exactly the acked messages are stored and delivered, in send order, once each.
        acked_ids = [f"flood-{k}" for k in range(1, sent + 1) if f"f{k}" in acked]
        assert [acked[f"f{k}"]["seq"] for k in range(1, sent + 1) if f"f{k}" in acked] == \
            list(range(1, len(acked) + 1))
        status, page = await api.call("GET", f"/api/v1/rooms/{room}/messages?limit=200",
                                      user=reader)
        assert status == 200 and not page["has_more"]
        assert [m["client_msg_id"] for m in page["messages"]] == acked_ids
        got = await reader_ws.wait_messages(room, len(acked))
        await asyncio.sleep(0.3)
        assert [m["client_msg_id"] for m in reader_ws.messages(room)] == acked_ids
        assert got
        # A refused client_msg_id stays unused: once the bucket refills it is stored.
        first_refused = next(k for k in range(1, sent + 1) if f"f{k}" not in acked)
        await asyncio.sleep(1.0)
        retry = await ws.send_message(room, "retried", client_msg_id=f"flood-{first_refused}")
        assert retry["type"] == "ack" and retry["duplicate"] is False, retry
        for w in (ws, reader_ws):
            await w.close()
        chat = await bystanders.stop()  # other users' buckets: never rate limited
    assert_log_clean(node)
    summary("abuse: 10x send rate", sent=sent, seconds=round(elapsed, 2),
            rate_per_s=round(sent / elapsed), limit=f"{RATE}/s burst {BURST}",
            acked=len(acked), refused_rate_limited=len(refused), stored=len(acked_ids),
            delivered=len(acked_ids), extra_stored=0, **memory.check(), bystanders=chat)


# --- a client that stops reading ----------------------------------------------------------

QUEUE_MAX = 64
BODY = "s" * 3900


def _busy_messages() -> int:
    """Enough traffic to overflow what the kernel may buffer for the stalled socket (the
    server's send buffer grows up to tcp_wmem's maximum), then the queue: 2000 here."""
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        wmem_max = 4 << 20
    return max(2000, (wmem_max // len(BODY) + 900) // 50 * 50)  # whole chunks of 50


BUSY_MESSAGES = _busy_messages()


async def test_client_that_stops_reading_is_closed_4009_and_resumes_without_a_gap(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env={
        **BASE_ENV, **UNTHROTTLED, "CHATD_LIMITS__SEND_QUEUE_MAX": str(QUEUE_MAX)})
    async with aiohttp.ClientSession() as http, Bystanders(http, node) as bystanders:
        api = Api(http, node.url)
        sender, reader, stalled = [await api.register() for _ in range(3)]
        room = await api.group(sender, [reader, stalled], name="busy")
        sender_ws = await connect(http, node.ws_url, sender)
        reader_ws = await connect(http, node.ws_url, reader)
        slow = await RawWs.open(node)
        await slow.send_text(json.dumps({"type": "hello", "token": stalled.token}))
        opcode, welcome = await slow.read_frame()
        assert opcode == OP_TEXT and json.loads(welcome)["type"] == "welcome"
        # From here on `slow` reads nothing.
        memory = Memory(node)
        async with memory.sampling():
            started = time.monotonic()
            for chunk in range(BUSY_MESSAGES // 50):
                last = ""
                for k in range(chunk * 50, chunk * 50 + 50):
                    last = f"busy-{k}"
                    await sender_ws.send({"type": "send", "id": last, "room_id": room,
                                          "client_msg_id": last, "body": BODY})
                reply = await sender_ws.wait_for(lambda f, last=last: f.get("id") == last,
                                                 timeout=30)
                assert reply["type"] == "ack", reply
            got = await reader_ws.wait_messages(room, BUSY_MESSAGES, timeout=60)
            busy_s = time.monotonic() - started
        assert [m["seq"] for m in got] == list(range(1, BUSY_MESSAGES + 1))
        assert all(f.get("type") != "error" for f in sender_ws.frames)

        # Now the stalled client reads again: a gap-free prefix, then the close.
        frames: list[dict[str, Any]] = []
        code = await slow.read_until_close(on_text=lambda p: frames.append(json.loads(p)))
        assert code == CLOSE_RESUME_REQUIRED, (code, len(frames))
        await slow.send(client_frame(code.to_bytes(2, "big"), OP_CLOSE))
        await slow.close()
        seqs = [f["seq"] for f in frames if f.get("type") == "message"]
        assert seqs == list(range(1, len(seqs) + 1)), seqs[:5]
        assert len(seqs) < BUSY_MESSAGES  # the rest was not queued for it
        resumed = await connect(http, node.ws_url, stalled, resume={room: len(seqs)})
        rest = await resumed.wait_messages(room, BUSY_MESSAGES - len(seqs), timeout=30)
        assert [m["seq"] for m in rest] == list(range(len(seqs) + 1, BUSY_MESSAGES + 1))
        for w in (sender_ws, reader_ws, resumed):
            await w.close()
        chat = await bystanders.stop()
    assert_log_clean(node)
    summary("abuse: client that stops reading", room_messages=BUSY_MESSAGES,
            body_chars=len(BODY), seconds=round(busy_s, 2), send_queue_max=QUEUE_MAX,
            stalled_got_before_4009=len(seqs), resumed_with=BUSY_MESSAGES - len(seqs),
            gaps=0, **memory.check(), bystanders=chat)


ROOMS, MISSED = 14, 250


async def test_resume_of_many_busy_rooms_is_not_cut_off(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    """The other side of the queue limit: a client that reads as fast as it can must not be
    closed with 4009 because the server read the room logs faster than the socket takes
    them (a resume of 14 rooms x 250 missed messages once overflowed the default queue of
    2048 in most attempts: every room's fill pushed a page of 200 at once)."""
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env={**BASE_ENV, **UNTHROTTLED})
    async with aiohttp.ClientSession() as http:
        api = Api(http, node.url)
        sender, reader = await api.register(), await api.register()
        rooms = [await api.group(sender, [reader], name=f"busy {i}") for i in range(ROOMS)]
        sender_ws = await connect(http, node.ws_url, sender)
        for room in rooms:
            last = ""
            for k in range(MISSED):
                last = f"{room[:6]}-{k}"
                await sender_ws.send({"type": "send", "id": last, "room_id": room,
                                      "client_msg_id": last, "body": "m" * 100})
            assert (await sender_ws.wait_for(lambda f, last=last: f.get("id") == last,
                                             timeout=30))["type"] == "ack"
        await sender_ws.close()
        memory = Memory(node)
        timings = []
        async with memory.sampling():
            for _ in range(3):
                started = time.monotonic()
                ws = await connect(http, node.ws_url, reader, resume=dict.fromkeys(rooms, 0))
                await ws.wait_for(lambda f, ws=ws: len(ws.messages()) >= ROOMS * MISSED,
                                  timeout=30)
                timings.append(round(time.monotonic() - started, 2))
                for room in rooms:
                    assert [m["seq"] for m in ws.messages(room)] == list(range(1, MISSED + 1))
                assert ws.closed_code is None
                await ws.close()
    assert_log_clean(node)
    summary("resume of many busy rooms", rooms=ROOMS, missed_per_room=MISSED,
            resumes=len(timings), seconds=timings, closed_4009=0, **memory.check())


# --- frames of the maximum size -----------------------------------------------------------

AT_SIZE_SECONDS, AT_SIZE_MAX_FRAMES = 2.0, 5000


def padded(frame: dict[str, Any], size: int) -> bytes:
    """The frame as JSON of exactly `size` bytes, padded with an unknown field."""
    text = json.dumps({**frame, "pad": ""})
    data = json.dumps({**frame, "pad": "p" * (size - len(text.encode()))}).encode()
    assert len(data) == size
    return data


@pytest.mark.timeout(120)
async def test_frames_of_the_maximum_size_are_handled_and_larger_ones_close_1009(
        valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> None:
    (node,) = await chatd_nodes.start(1, redis_url=valkey, env=BASE_ENV)
    async with aiohttp.ClientSession() as http, Bystanders(http, node) as bystanders:
        api = Api(http, node.url)
        abuser, other = await api.register(), await api.register()
        room = await api.direct(abuser, other)
        ws = await connect(http, node.ws_url, abuser)
        memory = Memory(node)
        async with memory.sampling():
            started = time.monotonic()
            # Two templates of exactly MAX_FRAME_BYTES; the 6-digit id keeps the size.
            templates = [padded({"type": "ping", "id": "big000000"}, MAX_FRAME_BYTES),
                         padded({"type": "send", "id": "big000000", "room_id": room,
                                 "client_msg_id": "big-000000", "body": "b" * 4000},
                                MAX_FRAME_BYTES)]
            frames = 0
            while time.monotonic() - started < AT_SIZE_SECONDS and frames < AT_SIZE_MAX_FRAMES:
                data = templates[frames % 2].replace(b"000000", b"%06d" % frames)
                frames += 1
                await ws.ws.send_frame(data, aiohttp.WSMsgType.TEXT)
                await asyncio.sleep(0)  # let the bystanders (same process) take turns
            await ws.wait_for(lambda f: f.get("id") == f"big{frames - 1:06d}", timeout=60)
            flood_s = time.monotonic() - started
            replies = [f for f in ws.frames if str(f.get("id", "")).startswith("big")]
            assert len(replies) == frames
            kinds: dict[str, int] = {}
            for f in replies:
                kind = f["type"] if f["type"] != "error" else f["code"]
                kinds[kind] = kinds.get(kind, 0) + 1
            assert set(kinds) <= {"pong", "ack", "rate_limited"}, kinds
            assert kinds.get("pong", 0) > 0 and kinds.get("ack", 0) > 0, kinds
            assert ws.closed_code is None
            await ws.close()

            # One byte more: 1009, nothing stored.
            over = await connect(http, node.ws_url, abuser)
            await over.ws.send_frame(padded({"type": "send", "id": "over", "room_id": room,
                                             "client_msg_id": "over", "body": "o"},
                                            MAX_FRAME_BYTES + 1), aiohttp.WSMsgType.TEXT)
            assert await over.wait_closed() == CLOSE_TOO_BIG
            # A header that claims 4 EiB (no payload follows), before hello.
            liar = await RawWs.open(node)
            await liar.send(client_frame(b"{", OP_TEXT, claimed_length=1 << 62))
            liar_code = await liar.read_until_close()
            await liar.close()
            # Fragments adding up past the limit, after hello.
            fragments = await RawWs.open(node)
            await fragments.send_text(json.dumps({"type": "hello", "token": abuser.token}))
            assert json.loads((await fragments.read_frame())[1])["type"] == "welcome"
            part = b"x" * (MAX_FRAME_BYTES // 2 + 1)
            await fragments.send(client_frame(b'"' + part, OP_TEXT, fin=False))
            await fragments.send(client_frame(part + b'"', OP_CONT, fin=True))
            fragments_code = await fragments.read_until_close()
            await fragments.close()
            # A permessage-deflate bomb (16 MiB that compresses to a few KiB), if the server
            # agrees to compression at all.
            bomb = await http.ws_connect(node.ws_url, compress=15)
            compressed = bomb.compress != 0
            bomb_ws = Ws(bomb)
            bomb_ws.start()
            await bomb_ws.send({"type": "hello", "token": abuser.token})
            await bomb_ws.wait_type("welcome")
            bomb_code: int | str = "deflate not negotiated"
            if compressed:
                await bomb.send_frame(b"[" + b" " * (16 << 20) + b"]",
                                      aiohttp.WSMsgType.BINARY, compress=15)
                bomb_code = await bomb_ws.wait_closed(timeout=30) or 0
            else:
                await bomb_ws.close()
        assert liar_code == CLOSE_TOO_BIG
        assert fragments_code == CLOSE_TOO_BIG
        assert bomb_code in (CLOSE_TOO_BIG, "deflate not negotiated"), bomb_code
        status, page = await api.call("GET", f"/api/v1/rooms/{room}/messages?limit=200",
                                      user=other)
        assert status == 200
        assert len(page["messages"]) == kinds["ack"]
        assert "over" not in [m["client_msg_id"] for m in page["messages"]]
        chat = await bystanders.stop()
    assert_log_clean(node)
    summary("abuse: maximum-size frames", frames=frames, frame_bytes=MAX_FRAME_BYTES,
            seconds=round(flood_s, 2), replies=kinds,
            closes={"one byte over": CLOSE_TOO_BIG, "4 EiB header": liar_code,
                    "fragments over": fragments_code,
                    "deflate bomb": bomb_code},
            **memory.check(), bystanders=chat)
