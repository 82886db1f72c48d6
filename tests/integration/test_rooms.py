"""Rooms over HTTP, in-process apps on a real Valkey: authorization, validation, the
membership flows and a crash between the room side and the user side."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from chatd import rooms
from chatd.appkeys import NODE
from tests.integration.test_accounts import (  # noqa: F401 (the fixtures are used by name)
    Client,
    MakeClient,
    User,
    call,
    client_fixture,
    error_code,
    make_client_fixture,
    new_user,
)

CALLERS = ("anonymous", "bad token", "non-member", "member", "admin", "owner")


async def create(client: Client, user: User, body: dict[str, Any]) -> tuple[int, Any]:
    return await call(client, "POST", "/rooms", body, token=user.token)


async def group(client: Client, owner: User, *members: User, name: str = "team") -> str:
    status, room = await create(client, owner, {"kind": "group", "name": name,
                                                "members": [m.user_id for m in members]})
    assert status == 201, room
    return str(room["room_id"])


async def room_ids(client: Client, user: User) -> list[str]:
    status, body = await call(client, "GET", "/rooms", token=user.token)
    assert status == 200
    return [r["room_id"] for r in body["rooms"]]


# --- the authorization matrix ----------------------------------------------------------

async def test_authorization_matrix(make_client: MakeClient) -> None:
    # Hundreds of room changes by the same few users: clear of limits.room_ops_burst.
    client = await make_client(**{"limits.room_ops_burst": 100_000})
    owner, admin, member, outsider = [await new_user(client, n)
                                      for n in ("owner", "admin", "member", "outsider")]
    spare = [await new_user(client, f"spare{i}") for i in range(2)]
    room_id = await group(client, owner, member)
    assert (await call(client, "POST", f"/rooms/{room_id}/members",
                       {"user_id": admin.user_id, "role": "admin"}, token=owner.token))[0] == 204
    direct = (await create(client, owner, {"kind": "direct", "members": [member.user_id]}))[1]
    tokens = {"anonymous": None, "bad token": owner.token[:-3] + "xyz",
              "non-member": outsider.token, "member": member.token, "admin": admin.token,
              "owner": owner.token}

    async def reset() -> None:
        """spare[0] a member, spare[1] not, before every call."""
        await call(client, "POST", f"/rooms/{room_id}/members", {"user_id": spare[0].user_id},
                   token=owner.token)
        await call(client, "DELETE", f"/rooms/{room_id}/members/{spare[1].user_id}",
                   token=owner.token)

    missing = secrets.token_urlsafe(20)
    requests = {
        "get": ("GET", "/rooms/{}", None),
        "add": ("POST", "/rooms/{}/members", {"user_id": spare[1].user_id}),
        "remove": ("DELETE", f"/rooms/{{}}/members/{spare[0].user_id}", None),
    }
    actual: dict[tuple[str, str, str], int] = {}
    for target, rid in (("group", room_id), ("direct", direct["room_id"]), ("missing", missing)):
        for name, (method, path, body) in requests.items():
            for caller in CALLERS:
                await reset()
                status, reply = await call(client, method, path.format(rid), body,
                                           token=tokens[caller])
                actual[target, name, caller] = status
                if status >= 400:
                    assert reply["error"]["code"] and reply["error"]["message"]
        for caller in CALLERS:
            status, _ = await call(client, "GET", "/rooms", token=tokens[caller])
            actual[target, "list", caller] = status

    def row(*statuses: int) -> dict[str, int]:
        return dict(zip(CALLERS, statuses, strict=True))

    expected_rows = {
        ("group", "get"): row(401, 401, 404, 200, 200, 200),
        ("group", "add"): row(401, 401, 404, 403, 204, 204),
        ("group", "remove"): row(401, 401, 404, 403, 204, 204),
        # The admin is not in the direct room, so it is a non-member there.
        ("direct", "get"): row(401, 401, 404, 200, 404, 200),
        ("direct", "add"): row(401, 401, 404, 403, 404, 403),
        ("direct", "remove"): row(401, 401, 404, 403, 404, 403),
        ("missing", "get"): row(401, 401, 404, 404, 404, 404),
        ("missing", "add"): row(401, 401, 404, 404, 404, 404),
        ("missing", "remove"): row(401, 401, 404, 404, 404, 404),
    }
    for target in ("group", "direct", "missing"):
        expected_rows[target, "list"] = row(401, 401, 200, 200, 200, 200)
    expected = {(t, n, c): s for (t, n), statuses in expected_rows.items()
                for c, s in statuses.items()}
    assert actual == expected
    assert room_id not in await room_ids(client, outsider)
    assert room_id in await room_ids(client, admin)


async def test_non_member_cannot_tell_a_room_exists(client: Client) -> None:
    owner, outsider = await new_user(client, "owner"), await new_user(client, "outsider")
    room_id = await group(client, owner)
    for rid in (room_id, secrets.token_urlsafe(20), "not.a.valid.id"):
        replies = [await call(client, "GET", f"/rooms/{rid}", token=outsider.token),
                   await call(client, "POST", f"/rooms/{rid}/members",
                              {"user_id": outsider.user_id}, token=outsider.token),
                   await call(client, "DELETE", f"/rooms/{rid}/members/{outsider.user_id}",
                              token=outsider.token)]
        assert replies == [(404, {"error": {"code": "not_found", "message": "no such room"}})] * 3


# --- creation and validation -----------------------------------------------------------

async def test_group_room_object(client: Client) -> None:
    owner, member = await new_user(client, "owner"), await new_user(client, "member")
    status, room = await create(client, owner, {"kind": "group", "name": "🎉" * 100,
                                                "members": [member.user_id, owner.user_id]})
    assert status == 201
    assert set(room) == {"room_id", "kind", "name", "created_at", "created_by", "members"}
    assert (room["kind"], room["name"], room["created_by"]) == ("group", "🎉" * 100,
                                                                 owner.user_id)
    assert room["members"] == [
        {"user_id": owner.user_id, "role": "owner", "username": owner.username},
        {"user_id": member.user_id, "role": "member", "username": member.username}]
    assert await call(client, "GET", f"/rooms/{room['room_id']}", token=member.token) == (
        200, room)
    status, listed = await call(client, "GET", "/rooms", token=member.token)
    assert listed == {"rooms": [room | {"last_seq": 0, "unread": 0, "last_message": None}]}


async def test_room_list_summarizes_messages(client: Client) -> None:
    owner, member = await new_user(client, "owner"), await new_user(client, "member")
    room_id = await group(client, owner, member)
    sent = []
    for i, sender in enumerate([owner, member, owner]):
        status, message = await call(client, "POST", f"/rooms/{room_id}/messages",
                                     {"client_msg_id": f"m{i}", "body": f"hello {i}"},
                                     token=sender.token)
        assert status == 201, message
        sent.append(message)
    for user, unread in ((member, 2), (owner, 1)):  # nothing read yet; own messages excluded
        _, listed = await call(client, "GET", "/rooms", token=user.token)
        [summary] = listed["rooms"]
        assert (summary["last_seq"], summary["unread"]) == (3, unread)
        fields = ("room_id", "seq", "sender_id", "client_msg_id", "body", "ts")
        assert summary["last_message"] == {f: sent[-1][f] for f in fields}


async def test_direct_room_is_found_again_from_either_side(client: Client) -> None:
    a, b = await new_user(client, "alpha"), await new_user(client, "bravo")
    status, room = await create(client, a, {"kind": "direct", "members": [b.user_id]})
    assert status == 201 and room["kind"] == "direct" and room["name"] is None
    assert sorted(m["role"] for m in room["members"]) == ["member", "member"]
    assert await create(client, b, {"kind": "direct", "members": [a.user_id]}) == (200, room)
    assert await create(client, a, {"kind": "direct",
                                    "members": [b.user_id, a.user_id]}) == (200, room)
    assert await room_ids(client, a) == await room_ids(client, b) == [room["room_id"]]


@pytest.mark.parametrize(("body", "raw"), [
    ({}, None),
    ({"kind": "channel", "name": "x"}, None),
    ({"kind": 1, "name": "x"}, None),
    ({"kind": "group"}, None),
    ({"kind": "group", "name": ""}, None),
    ({"kind": "group", "name": "🎉" * 101}, None),
    ({"kind": "group", "name": 5}, None),
    ({"kind": "group", "name": "x", "members": "u1"}, None),
    ({"kind": "group", "name": "x", "members": [1, 2]}, None),
    ({"kind": "group", "name": "x", "members": ["no-such-user"]}, None),
    ({"kind": "group", "name": "x", "members": ["{bad}"]}, None),
    ({"kind": "direct"}, None),
    ({"kind": "direct", "members": []}, None),
    ({"kind": "direct", "members": ["SELF"]}, None),
    ({"kind": "direct", "members": ["no-such-user"]}, None),
    (None, "{not json"),
    (None, '"a string"'),
])
async def test_create_room_rejects_bad_input(client: Client, body: Any, raw: str | None) -> None:
    user = await new_user(client, "creator")
    if body is not None:
        raw = json.dumps(body).replace("SELF", user.user_id)
    status, reply = await call(client, "POST", "/rooms", token=user.token, data=raw)
    assert (status, error_code(reply)) == (400, "bad_request"), reply
    assert await room_ids(client, user) == []


async def test_member_bodies_are_validated(client: Client) -> None:
    owner = await new_user(client, "owner")
    room_id = await group(client, owner)
    path = f"/rooms/{room_id}/members"
    for body in ({}, {"user_id": 7}, {"user_id": "no-such-user"},
                 {"user_id": owner.user_id, "role": "owner"}, {"user_id": owner.user_id,
                                                               "role": 3}):
        status, reply = await call(client, "POST", path, body, token=owner.token)
        assert (status, error_code(reply)) == (400, "bad_request"), body
    status, reply = await call(client, "POST", path, token=owner.token,
                               data=json.dumps({"user_id": "x" * 70_000}))
    assert (status, error_code(reply)) == (413, "too_large")
    status, reply = await call(client, "POST", path, token=owner.token, data="[")
    assert (status, error_code(reply)) == (400, "bad_request")


# --- membership flows -------------------------------------------------------------------

async def test_add_remove_and_leave(client: Client) -> None:
    owner, guest = await new_user(client, "owner"), await new_user(client, "guest")
    room_id = await group(client, owner)
    members = f"/rooms/{room_id}/members"
    assert await room_ids(client, guest) == []
    assert await call(client, "POST", members, {"user_id": guest.user_id},
                      token=owner.token) == (204, None)
    assert await call(client, "POST", members, {"user_id": guest.user_id},
                      token=owner.token) == (204, None)  # already a member: no-op
    assert await room_ids(client, guest) == [room_id]
    assert await call(client, "DELETE", f"{members}/{guest.user_id}",
                      token=owner.token) == (204, None)
    assert (await call(client, "GET", f"/rooms/{room_id}", token=guest.token))[0] == 404
    assert await room_ids(client, guest) == []
    status, reply = await call(client, "DELETE", f"{members}/{guest.user_id}", token=owner.token)
    assert (status, error_code(reply)) == (404, "not_found")  # not a member any more
    await call(client, "POST", members, {"user_id": guest.user_id}, token=owner.token)
    assert await call(client, "DELETE", f"{members}/{guest.user_id}",
                      token=guest.token) == (204, None)  # leave
    assert await room_ids(client, guest) == []
    status, room = await call(client, "GET", f"/rooms/{room_id}", token=owner.token)
    assert [(m["user_id"], m["role"]) for m in room["members"]] == [(owner.user_id, "owner")]


async def test_room_changes_are_rate_limited_per_user(make_client: MakeClient) -> None:
    """Creating rooms and adding or removing members share one bucket per user
    (`limits.room_ops_rate_per_s`, `room_ops_burst`): past it 429 `rate_limited` with
    Retry-After, nothing done; another user's bucket is untouched."""
    client = await make_client(**{"limits.room_ops_burst": 3,
                                  "limits.room_ops_rate_per_s": 0.01})
    owner, friend, other = [await new_user(client, n) for n in ("owner", "friend", "other")]
    room_id = await group(client, owner)  # 1
    assert (await call(client, "POST", f"/rooms/{room_id}/members",
                       {"user_id": friend.user_id}, token=owner.token))[0] == 204  # 2
    assert (await call(client, "DELETE", f"/rooms/{room_id}/members/{friend.user_id}",
                       token=owner.token))[0] == 204  # 3
    before = await room_ids(client, owner)
    for method, path, body in (
            ("POST", "/rooms", {"kind": "group", "name": "one too many"}),
            ("POST", "/rooms", {"kind": "direct", "members": [friend.user_id]}),
            ("POST", f"/rooms/{room_id}/members", {"user_id": friend.user_id}),
            ("DELETE", f"/rooms/{room_id}/members/{owner.user_id}", None)):
        resp = await client.request(method, f"/api/v1{path}", json=body,
                                    headers={"Authorization": f"Bearer {owner.token}"})
        error = (await resp.json())["error"]
        assert (resp.status, error["code"]) == (429, "rate_limited"), (path, error)
        assert error["retry_after_ms"] > 0 and int(resp.headers["Retry-After"]) >= 1
    assert await room_ids(client, owner) == before  # nothing created, nobody left
    assert await room_ids(client, friend) == []  # nor added
    assert await group(client, other)  # someone else's bucket


