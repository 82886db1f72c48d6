"""HTTP API for a room's messages and receipts (the same code paths as the WebSocket)."""

from __future__ import annotations

from aiohttp import web

from chatd import messages
from chatd.appkeys import NODE
from chatd.auth import authenticate, authenticate_read
from chatd.errors import ChatError
from chatd.http import field, read_json
from chatd.protocol import MAX_SEQ

PREFIX = "/api/v1/rooms/{room_id}"


def _int_param(raw: str | None, name: str, *, lo: int, hi: int,
               default: int | None = None) -> int | None:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ChatError("bad_request", f"'{name}' must be an integer") from None
    if not lo <= value <= hi:
        raise ChatError("bad_request", f"'{name}' must be between {lo} and {hi}")
    return value


async def list_messages(request: web.Request) -> web.Response:
    me = await authenticate_read(request)
    query = request.query
    after = _int_param(query.get("after_seq"), "after_seq", lo=0, hi=MAX_SEQ)
    before = _int_param(query.get("before_seq"), "before_seq", lo=0, hi=MAX_SEQ)
    limit = _int_param(query.get("limit"), "limit", lo=1, hi=200, default=50)
    assert limit is not None
    page, more = await messages.history(request.app[NODE], me.user_id,
                                        request.match_info["room_id"], after_seq=after,
                                        before_seq=before, limit=limit)
    return web.Response(body=messages.page_json(None, page, more),
                        content_type="application/json")


async def post_message(request: web.Request) -> web.Response:
    me = await authenticate(request)
    body = await read_json(request)
    client_msg_id = field(body, "client_msg_id", str)
    text = field(body, "body", str)
    room_id = request.match_info["room_id"]
    node = request.app[NODE]
    sent = await messages.send(node, me.user_id, room_id, client_msg_id, text)
    message = await messages.message_with_status(node, me.user_id, room_id, sent.seq)
    if sent.duplicate:
        message["duplicate"] = True
    return web.json_response(message, status=200 if sent.duplicate else 201)


async def get_message(request: web.Request) -> web.Response:
    me = await authenticate_read(request)
    seq = _int_param(request.match_info["seq"], "seq", lo=0, hi=MAX_SEQ)
    assert seq is not None
    message = await messages.message_with_status(request.app[NODE], me.user_id,
                                                 request.match_info["room_id"], seq)
    return web.json_response(message)


async def get_receipts(request: web.Request) -> web.Response:
    me = await authenticate_read(request)
    receipts = await messages.receipts(request.app[NODE], me.user_id,
                                       request.match_info["room_id"])
    return web.json_response({"receipts": receipts})


def add_routes(app: web.Application) -> None:
    app.router.add_get(PREFIX + "/messages", list_messages)
    app.router.add_post(PREFIX + "/messages", post_message)
    app.router.add_get(PREFIX + "/messages/{seq}", get_message)
    app.router.add_get(PREFIX + "/receipts", get_receipts)
