"""History paging (PROTOCOL.md section 2 "Paging", section 3 `history` frame):
GET /rooms/{id}/messages and the `history` frame with after_seq, before_seq or neither,
limit bounds, has_more at both ends, ascending order; GET .../messages/{seq}.
One real chatd node on a real Valkey."""

from __future__ import annotations

import secrets
from typing import Any

from tests.client import Api, User, Ws
from tests.conftest import OneNode
from tests.harness import ChatdNodes

COUNT = 7
MESSAGE_FIELDS = {"room_id", "seq", "sender_id", "client_msg_id", "body", "ts"}


async def fill(api: Api, sender: User, room: str, count: int) -> None:
    for i in range(1, count + 1):
        status, body = await api.call("POST", f"/api/v1/rooms/{room}/messages", user=sender,
                                      json_body={"client_msg_id": f"c{i}", "body": f"m{i}"})
        assert status == 201 and body["seq"] == i, (status, body)


async def page(api: Api, user: User, room: str, query: str) -> tuple[list[int], bool]:
    body = await api.get(f"/api/v1/rooms/{room}/messages{query}", user)
    assert set(body) == {"messages", "has_more"}, body
    for m in body["messages"]:
        assert set(m) >= MESSAGE_FIELDS and m["room_id"] == room, m
        assert m["body"] == f"m{m['seq']}" and m["client_msg_id"] == f"c{m['seq']}", m
    return [m["seq"] for m in body["messages"]], body["has_more"]


async def ws_page(ws: Ws, frame: dict[str, Any]) -> dict[str, Any]:
    return await ws.request({"type": "history", **frame})


# (query, expected seqs, expected has_more) over a room of COUNT = 7 messages.
HTTP_PAGES = [
    # after_seq: the lowest `limit` above A; has_more = more above the page.
    ("?after_seq=0&limit=3", [1, 2, 3], True),
    ("?after_seq=3&limit=3", [4, 5, 6], True),
    ("?after_seq=4&limit=3", [5, 6, 7], False),
    ("?after_seq=5&limit=3", [6, 7], False),
    ("?after_seq=6&limit=1", [7], False),
    ("?after_seq=7", [], False),
    ("?after_seq=100", [], False),
    ("?after_seq=0", [1, 2, 3, 4, 5, 6, 7], False),
    ("?after_seq=0&limit=7", [1, 2, 3, 4, 5, 6, 7], False),
    ("?after_seq=0&limit=6", [1, 2, 3, 4, 5, 6], True),
    # before_seq: the highest `limit` below B; has_more = more below the page.
    ("?before_seq=8&limit=3", [5, 6, 7], True),
    ("?before_seq=100&limit=3", [5, 6, 7], True),
    ("?before_seq=5&limit=3", [2, 3, 4], True),
    ("?before_seq=4&limit=3", [1, 2, 3], False),
    ("?before_seq=3&limit=3", [1, 2], False),
    ("?before_seq=2", [1], False),
    ("?before_seq=1", [], False),
    ("?before_seq=0", [], False),
    ("?before_seq=8&limit=7", [1, 2, 3, 4, 5, 6, 7], False),
    ("?before_seq=8&limit=6", [2, 3, 4, 5, 6, 7], True),
    # neither: the latest `limit`; has_more = older ones exist.
    ("", [1, 2, 3, 4, 5, 6, 7], False),
    ("?limit=3", [5, 6, 7], True),
    ("?limit=1", [7], True),
    ("?limit=7", [1, 2, 3, 4, 5, 6, 7], False),
    ("?limit=200", [1, 2, 3, 4, 5, 6, 7], False),
]