async def test_rooms_per_user_are_capped(make_client: MakeClient) -> None:
    """`limits.max_rooms_per_user`: a room that would take a user past it is not created,
    and the user is not added (409 `conflict`); the direct room a pair has already is
    still theirs, adding someone who is in the room already is still a no-op, and a user
    who leaves a room may join another."""
    client = await make_client(**{"limits.max_rooms_per_user": 2})
    full, friend, other = [await new_user(client, n) for n in ("full", "friend", "other")]
    first = await group(client, full)
    status, direct = await create(client, full, {"kind": "direct", "members": [friend.user_id]})
    assert status == 201, direct
    refused = [
        await create(client, full, {"kind": "group", "name": "third"}),
        await create(client, other, {"kind": "group", "name": "with full",
                                     "members": [friend.user_id, full.user_id]}),
        await create(client, full, {"kind": "direct", "members": [other.user_id]}),
        await call(client, "POST", f"/rooms/{await group(client, other)}/members",
                   {"user_id": full.user_id}, token=other.token),
    ]
    for status, body in refused:
        assert (status, error_code(body)) == (409, "conflict"), body
        assert "max_rooms_per_user" in body["error"]["message"]
    # Rights come first: to a non-member the room is not found, full user or not.
    status, body = await call(client, "POST", f"/rooms/{first}/members",
                              {"user_id": full.user_id}, token=other.token)
    assert (status, error_code(body)) == (404, "not_found"), body
    assert sorted(await room_ids(client, full)) == sorted([first, direct["room_id"]])
    assert await room_ids(client, friend) == [direct["room_id"]]  # not in "with full"
    assert len(await room_ids(client, other)) == 1  # its own group only

    again = await create(client, full, {"kind": "direct", "members": [friend.user_id]})
    assert again == (200, direct)
    assert (await call(client, "POST", f"/rooms/{first}/members", {"user_id": full.user_id},
                       token=full.token))[0] == 204
    assert (await call(client, "DELETE", f"/rooms/{first}/members/{full.user_id}",
                       token=full.token))[0] == 204
    third = await group(client, full, name="third")
    assert sorted(await room_ids(client, full)) == sorted([third, direct["room_id"]])


async def test_crash_between_room_side_and_user_side(client: Client,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The node dies after the members hash changed and before the user's index did."""
    owner, joiner, leaver = [await new_user(client, n) for n in ("owner", "joiner", "leaver")]
    room_id = await group(client, owner, leaver)

    async def crash(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("node died between the two steps")

    monkeypatch.setattr(rooms, "_settle", crash)
    members = f"/rooms/{room_id}/members"
    assert (await call(client, "POST", members, {"user_id": joiner.user_id},
                       token=owner.token))[0] == 503
    assert (await call(client, "DELETE", f"{members}/{leaver.user_id}",
                       token=owner.token))[0] == 503
    monkeypatch.undo()

    # The truth holds at once: the removed member sees nothing, the added one has access.
    assert (await call(client, "GET", f"/rooms/{room_id}", token=leaver.token))[0] == 404
    assert await room_ids(client, leaver) == []
    assert (await call(client, "GET", f"/rooms/{room_id}", token=joiner.token))[0] == 200
    assert await room_ids(client, joiner) == []  # the index lags until the repair
    assert await rooms.repair_index(client.app[NODE], older_than_ms=0) == 2
    assert await room_ids(client, joiner) == [room_id]
    assert await room_ids(client, leaver) == []
