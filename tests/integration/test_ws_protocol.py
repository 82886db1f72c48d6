"""The WebSocket protocol on one real chatd node (PROTOCOL.md section 3): hello rules,
welcome, per-user connection limit, frame size, ping, heartbeat, send rate limit, idempotency and
typing. Real Valkey, real chatd process, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from chatd import keys
from chatd.auth import TOKEN_SALT
from tests.client import Chat, User, Ws, metric
from tests.conftest import OneNode
from tests.harness import ValkeyProcess

CLOSE_TOO_BIG = 1009
CLOSE_UNAUTHORIZED = 4001
CLOSE_HELLO_TIMEOUT = 4002
CLOSE_POLICY = 4008
CLOSE_TOO_MANY = 4029


class OldSigner(TimestampSigner):
    """Signs as if eight days ago: past the default 7-day session TTL."""

    def get_timestamp(self) -> int:
        return int(time.time()) - 8 * 24 * 3600


async def connect_once_a_slot_is_free(chat: Chat, user: User, why: str) -> Ws:
    """Say hello as `user` until the per-user connection limit lets one in (the server
    counts a closed connection out a moment later); fails with `why` after 5 s."""
    deadline = time.monotonic() + 5
    while True:
        ws = await chat.connect(user, welcome=False)
        try:
            await ws.wait_type("welcome")
            return ws
        except AssertionError:  # closed (4029) before a welcome
            assert ws.closed_code == CLOSE_TOO_MANY
        assert time.monotonic() < deadline, why
        await asyncio.sleep(0.1)


# --- hello ------------------------------------------------------------------------


async def test_no_hello_within_auth_timeout_closes_4002(one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__AUTH_TIMEOUT_S": "1"}) as chat:
        t0 = time.monotonic()
        silent = await chat.raw()
        code = await silent.wait_closed(timeout=6)
        elapsed = time.monotonic() - t0
        assert code == CLOSE_HELLO_TIMEOUT
        assert 0.8 <= elapsed < 4, elapsed
        assert silent.frames == []  # nothing at all before hello

        # A hello inside the window is fine, and the timeout no longer applies after it.
        ws = await chat.connect(await chat.api.register())
        await asyncio.sleep(1.5)
        await ws.ping()


async def test_any_other_frame_before_hello_closes_4001(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        user = await chat.api.register()
        firsts: list[Any] = [
            {"type": "ping", "id": "p1"},
            {"type": "send", "room_id": "x", "client_msg_id": "c1", "body": "hi"},
            {"type": "history", "room_id": "x"},
            {"type": "welcome"},
            "not json at all",
            "[]",
            {"token": user.token},  # a hello without its type is not a hello
            b'{"type":"hello"}',  # binary
        ]
        for first in firsts:
            ws = await chat.raw()
            await ws.send_raw(first)
            assert await ws.wait_closed() == CLOSE_UNAUTHORIZED, first
            assert not ws.of_type("welcome") and not ws.of_type("pong"), (first, ws.frames)


async def test_bad_missing_or_revoked_token_gets_unauthorized_then_4001(
        valkey: ValkeyProcess, one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        user = await chat.api.register()
        revoked = await chat.api.login(user.username)
        status, _ = await chat.api.call("POST", "/api/v1/logout", user=revoked)
        assert status == 204
        tampered = user.token[:-3] + ("AAA" if not user.token.endswith("AAA") else "BBB")
        async with valkey.client(decode_responses=True) as r:
            secret = await r.hget(keys.META, "secret")
        expired = URLSafeTimedSerializer(secret, salt=TOKEN_SALT, signer=OldSigner).dumps(
            [user.user_id, user.session_id])
        payload, _, signature = user.token.rpartition(".")
        other_payload = payload[:-1] + ("A" if payload[-1] != "A" else "B") + "." + signature
        hellos: list[dict[str, Any]] = [
            {"type": "hello", "id": "h-missing"},
            {"type": "hello", "id": "h-empty", "token": ""},
            {"type": "hello", "id": "h-garbage", "token": "not-a-token"},
            {"type": "hello", "id": "h-tampered", "token": tampered},
            {"type": "hello", "id": "h-payload", "token": other_payload},
            {"type": "hello", "id": "h-revoked", "token": revoked.token},
            {"type": "hello", "id": "h-expired", "token": expired},
            {"type": "hello", "id": "h-int", "token": 12345},
        ]
        for hello in hellos:
            ws = await chat.raw()
            await ws.send(hello)
            assert await ws.wait_closed() == CLOSE_UNAUTHORIZED, hello
            assert not ws.of_type("welcome"), (hello, ws.frames)
            errors = ws.of_type("error")
            # "an error unauthorized frame may come first": if it comes, it is this one.
            assert len(errors) <= 1, ws.frames
            for err in errors:
                assert err["code"] == "unauthorized" and err["id"] == hello["id"], err
                assert isinstance(err["message"], str)

        # A bad token in the header, and nothing in hello, is refused the same way.
        ws = await chat.raw(headers={"Authorization": f"Bearer {tampered}"})
        await ws.send({"type": "hello"})
        assert await ws.wait_closed() == CLOSE_UNAUTHORIZED
        assert not ws.of_type("welcome")

        # The genuine token still works (the failures above did not poison anything).
        ok = await chat.connect(user)
        await ok.ping()


async def test_unauthorized_error_frame_is_a_text_frame(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        ws = await chat.http.ws_connect(chat.node.ws_url)
        await ws.send_str('{"type": "hello", "id": "h1", "token": "forged"}')
        received = [(msg.type, msg.data) async for msg in ws]
        assert ws.close_code == CLOSE_UNAUTHORIZED
        # Whatever comes before the close is JSON text (PROTOCOL.md section 1).
        assert all(kind == aiohttp.WSMsgType.TEXT for kind, _ in received), received
        frames = [json.loads(data) for _, data in received]
        assert len(frames) <= 1, frames
        for frame in frames:
            assert (frame["type"], frame["id"], frame["code"]) == ("error", "h1",
                                                                   "unauthorized")


async def test_token_in_authorization_header_with_bare_hello(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        alice, bob = await chat.api.users(2)
        room = await chat.api.direct(alice, bob)
        ws = await chat.raw(headers=alice.headers)
        await ws.send({"type": "hello"})
        welcome = await ws.wait_type("welcome")
        assert welcome["user_id"] == alice.user_id
        assert welcome["session_id"] == alice.session_id
        assert [r["room_id"] for r in welcome["rooms"]] == [room]
        # A working session: sends are acked and the message comes back.
        ack = await ws.send_message(room, "via header")
        assert ack["type"] == "ack" and ack["seq"] == 1
        assert [m["body"] for m in await ws.wait_messages(room, 1)] == ["via header"]

        # The header is still not a hello: another frame first closes with 4001.
        early = await chat.raw(headers=alice.headers)
        await early.send({"type": "ping", "id": "p"})
        assert await early.wait_closed() == CLOSE_UNAUTHORIZED
        assert not early.of_type("pong")


async def test_welcome_lists_identity_and_every_room_with_positions(one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__HEARTBEAT_S": "7.5"}) as chat:
        alice, bob, carol = await chat.api.users(3)
        direct = await chat.api.direct(alice, bob)
        group = await chat.api.group(alice, [bob, carol])
        await chat.api.group(bob, [carol])  # not alice's
        empty = await chat.api.group(alice, [], name="alone")

        sender = await chat.connect(bob)
        for i in range(3):
            assert (await sender.send_message(direct, f"d{i}"))["seq"] == i + 1
        for i in range(5):
            assert (await sender.send_message(group, f"g{i}"))["seq"] == i + 1

        first = await chat.connect(alice)
        await first.send({"type": "delivered", "room_id": group, "seq": 4})
        await first.send({"type": "read", "room_id": group, "seq": 2})
        await first.send({"type": "read", "room_id": direct, "seq": 3})
        await first.ping()  # processed in order: the marks are stored by now

        ws = await chat.connect(alice)
        welcome = ws.of_type("welcome")[0]
        assert ws.frames[0] is welcome  # the first frame of the connection
        assert welcome["user_id"] == alice.user_id
        assert welcome["session_id"] == alice.session_id
        assert welcome["node_id"] == chat.node.node_id
        assert welcome["heartbeat_s"] == 7.5
        rooms = {r["room_id"]: r for r in welcome["rooms"]}
        assert len(welcome["rooms"]) == 3
        assert rooms == {
            direct: {"room_id": direct, "last_seq": 3, "read_seq": 3, "delivered_seq": 3},
            group: {"room_id": group, "last_seq": 5, "read_seq": 2, "delivered_seq": 4},
            empty: {"room_id": empty, "last_seq": 0, "read_seq": 0, "delivered_seq": 0},
        }


async def test_welcome_is_the_first_frame_even_in_a_busy_room(one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__FRAME_RATE_PER_S": "100000",
                              "CHATD_LIMITS__FRAME_BURST": "100000"}) as chat:
        alice, carol = await chat.api.users(2)
        room = await chat.api.group(carol, [alice])
        carol_ws = await chat.connect(carol)
        busy = True

        async def keep_typing() -> None:
            while busy:
                for _ in range(20):
                    await carol_ws.send({"type": "typing", "room_id": room, "active": True})
                await asyncio.sleep(0)

        typing = asyncio.create_task(keep_typing())
        firsts = []
        try:
            for _ in range(50):
                ws = await chat.connect(alice)
                firsts.append(ws.frames[0]["type"])
                await ws.close()
                if firsts[-1] != "welcome":
                    break
        finally:
            busy = False
            await typing
        assert set(firsts) == {"welcome"}, firsts


async def test_second_hello_after_welcome_is_bad_request(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        user = await chat.api.register()
        ws = await chat.connect(user)
        reply = await ws.request({"type": "hello", "token": user.token})
        assert reply["type"] == "error" and reply["code"] == "bad_request", reply
        assert len(ws.of_type("welcome")) == 1
        await ws.ping()


# --- limits -------------------------------------------------------------------------


async def test_per_user_connection_limit_closes_4029(one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__MAX_CONNECTIONS_PER_USER": "2"}) as chat:
        alice, bob = await chat.api.users(2)
        room = await chat.api.direct(alice, bob)
        one = await chat.connect(alice)
        two = await chat.connect(alice)

        third = await chat.connect(alice, welcome=False)
        assert await third.wait_closed() == CLOSE_TOO_MANY
        assert not third.of_type("welcome"), third.frames

        # The refused one did not take a slot, and the others are unaffected.
        await one.ping()
        await two.ping()
        bob_ws = await chat.connect(bob)  # another user has its own limit
        ack = await bob_ws.send_message(room, "still works")
        for w in (one, two):
            assert [m["body"] for m in await w.wait_messages(room, 1)] == ["still works"]

        # Freeing a slot lets a new connection in.
        await one.close()
        again = await connect_once_a_slot_is_free(chat, alice,
                                                  "no connection allowed after closing one")
        assert ack["seq"] == 1
        await again.ping()
        # ... and the limit holds again.
        fourth = await chat.connect(alice, welcome=False)
        assert await fourth.wait_closed() == CLOSE_TOO_MANY
        # A connection the server closes (4008 here) frees its slot too.
        for _ in range(10):
            await two.ws.send_str("not json")
        assert await two.wait_closed() == CLOSE_POLICY
        await connect_once_a_slot_is_free(chat, alice, "the closed connection kept its slot")


async def test_frame_over_max_frame_bytes_closes_1009(one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__MAX_FRAME_BYTES": "2048"}) as chat:
        alice, bob = await chat.api.users(2)
        room = await chat.api.direct(alice, bob)
        ws = await chat.connect(alice)
        other = await chat.connect(bob)
        # Just under the limit is a normal frame.
        ack = await ws.send_message(room, "x" * 1800)
        assert ack["type"] == "ack" and ack["seq"] == 1, ack

        await ws.send({"type": "send", "id": "big", "room_id": room, "client_msg_id": "big",
                       "body": "y" * 3000})
        assert await ws.wait_closed() == CLOSE_TOO_BIG
        assert not [f for f in ws.frames if f.get("id") == "big"]
        # Not stored, and the other client goes on.
        assert [m["seq"] for m in await chat.api.messages(bob, room)] == [1]
        ack = await other.send_message(room, "after")
        assert ack["seq"] == 2

        # Before hello too.
        early = await chat.raw()
        await early.ws.send_str("z" * 4096)
        assert await early.wait_closed() == CLOSE_TOO_BIG


async def test_ping_gets_pong_echoing_id(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        ws = await chat.connect(await chat.api.register())
        for rid in ("a", "ping-1", "x" * 64):
            await ws.send({"type": "ping", "id": rid})
            pong = await ws.wait_for(lambda f, rid=rid: f.get("id") == rid)
            assert pong == {"type": "pong", "id": rid}
        await ws.send({"type": "ping"})
        pong = await ws.wait_for(lambda f: f.get("type") == "pong" and "id" not in f)
        assert pong == {"type": "pong"}


async def test_per_connection_frame_rate_limit(one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__FRAME_RATE_PER_S": "1",
                              "CHATD_LIMITS__FRAME_BURST": "5"}) as chat:
        user = await chat.api.register()
        ws = await chat.connect(user)
        other = await chat.connect(user)  # its own budget
        for i in range(8):
            await ws.send({"type": "ping", "id": f"p{i}"})
        replies = [await ws.wait_for(lambda f, i=i: f.get("id") == f"p{i}") for i in range(8)]
        assert [r["type"] for r in replies[:5]] == ["pong"] * 5, replies
        for r in replies[5:]:
            assert r["type"] == "error" and r["code"] == "rate_limited", r
            assert r["retry_after_ms"] > 0
        await other.ping()
        await asyncio.sleep(replies[-1]["retry_after_ms"] / 1000 + 0.05)
        await ws.ping()  # refilled; the connection stayed open


async def test_origin_allow_list_on_upgrade(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        user = await chat.api.register()
        try:
            await chat.raw(headers={"Origin": "https://evil.example"})
            raise AssertionError("a foreign Origin was let in")
        except aiohttp.WSServerHandshakeError as e:
            assert e.status == 403
        await chat.connect(user, headers={"Origin": chat.node.url})


async def test_send_rate_limit_refuses_without_storing(one_node: OneNode) -> None:
    async with one_node.chat({"CHATD_LIMITS__SEND_RATE_PER_S": "1",
                              "CHATD_LIMITS__SEND_BURST": "3"}) as chat:
        alice, bob = await chat.api.users(2)
        room = await chat.api.direct(alice, bob)
        ws = await chat.connect(alice)
        bob_ws = await chat.connect(bob)

        cmids = [f"burst-{i}" for i in range(6)]
        for i, cmid in enumerate(cmids):
            await ws.send({"type": "send", "id": f"s{i}", "room_id": room,
                           "client_msg_id": cmid, "body": f"m{i}"})
        replies = [await ws.wait_for(lambda f, i=i: f.get("id") == f"s{i}") for i in range(6)]
        acks, refused = replies[:3], replies[3:]
        assert [(r["type"], r["seq"], r["duplicate"]) for r in acks] == [
            ("ack", 1, False), ("ack", 2, False), ("ack", 3, False)], replies
        for r in refused:
            assert r["type"] == "error" and r["code"] == "rate_limited", r
            assert isinstance(r["retry_after_ms"], int) and r["retry_after_ms"] > 0, r

        # The bucket is empty now: a repeat of an acked message is still answered.
        dup = await ws.request({"type": "send", "room_id": room, "client_msg_id": cmids[0],
                                "body": "m0"})
        assert dup["type"] == "ack", dup
        assert (dup["seq"], dup["ts"], dup["duplicate"]) == (1, acks[0]["ts"], True)
        # The HTTP send shares the bucket: 429 with retry_after_ms and Retry-After.
        async with chat.http.post(f"{chat.node.url}/api/v1/rooms/{room}/messages",
                                  headers=alice.headers,
                                  json={"client_msg_id": "http-1", "body": "x"}) as resp:
            body = await resp.json()
            assert resp.status == 429, body
            assert body["error"]["code"] == "rate_limited"
            assert body["error"]["retry_after_ms"] > 0
            assert int(resp.headers["Retry-After"]) >= 1

        # Nothing of the refused ones was stored or delivered.
        assert [m["client_msg_id"] for m in await chat.api.messages(bob, room)] == cmids[:3]

        # After waiting, the same client_msg_ids are free: stored as new messages.
        seqs = []
        for i, cmid in enumerate(cmids[3:], start=3):
            while True:
                reply = await ws.request({"type": "send", "room_id": room,
                                          "client_msg_id": cmid, "body": f"m{i}"})
                if reply["type"] == "ack":
                    break
                assert reply["code"] == "rate_limited", reply
                await asyncio.sleep(reply["retry_after_ms"] / 1000)
            assert reply["duplicate"] is False, reply
            seqs.append(reply["seq"])
        assert seqs == [4, 5, 6]
        got = await bob_ws.wait_messages(room, 6)
        assert [(m["seq"], m["client_msg_id"], m["body"]) for m in got] == [
            (i + 1, cmid, f"m{i}") for i, cmid in enumerate(cmids)]


# --- idempotency --------------------------------------------------------------------


async def test_same_client_msg_id_twice_over_ws_is_stored_and_delivered_once(
        one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        alice, bob, carol = await chat.api.users(3)
        room = await chat.api.group(alice, [bob, carol])
        other_room = await chat.api.direct(alice, bob)
        ws = await chat.connect(alice)
        bob_ws = await chat.connect(bob)
        carol_ws = await chat.connect(carol)

        first = await ws.send_message(room, "once", client_msg_id="same-id")
        again = await ws.send_message(room, "once", client_msg_id="same-id")
        assert (first["seq"], first["duplicate"]) == (1, False)
        assert again["type"] == "ack" and again["client_msg_id"] == "same-id"
        assert (again["seq"], again["ts"], again["duplicate"]) == (1, first["ts"], True)
        # A different body does not make it new: the key is (sender, room, client_msg_id).
        third = await ws.send_message(room, "changed", client_msg_id="same-id")
        assert (third["seq"], third["duplicate"]) == (1, True)

        # The same id from another sender, or in another room, is another message.
        by_bob = await bob_ws.send_message(room, "bob's", client_msg_id="same-id")
        assert (by_bob["seq"], by_bob["duplicate"]) == (2, False)
        elsewhere = await ws.send_message(other_room, "elsewhere", client_msg_id="same-id")
        assert (elsewhere["seq"], elsewhere["duplicate"]) == (1, False)

        stored = await chat.api.messages(carol, room)
        assert [(m["seq"], m["sender_id"], m["body"]) for m in stored] == [
            (1, alice.user_id, "once"), (2, bob.user_id, "bob's")]
        # Every connection got seq 1 exactly once (seq 2 came after it through the same path).
        for w in (ws, bob_ws, carol_ws):
            got = await w.wait_messages(room, 2)
            await asyncio.sleep(0.2)
            assert [m["seq"] for m in w.messages(room)] == [1, 2], w.messages(room)
            assert got[0]["body"] == "once"


async def test_same_client_msg_id_twice_over_http_gives_200_duplicate(
        one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        alice, bob = await chat.api.users(2)
        room = await chat.api.direct(alice, bob)
        bob_ws = await chat.connect(bob)
        path = f"/api/v1/rooms/{room}/messages"

        status, created = await chat.api.call("POST", path, user=alice,
                                              json_body={"client_msg_id": "h1", "body": "hello"})
        assert status == 201, created
        assert created["seq"] == 1 and created["body"] == "hello"
        assert created["sender_id"] == alice.user_id and created["client_msg_id"] == "h1"
        assert created.get("duplicate", False) is False
        status, dup = await chat.api.call("POST", path, user=alice,
                                          json_body={"client_msg_id": "h1", "body": "hello"})
        assert status == 200, dup
        assert dup["duplicate"] is True
        assert (dup["seq"], dup["ts"], dup["body"]) == (1, created["ts"], "hello")

        # Same pipeline as the WebSocket: a WS send with that id is a duplicate too.
        alice_ws = await chat.connect(alice)
        ack = await alice_ws.send_message(room, "hello", client_msg_id="h1")
        assert (ack["seq"], ack["duplicate"]) == (1, True)
        ack = await alice_ws.send_message(room, "next", client_msg_id="h2")
        assert (ack["seq"], ack["duplicate"]) == (2, False)

        assert [m["seq"] for m in await chat.api.messages(bob, room)] == [1, 2]
        await bob_ws.wait_messages(room, 2)
        await asyncio.sleep(0.2)
        assert [m["seq"] for m in bob_ws.messages(room)] == [1, 2]


# --- typing -------------------------------------------------------------------------


async def test_typing_goes_to_the_other_members_only(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        alice, bob, carol, dave = await chat.api.users(4)
        room = await chat.api.group(alice, [bob, carol])
        await chat.api.group(dave, [alice])  # dave shares another room with alice, not this one
        alice1 = await chat.connect(alice)
        alice2 = await chat.connect(alice)
        bob_ws = await chat.connect(bob)
        carol_ws = await chat.connect(carol)
        dave_ws = await chat.connect(dave)

        await alice1.send({"type": "typing", "room_id": room, "active": True})
        for w in (bob_ws, carol_ws):
            frame = await w.wait_type("typing", user_id=alice.user_id)
            assert frame == {"type": "typing", "room_id": room, "user_id": alice.user_id,
                             "active": True}
        await alice1.send({"type": "typing", "room_id": room, "active": False})
        for w in (bob_ws, carol_ws):
            await w.wait_type("typing", user_id=alice.user_id, active=False)

        # A non-member: not_found (echoing id), and nobody in the room hears it.
        reply = await dave_ws.request({"type": "typing", "room_id": room, "active": True})
        assert reply["type"] == "error" and reply["code"] == "not_found", reply

        # Bob types afterwards: when alice's connections see it, anything of her own
        # would have arrived already (same room, same path).
        await bob_ws.send({"type": "typing", "room_id": room, "active": True})
        for w in (alice1, alice2):
            await w.wait_type("typing", user_id=bob.user_id)
            assert [f["user_id"] for f in w.of_type("typing")] == [bob.user_id], w.frames
        await carol_ws.wait_type("typing", user_id=bob.user_id)
        assert [f["user_id"] for f in bob_ws.of_type("typing")] == [alice.user_id] * 2
        assert [f["user_id"] for f in carol_ws.of_type("typing")] == [
            alice.user_id, alice.user_id, bob.user_id]
        assert not dave_ws.of_type("typing")
        # Typing is not stored.
        assert await chat.api.messages(bob, room) == []


# --- heartbeat ----------------------------------------------------------------------------


async def test_a_peer_that_stops_answering_pings_is_dropped_and_goes_offline(
        one_node: OneNode) -> None:
    """PROTOCOL.md section 3: servers ping every `heartbeat_s` and drop connections that do
    not answer. A client that still reads but never pongs is cut; one that pongs stays."""
    async with one_node.chat({"CHATD_LIMITS__HEARTBEAT_S": "1"}, clean_logs=False) as chat:
        alice, bob = await chat.api.users(2)
        room = await chat.api.group(alice, [bob])
        bob_ws = await chat.connect(bob)  # aiohttp answers pings for bob
        mute = await chat.connect(alice, autoping=False)  # pings go unanswered
        await bob_ws.wait_type("presence", user_id=alice.user_id, online=True)
        t0 = time.monotonic()

        await mute.wait_closed(timeout=10)
        dropped_after = time.monotonic() - t0
        # Pinged after 0.75-1 heartbeat of silence, dropped half a heartbeat later at the
        # next sweep (every quarter heartbeat): 1.25-1.75 heartbeats (chatd/heartbeat.py).
        assert dropped_after < 5, dropped_after
        assert await metric(chat.http, chat.node.url, "chatd_heartbeat_drops_total") == 1
        await bob_ws.wait_type("presence", user_id=alice.user_id, online=False, timeout=10)

        await asyncio.sleep(max(0.0, 3.5 - (time.monotonic() - t0)))  # 3+ heartbeats
        assert bob_ws.closed_code is None
        ack = await bob_ws.send_message(room, "still here")
        assert ack["type"] == "ack", ack


async def test_client_pings_are_answered_before_hello_and_after_welcome(
        one_node: OneNode) -> None:
    """RFC 6455 5.5.2: a ping gets a pong with its payload. chatd answers pings itself
    (autoping off, chatd/heartbeat.py), while it waits for hello and once live."""
    async with one_node.chat(clean_logs=False) as chat:
        alice = await chat.api.register()
        ws = await chat.http.ws_connect(chat.node.ws_url, autoping=False)
        try:
            await ws.ping(b"before-hello")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"before-hello")
            await ws.send_json({"type": "hello", "token": alice.token})
            assert json.loads((await ws.receive(timeout=5)).data)["type"] == "welcome"
            await ws.ping(b"live")
            msg = await ws.receive(timeout=5)
            while msg.type == aiohttp.WSMsgType.TEXT:  # presence and the like
                msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"live")
            # The pings were not protocol frames: no error came back for them.
            await ws.send_json({"type": "ping", "id": "p1"})
            reply = json.loads((await ws.receive(timeout=5)).data)
            assert reply == {"type": "pong", "id": "p1"}, reply
        finally:
            await ws.close()