async def test_http_paging_after_before_and_latest(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        api = chat.api
        alice, bob = await api.users(2)
        room = await api.direct(alice, bob)
        assert await page(api, bob, room, "") == ([], False)  # empty room
        assert await page(api, bob, room, "?before_seq=5") == ([], False)
        await fill(api, alice, room, COUNT)
        failures = []
        for query, seqs, more in HTTP_PAGES:
            got = await page(api, bob, room, query)
            if got != (seqs, more):
                failures.append(f"{query!r}: got {got}, want {(seqs, more)}")
        assert not failures, "\n".join(failures)

        # Walking the whole room both ways gives every seq once, in order.
        seen, after, more = [], 0, True
        while more:
            seqs, more = await page(api, bob, room, f"?after_seq={after}&limit=2")
            seen += seqs
            after = seqs[-1] if seqs else after
        assert seen == list(range(1, COUNT + 1))
        seen, before, more = [], None, True
        while more:
            query = "?limit=3" if before is None else f"?before_seq={before}&limit=3"
            seqs, more = await page(api, bob, room, query)
            seen = seqs + seen
            before = seqs[0]
        assert seen == list(range(1, COUNT + 1))


async def test_http_paging_rejects_bad_parameters_and_non_members(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        api = chat.api
        alice, bob, carol = await api.users(3)
        room = await api.direct(alice, bob)
        await fill(api, alice, room, 3)
        base = f"/api/v1/rooms/{room}/messages"
        for query in ("?limit=0", "?limit=201", "?limit=-1", "?limit=abc", "?limit=",
                      "?limit=2.5", "?after_seq=1&before_seq=3", "?after_seq=-1",
                      "?before_seq=-2", "?after_seq=x", "?after_seq=0&before_seq=0"):
            status, body = await api.call("GET", base + query, user=bob)
            assert status == 400 and body["error"]["code"] == "bad_request", (query, body)
        for limit in (1, 200):
            await api.get(f"{base}?limit={limit}", bob)
        # Not a member, unknown room, no token.
        for user, room_id in ((carol, room), (bob, secrets.token_urlsafe(20)),
                              (bob, "no-such-room")):
            status, body = await api.call("GET", f"/api/v1/rooms/{room_id}/messages",
                                          user=user)
            assert status == 404 and body["error"]["code"] == "not_found", (room_id, body)
        status, body = await api.call("GET", base)
        assert status == 401 and body["error"]["code"] == "unauthorized"


async def test_history_frame_pages_and_echoes_id(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        api = chat.api
        alice, bob, carol = await api.users(3)
        room = await api.direct(alice, bob)
        ws = await chat.connect(bob)
        outsider = await chat.connect(carol)
        reply = await ws_page(ws, {"room_id": room})
        assert (reply["messages"], reply["has_more"]) == ([], False)
        await fill(api, alice, room, COUNT)

        cases: list[tuple[dict[str, Any], list[int], bool]] = [
            ({}, [1, 2, 3, 4, 5, 6, 7], False),  # after_seq defaults to 0, limit to 50
            ({"limit": 3}, [1, 2, 3], True),
            ({"after_seq": 0, "limit": 3}, [1, 2, 3], True),
            ({"after_seq": 3, "limit": 3}, [4, 5, 6], True),
            ({"after_seq": 4, "limit": 3}, [5, 6, 7], False),
            ({"after_seq": 6, "limit": 1}, [7], False),
            ({"after_seq": 7}, [], False),
            ({"after_seq": 2, "limit": 200}, [3, 4, 5, 6, 7], False),
        ]
        failures = []
        for extra, seqs, more in cases:
            reply = await ws_page(ws, {"room_id": room, **extra})
            assert reply["type"] == "history" and reply["room_id"] == room, reply
            assert set(reply) == {"type", "id", "room_id", "messages", "has_more"}, reply
            for m in reply["messages"]:
                assert set(m) >= MESSAGE_FIELDS and m["body"] == f"m{m['seq']}", m
            got = ([m["seq"] for m in reply["messages"]], reply["has_more"])
            if got != (seqs, more):
                failures.append(f"{extra}: got {got}, want {(seqs, more)}")
        assert not failures, "\n".join(failures)
        # The same page as over HTTP.
        reply = await ws_page(ws, {"room_id": room, "after_seq": 2, "limit": 2})
        body = await api.get(f"/api/v1/rooms/{room}/messages?after_seq=2&limit=2", bob)
        assert reply["messages"] == body["messages"]

        for extra in ({"limit": 0}, {"limit": 201}, {"after_seq": -1}):
            reply = await ws_page(ws, {"room_id": room, **extra})
            assert reply["type"] == "error" and reply["code"] == "bad_request", (extra, reply)
        for who, room_id in ((outsider, room), (ws, secrets.token_urlsafe(20))):
            reply = await ws_page(who, {"room_id": room_id})
            assert reply["type"] == "error" and reply["code"] == "not_found", reply
        assert not outsider.messages()
        # The live messages came once each; history replies added no `message` frames.
        await ws.wait_messages(room, COUNT)
        assert [m["seq"] for m in ws.messages(room)] == list(range(1, COUNT + 1))


async def test_get_one_message(one_node: OneNode) -> None:
    async with one_node.chat() as chat:
        api = chat.api
        alice, bob, carol = await api.users(3)
        room = await api.direct(alice, bob)
        await fill(api, alice, room, 2)
        status, body = await api.call("GET", f"/api/v1/rooms/{room}/messages/2", user=bob)
        assert status == 200, body
        assert {k: body[k] for k in MESSAGE_FIELDS - {"ts"}} == {
            "room_id": room, "seq": 2, "sender_id": alice.user_id, "client_msg_id": "c2",
            "body": "m2"}
        assert body["status"] == "sent"
        for seq in ("0", "3", "1000"):
            status, body = await api.call("GET", f"/api/v1/rooms/{room}/messages/{seq}",
                                          user=bob)
            assert status == 404 and body["error"]["code"] == "not_found", (seq, body)
        status, body = await api.call("GET", f"/api/v1/rooms/{room}/messages/x", user=bob)
        assert status == 400 and body["error"]["code"] == "bad_request", body
        status, body = await api.call("GET", f"/api/v1/rooms/{room}/messages/1", user=carol)
        assert status == 404 and body["error"]["code"] == "not_found", body


async def test_get_one_message_with_out_of_range_seq_is_a_client_error(
        one_node: OneNode, chatd_nodes: ChatdNodes) -> None:
    chatd_nodes.report_log_problems = False  # the traceback is asserted on below
    async with one_node.chat(clean_logs=False) as chat:
        api = chat.api
        alice, bob = await api.users(2)
        room = await api.direct(alice, bob)
        await fill(api, alice, room, 1)
        for seq in ("-1", "-5", str(2**64), "99999999999999999999999"):
            status, body = await api.call("GET", f"/api/v1/rooms/{room}/messages/{seq}",
                                          user=bob)
            assert status in (400, 404), (seq, status, body)
            assert body["error"]["code"] in ("bad_request", "not_found"), (seq, body)
    assert "Traceback" not in chat.node.log_text()


async def test_reads_are_rate_limited_per_user(one_node: OneNode) -> None:
    """Every authenticated GET and every `history` frame take a token from one bucket per
    user (`limits.read_rate_per_s`, `read_burst`): past it 429 `rate_limited` with
    Retry-After (an error frame with `retry_after_ms` on the WebSocket), before
    membership is checked; sending and another user's reads are untouched."""
    async with one_node.chat({"CHATD_LIMITS__READ_BURST": "2",
                              "CHATD_LIMITS__READ_RATE_PER_S": "0.01"}) as chat:
        api = chat.api
        alice, bob = await api.users(2)
        room = await api.direct(alice, bob)
        ws = await chat.connect(alice)
        await api.get("/api/v1/me", alice)  # 1
        assert (await ws_page(ws, {"room_id": room}))["type"] == "history"  # 2
        for path in ("/me", f"/users?username={bob.username}", "/rooms", f"/rooms/{room}",
                     f"/rooms/{room}/messages", f"/rooms/{room}/messages/1",
                     f"/rooms/{room}/receipts", f"/rooms/{secrets.token_urlsafe(20)}"):
            async with api.session.get(f"{api.base}/api/v1{path}", headers=alice.headers) as r:
                error = (await r.json())["error"]
                assert (r.status, error["code"]) == (429, "rate_limited"), (path, error)
                assert error["retry_after_ms"] > 0 and int(r.headers["Retry-After"]) >= 1
        reply = await ws_page(ws, {"room_id": room})
        assert (reply["type"], reply["code"]) == ("error", "rate_limited"), reply
        assert reply["retry_after_ms"] > 0
        ack = await ws.send_message(room, "still sending")
        assert ack["type"] == "ack" and ack["seq"] == 1, ack
        assert [m["body"] for m in await api.messages(bob, room)] == ["still sending"]
