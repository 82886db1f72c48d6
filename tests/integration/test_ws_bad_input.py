"""Bad input on an authenticated WebSocket (PROTOCOL.md sections 1 and 3): every client
frame type with missing fields, wrong types, bad values, foreign or unknown rooms, and
frames that are not JSON objects at all. Each gets the documented `error` frame (echoing
`id` when one was given), nothing is stored or delivered, the connection stays open,
only repeated invalid frames close it (4008), and a bystander keeps chatting."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiohttp

from tests.client import Ws
from tests.conftest import OneNode
from tests.harness import ChatdNodes

CLOSE_POLICY = 4008
MAX_BODY = 4000  # config.toml default of limits.max_body_chars


async def reply_to(ws: Ws, raw: Any, rid: str | None, errors_before: int) -> dict[str, Any]:
    """Send one frame; return the reply echoing `rid`, or the next error frame when the
    frame carries no readable id."""
    await ws.send_raw(raw)
    if rid is not None:
        return await ws.wait_for(lambda f: f.get("id") == rid)
    await ws.wait_for(lambda f: len(ws.of_type("error")) > errors_before)
    return ws.of_type("error")[errors_before]


def batches(items: list[Any], size: int = 5) -> list[list[Any]]:
    """`items` in runs of `size`: one connection each, well below the invalid-frame limit."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def frame_cases(own: str, foreign: str) -> list[tuple[str, Any, str]]:
    """(label, frame, expected code). Dict frames get an `id` added by the test."""
    send = {"type": "send", "room_id": own, "client_msg_id": "c1", "body": "hi"}
    mark = {"room_id": own, "seq": 0}
    hist = {"type": "history", "room_id": own}
    cases: list[tuple[str, Any, str]] = []

    def without(frame: dict[str, Any], key: str) -> dict[str, Any]:
        return {k: v for k, v in frame.items() if k != key}

    # send
    for key in ("room_id", "client_msg_id", "body"):
        cases.append((f"send without {key}", without(send, key), "bad_request"))
    for key, value in [("room_id", 5), ("room_id", None), ("room_id", ["x"]),
                       ("client_msg_id", 5), ("client_msg_id", None),
                       ("body", ["hi"]), ("body", 5), ("body", None), ("body", {"t": "hi"}),
                       ("body", True)]:
        cases.append((f"send {key}={value!r}", {**send, key: value}, "bad_request"))
    cases.append(("send empty body", {**send, "body": ""}, "bad_request"))
    cases.append(("send body max+1", {**send, "body": "x" * (MAX_BODY + 1)}, "too_large"))
    cases.append(("send body max+1 code points",
                  {**send, "body": "\U0001f600" * (MAX_BODY + 1)}, "too_large"))
    for cmid in ("", "x" * 65, "has space", "a/b", "dot.ted", "\u00fcml", "abc\n", "{0}"):
        cases.append((f"send client_msg_id={cmid!r}", {**send, "client_msg_id": cmid},
                      "bad_request"))
    # delivered and read
    for kind in ("delivered", "read"):
        base = {"type": kind, **mark}
        for key in ("room_id", "seq"):
            cases.append((f"{kind} without {key}", without(base, key), "bad_request"))
        for value in ("1", 1.5, 1.0, True, False, -1, None, [1], 2**64):
            cases.append((f"{kind} seq={value!r}", {**base, "seq": value}, "bad_request"))
        cases.append((f"{kind} room_id=5", {**base, "room_id": 5}, "bad_request"))
        cases.append((f"{kind} seq above last", {**base, "seq": 1}, "bad_request"))
    # typing
    typing = {"type": "typing", "room_id": own, "active": True}
    for key in ("room_id", "active"):
        cases.append((f"typing without {key}", without(typing, key), "bad_request"))
    for value in ("yes", 1, None):
        cases.append((f"typing active={value!r}", {**typing, "active": value}, "bad_request"))
    # history
    cases.append(("history without room_id", without(hist, "room_id"), "bad_request"))
    for key, value in [("limit", 0), ("limit", 201), ("limit", "5"), ("limit", 2.5),
                       ("limit", -1), ("after_seq", -1), ("after_seq", "1"),
                       ("after_seq", 1.5), ("after_seq", True)]:
        cases.append((f"history {key}={value!r}", {**hist, key: value}, "bad_request"))
    # ping
    cases.append(("ping with a body field", {"type": "ping", "extra": [1, 2]}, "ok"))
    # hello again
    cases.append(("second hello", {"type": "hello"}, "bad_request"))
    # unknown or foreign rooms: not_found, existence not revealed
    for label, room in [("foreign", foreign), ("unknown", secrets.token_urlsafe(20)),
                        ("garbage id", "../../etc"), ("braces", "{3}x"),
                        ("colon", f"{foreign}:members")]:
        cases.append((f"send to {label} room", {**send, "room_id": room}, "not_found"))
        cases.append((f"delivered in {label} room",
                      {"type": "delivered", "room_id": room, "seq": 1}, "not_found"))
        cases.append((f"read in {label} room",
                      {"type": "read", "room_id": room, "seq": 1}, "not_found"))
        cases.append((f"typing in {label} room",
                      {"type": "typing", "room_id": room, "active": True}, "not_found"))
        cases.append((f"history of {label} room", {**hist, "room_id": room}, "not_found"))
    # not a frame at all
    cases.append(("unknown type", {"type": "shout", "room_id": own}, "bad_request"))
    cases.append(("type in capitals", {"type": "PING"}, "bad_request"))
    cases.append(("type not a string", {"type": 5}, "bad_request"))
    cases.append(("no type", {"room_id": own}, "bad_request"))
    return cases


