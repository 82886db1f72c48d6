"""HTTP API for rooms and their members (PROTOCOL.md section 2).

Every endpoint authenticates first (401), then checks membership against the
room's members hash (404 for non-members, whether or not the room exists),
then the role (403). Extension: `POST .../members` takes an optional `role`,
"member" (default) or "admin"; only the owner grants "admin". A direct room's
`name` is null.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from chatd import ratelimit, rooms
from chatd.appkeys import NODE
from chatd.auth import Principal, authenticate, authenticate_read
from chatd.errors import ChatError
from chatd.http import field, read_json

PREFIX = "/api/v1/rooms"


def _user_ids(body: dict[str, Any], *, required: bool) -> list[str]:
    members = field(body, "members", list, required=required) or []
    if not all(isinstance(m, str) for m in members):
        raise ChatError("bad_request", "field 'members' must be a list of user ids")
    return members


async def _room_op(request: web.Request) -> Principal:
    """The caller, who has taken a token of its room-ops bucket."""
    principal = await authenticate(request)
    await ratelimit.take_room_op(request.app[NODE], principal.user_id)
    return principal


async def create_room(request: web.Request) -> web.Response:
    principal = await _room_op(request)
    body = await read_json(request)
    kind = field(body, "kind", str)
    node = request.app[NODE]
    if kind == "group":
        name = field(body, "name", str)
        room = await rooms.create_group(node, principal.user_id, name,
                                        _user_ids(body, required=False))
        return web.json_response(room, status=201)
    if kind == "direct":
        others = [m for m in dict.fromkeys(_user_ids(body, required=True))
                  if m != principal.user_id]
        if len(others) != 1:
            raise ChatError("bad_request", "a direct room needs exactly one other user in "
                            "'members'")
        room, created = await rooms.create_direct(node, principal.user_id, others[0])
        return web.json_response(room, status=201 if created else 200)
    raise ChatError("bad_request", "field 'kind' must be 'group' or 'direct'")


async def list_rooms(request: web.Request) -> web.Response:
    principal = await authenticate_read(request)
    return web.json_response({"rooms": await rooms.list_rooms(request.app[NODE],
                                                              principal.user_id)})


async def get_room(request: web.Request) -> web.Response:
    principal = await authenticate_read(request)
    room = await rooms.get_room(request.app[NODE], request.match_info["room_id"],
                                principal.user_id)
    return web.json_response(room)


async def add_member(request: web.Request) -> web.Response:
    principal = await _room_op(request)
    body = await read_json(request)
    user_id = field(body, "user_id", str)
    role = field(body, "role", str, required=False) or "member"
    await rooms.add_member(request.app[NODE], request.match_info["room_id"], principal.user_id,
                           user_id, role)
    return web.Response(status=204)


async def remove_member(request: web.Request) -> web.Response:
    principal = await _room_op(request)
    await rooms.remove_member(request.app[NODE], request.match_info["room_id"],
                              principal.user_id, request.match_info["user_id"])
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post(PREFIX, create_room)
    app.router.add_get(PREFIX, list_rooms)
    app.router.add_get(PREFIX + "/{room_id}", get_room)
    app.router.add_post(PREFIX + "/{room_id}/members", add_member)
    app.router.add_delete(PREFIX + "/{room_id}/members/{user_id}", remove_member)
