"""HTTP API for accounts and sessions (PROTOCOL.md section 2): register, login, logout,
me, users."""

from __future__ import annotations

from aiohttp import web

from chatd import auth
from chatd.appkeys import NODE, SETTINGS
from chatd.errors import ChatError
from chatd.http import client_key, field, read_json

PREFIX = "/api/v1"


async def _credentials(request: web.Request) -> tuple[str, str]:
    body = await read_json(request)
    return field(body, "username", str), field(body, "password", str)


async def register(request: web.Request) -> web.Response:
    username, password = await _credentials(request)
    user_id, name = await auth.register(request.app[NODE], request.app[auth.PASSWORDS],
                                        username, password, client_key(request))
    return web.json_response({"user_id": user_id, "username": name}, status=201)


async def login(request: web.Request) -> web.Response:
    username, password = await _credentials(request)
    session = await auth.login(request.app[NODE], request.app[auth.PASSWORDS],
                               username, password, client_key(request))
    return web.json_response({"token": session.token, "user_id": session.user_id,
                              "username": session.username, "session_id": session.session_id,
                              "expires_at": session.expires_at})


async def logout(request: web.Request) -> web.Response:
    principal = await auth.authenticate(request)
    await auth.logout(request.app[NODE], principal)
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    principal = await auth.authenticate_read(request)
    return web.json_response({"user_id": principal.user_id, "username": principal.username})


async def users(request: web.Request) -> web.Response:
    await auth.authenticate_read(request)
    username = request.query.get("username")
    if username is None:
        raise ChatError("bad_request", "missing query parameter 'username'")
    found = await auth.find_user(request.app[NODE], username)
    if found is None:
        raise ChatError("not_found", "no such user")
    return web.json_response({"user_id": found[0], "username": found[1]})


def add_routes(app: web.Application) -> None:
    """The routes, and the password hasher they share (built from the app's settings)."""
    app[auth.PASSWORDS] = auth.Passwords(app[SETTINGS].auth)
    app.router.add_post(f"{PREFIX}/register", register)
    app.router.add_post(f"{PREFIX}/login", login)
    app.router.add_post(f"{PREFIX}/logout", logout)
    app.router.add_get(f"{PREFIX}/me", me)
    app.router.add_get(f"{PREFIX}/users", users)