# Frames where no id can be read back: (label, raw text or bytes).
RAW_CASES: list[tuple[str, str | bytes]] = [
    ("not JSON", "hello there"),
    ("truncated JSON", '{"type": "ping", "id": "t"'),
    ("JSON array", '[{"type": "ping", "id": "arr"}]'),
    ("JSON string", '"ping"'),
    ("JSON number", "42"),
    ("JSON null", "null"),
    ("empty text", ""),
    ("id is a number", '{"type": "ping", "id": 7}'),
    ("id too long", '{"type": "ping", "id": "' + "i" * 65 + '"}'),
    ("binary ping", b'{"type": "ping", "id": "bin"}'),
    ("binary garbage", b"\x00\xff\x10"),
]


async def test_every_invalid_frame_gets_an_error_and_the_connection_stays(
        one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        alice, bob, carol = await chat.api.users(3)
        own = await chat.api.group(alice, [], name="alice alone")
        foreign = await chat.api.direct(bob, carol)
        bob_ws = await chat.connect(bob)
        carol_ws = await chat.connect(carol)
        chat_seq = 0

        async def bystanders_chat() -> None:
            nonlocal chat_seq
            chat_seq += 1
            ack = await bob_ws.send_message(foreign, f"still here {chat_seq}")
            assert ack["type"] == "ack" and ack["seq"] == chat_seq, ack
            await carol_ws.wait_messages(foreign, chat_seq)

        cases = frame_cases(own, foreign)
        assert len(cases) > 80
        failures = []
        for batch in batches(list(enumerate(cases))):
            ws = await chat.connect(alice)
            await bystanders_chat()
            for n, (label, frame, code) in batch:
                rid = f"case-{n}"
                reply = await reply_to(ws, {**frame, "id": rid}, rid, len(ws.of_type("error")))
                expected_type = "pong" if code == "ok" else "error"
                if reply["type"] != expected_type or (code != "ok" and reply["code"] != code):
                    failures.append((label, reply))
                elif code != "ok":
                    fields = {"type", "id", "code", "message", "retry_after_ms"}
                    assert set(reply) <= fields, reply
                    assert isinstance(reply["message"], str) and reply["message"], reply
                if ws.closed_code is not None:
                    failures.append((label, f"closed with {ws.closed_code}"))
                    break
                await ws.ping()
            await ws.close()

        for batch in batches(RAW_CASES):
            ws = await chat.connect(alice)
            for label, raw in batch:
                reply = await reply_to(ws, raw, None, len(ws.of_type("error")))
                if reply.get("code") != "bad_request" or "id" in reply:
                    failures.append((label, reply))
                await ws.ping()
            await ws.close()
        assert not failures, "\n".join(f"{label}: {reply}" for label, reply in failures)

        # Nothing reached the foreign room: no message, typing or receipt from alice,
        # nothing stored, no watermark for her.
        await bystanders_chat()
        for member, member_ws in ((bob, bob_ws), (carol, carol_ws)):
            stored = await chat.api.messages(member, foreign)
            assert {m["sender_id"] for m in stored} == {bob.user_id}, stored
            assert len(stored) == chat_seq
            assert not [f for f in member_ws.frames if f.get("user_id") == alice.user_id
                        or f.get("sender_id") == alice.user_id], member_ws.frames
            assert not member_ws.of_type("error")
        body = await chat.api.get(f"/api/v1/rooms/{foreign}/receipts", bob)
        assert sorted(r["user_id"] for r in body["receipts"]) == sorted(
            [bob.user_id, carol.user_id])
        # And nothing in alice's own room either.
        assert await chat.api.messages(alice, own) == []
    assert "Traceback" not in chat.node.log_text()


async def test_body_length_counts_code_points(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        alice = await chat.api.register()
        room = await chat.api.group(alice, [])
        ws = await chat.connect(alice)
        body = "\U0001f600" * MAX_BODY  # 4000 code points, 16000 UTF-8 bytes
        ack = await ws.send_message(room, body)
        assert ack["type"] == "ack" and ack["seq"] == 1, ack
        ack = await ws.send_message(room, "\u00e9" + "x" * (MAX_BODY - 1))
        assert ack["type"] == "ack" and ack["seq"] == 2, ack
        stored = await chat.api.messages(alice, room)
        assert stored[0]["body"] == body
        # Over HTTP the same rule and the same code.
        path = f"/api/v1/rooms/{room}/messages"
        status, err = await chat.api.call("POST", path, user=alice,
                                          json_body={"client_msg_id": "h", "body": "x" * 4001})
        assert status == 413 and err["error"]["code"] == "too_large", (status, err)
        status, err = await chat.api.call("POST", path, user=alice,
                                          json_body={"client_msg_id": "h", "body": ""})
        assert status == 400 and err["error"]["code"] == "bad_request", (status, err)
        assert len(await chat.api.messages(alice, room)) == 2


async def test_ten_invalid_frames_close_4008(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        alice, bob, carol = await chat.api.users(3)
        room = await chat.api.direct(bob, carol)
        bob_ws = await chat.connect(bob)
        carol_ws = await chat.connect(carol)
        ws = await chat.connect(alice)
        invalid: list[str | bytes] = [
            "nope", b"\x01", '{"type":"shout","id":"x"}', "[]",
            '{"type":"ping","id":5}', '{"type":"delivered","room_id":"r","seq":-1}',
            '{"type":"send","room_id":"r","client_msg_id":"c","body":5}',
            '{"type":"history","room_id":"r","limit":0}', "{",
        ]
        assert len(invalid) == 9
        for raw in invalid:
            await reply_to(ws, raw, None, len(ws.of_type("error")))
        assert len(ws.of_type("error")) == 9
        await ws.ping()  # nine are tolerated
        ack = await bob_ws.send_message(room, "meanwhile")
        assert ack["seq"] == 1

        await ws.ws.send_str("the tenth")
        assert await ws.wait_closed() == CLOSE_POLICY

        # The bystanders are untouched, and the user may connect again.
        ack = await bob_ws.send_message(room, "after")
        assert ack["seq"] == 2
        assert [m["body"] for m in await carol_ws.wait_messages(room, 2)] == [
            "meanwhile", "after"]
        again = await chat.connect(alice)
        await again.ping()
    assert "Traceback" not in chat.node.log_text()


async def test_invalid_frame_limit_is_configurable_and_counts_within_window(
        one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__INVALID_FRAMES_MAX": "3",
                              "CHATD_LIMITS__INVALID_FRAMES_WINDOW_S": "1"}) as chat:
        ws = await chat.connect(await chat.api.register())
        # Two per window, twice: four in all, never three within one window.
        for _ in range(2):
            for _ in range(2):
                await reply_to(ws, "bad", None, len(ws.of_type("error")))
            await ws.ping()
            await asyncio.sleep(1.1)
        for _ in range(3):
            await ws.ws.send_str("bad")
        assert await ws.wait_closed() == CLOSE_POLICY


async def test_text_frame_with_invalid_utf8(one_node: OneNode, chatd_nodes: ChatdNodes) -> None:
    chatd_nodes.report_log_problems = False  # the traceback is asserted on below
    async with one_node.chat(clean_logs=False) as chat:
        alice, bob = await chat.api.users(2)
        room = await chat.api.direct(alice, bob)
        bob_ws = await chat.connect(bob)
        # After hello: a bad_request error and the connection stays (or, as RFC 6455
        # allows for invalid text, a close with 1007).
        ws = await chat.connect(alice)
        await ws.ws.send_frame(b'{"type":"ping","id":"\xff"}', aiohttp.WSMsgType.TEXT)
        try:
            error: dict[str, Any] | None = await ws.wait_type("error")
        except AssertionError:  # closed before any error frame
            error = None
        if error is not None:
            assert error["code"] == "bad_request", error
            await ws.ping()
            await ws.close()
        else:
            assert ws.closed_code == 1007
        # Before hello: not a hello, so 4001 (or 1007).
        early = await chat.raw()
        await early.ws.send_frame(b'{"type":"hello","token":"\xff"}', aiohttp.WSMsgType.TEXT)
        assert await early.wait_closed() in (4001, 1007)
        ack = await bob_ws.send_message(room, "still fine")
        assert ack["type"] == "ack"
    assert "Traceback" not in chat.node.log_text()
