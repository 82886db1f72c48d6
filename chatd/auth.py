"""Accounts, passwords, tokens and sessions.

A token is `[user_id, session_id]` signed with itsdangerous
(`URLSafeTimedSerializer`, salt "chatd-session"). It is accepted while the
signature holds, it is younger than `auth.session_ttl_s`, and the session
record (`keys.session`, a hash with the same TTL) exists in Redis. The record is
the revocation point: logout deletes it, so every node rejects the token at its
next check, with no state of its own.

The signing secret is `auth.secret` (config file, or `CHATD_AUTH__SECRET`) when
set, and then every node must be given the same one. When it is not set, the
first node to start generates one and stores it in Redis (`chatd:meta`, see
`node.check_meta`), so every node sharing that Redis agrees with no setup. A
configured secret wins over a stored one. Changing the secret logs everyone out.

After deleting the session, logout appends `{"k": "x", "u": user_id,
"sid": session_id}` (x: revoke) to the control inbox of every node serving the user
(`control.notify_user`); their WebSocket handlers close that session's
connections with 4001.

Passwords are hashed with argon2id, with the `auth.argon2_*` parameters; a hash
made with other parameters is replaced at the next successful login.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadData, URLSafeTimedSerializer

from chatd import control, keys, ratelimit
from chatd.appkeys import NODE
from chatd.config import AuthSettings
from chatd.errors import ChatError
from chatd.node import Node

TOKEN_SALT = "chatd-session"
USERNAME = re.compile(r"[a-z0-9_.-]{3,32}")
PASSWORD_MIN, PASSWORD_MAX = 8, 1024


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    user_id: str
    username: str
    session_id: str
    expires_at: int  # the session's end, ms since the Unix epoch (Redis's clock)


@dataclass(frozen=True)
class Session:
    token: str
    user_id: str
    username: str
    session_id: str
    expires_at: int


class Passwords:
    """argon2id hashing and checking, in a thread so the event loop keeps serving."""

    def __init__(self, settings: AuthSettings) -> None:
        self._hasher = PasswordHasher(time_cost=settings.argon2_time_cost,
                                      memory_cost=settings.argon2_memory_kib,
                                      parallelism=settings.argon2_parallelism)
        # Checked against for unknown users, so that they cost as much as a wrong password.
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        """True when `password` matches `stored`; always one full argon2 check, even
        with no stored hash, so timing does not tell an unknown user from a wrong password."""
        ok = await asyncio.to_thread(self._check, stored or self._dummy, password)
        return ok and stored is not None

    def needs_rehash(self, stored: str) -> bool:
        return self._hasher.check_needs_rehash(stored)

    def _check(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False


PASSWORDS = web.AppKey("passwords", Passwords)


# --- accounts ----------------------------------------------------------------------

def fold_username(name: str) -> str | None:
    """The folded username, or None when it is not 3-32 of [a-z0-9_.-]."""
    folded = name.lower()
    return folded if USERNAME.fullmatch(folded) else None


async def register(node: Node, passwords: Passwords, username: str, password: str,
                   ip: str) -> tuple[str, str]:
    """Create an account; returns (user_id, folded username).

    The user record is written first and the name claim (SET NX) last: the claim
    is the commit point, so of concurrent registrations of one name on any nodes
    exactly one wins, and a loser or a crash leaves at most an unreachable record.
    """
    await _throttle(node, ip, None)
    name = fold_username(username)
    if name is None:
        raise ChatError("bad_request", "username must be 3 to 32 of a-z, 0-9, '_', '.', '-'")
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise ChatError("bad_request",
                        f"password must be {PASSWORD_MIN} to {PASSWORD_MAX} characters")
    await _throttle(node, None, name)
    cmd = node.redis.cmd
    if await cmd.exists(keys.username(name)):  # spares the hash; the SET NX below decides
        raise ChatError("conflict", "username is taken")
    user_id = secrets.token_urlsafe(16)
    await cmd.hset(keys.user(user_id), mapping={
        "username": name, "pw": await passwords.hash(password),
        "created_at": int(node.redis_time_ms())})
    if not await cmd.set(keys.username(name), user_id, nx=True):
        await cmd.delete(keys.user(user_id))
        raise ChatError("conflict", "username is taken")
    return user_id, name


async def login(node: Node, passwords: Passwords, username: str, password: str,
                ip: str) -> Session:
    """A new session; the same 401 for an unknown user and a wrong password."""
    name = fold_username(username)
    await _throttle(node, ip, name)
    cmd = node.redis.cmd
    user_id = await cmd.get(keys.username(name)) if name else None
    stored = await cmd.hget(keys.user(user_id), "pw") if user_id else None
    if not await passwords.verify(stored, password) or name is None or user_id is None:
        raise ChatError("unauthorized", "wrong username or password")
    if stored is not None and passwords.needs_rehash(stored):
        await cmd.hset(keys.user(user_id), "pw", await passwords.hash(password))
    return await _create_session(node, user_id, name)


async def find_user(node: Node, username: str) -> tuple[str, str] | None:
    """(user_id, folded username) of an account, or None."""
    name = fold_username(username)
    user_id = await node.redis.cmd.get(keys.username(name)) if name else None
    return (user_id, name) if user_id and name else None


async def _throttle(node: Node, ip: str | None, name: str | None) -> None:
    rate, burst = node.settings.auth.login_rate_per_s, node.settings.auth.login_burst
    if ip is not None:
        await ratelimit.take(node, keys.login_bucket_ip(ip), rate, burst)
    if name is not None:
        await ratelimit.take(node, keys.login_bucket_name(name), rate, burst)


# --- sessions and tokens -------------------------------------------------------------

def _serializer(node: Node) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(node.secret, salt=TOKEN_SALT)


async def _create_session(node: Node, user_id: str, username: str) -> Session:
    session_id = secrets.token_urlsafe(16)
    ttl_ms = node.settings.auth.session_ttl_s * 1000
    expires_at = await node.scripts.run("create_session", [keys.session(user_id, session_id)],
                                        [ttl_ms, username])
    token = _serializer(node).dumps([user_id, session_id])
    return Session(token, user_id, username, session_id, int(expires_at))


async def verify_token(node: Node, token: str) -> Principal:
    """The token's principal, or `unauthorized` if it is tampered, unsigned, expired or
    revoked (its session deleted by a logout on any node)."""
    try:
        payload = _serializer(node).loads(token, max_age=node.settings.auth.session_ttl_s)
    except BadData:
        raise ChatError("unauthorized", "invalid or expired token") from None
    if not (isinstance(payload, list) and len(payload) == 2
            and all(isinstance(x, str) and keys.is_valid_id(x) for x in payload)):
        raise ChatError("unauthorized", "invalid token")
    user_id, session_id = payload
    username, expires_at = await node.redis.execute("HMGET", keys.session(user_id, session_id),
                                                    "username", "expires_at")
    if username is None or expires_at is None:
        raise ChatError("unauthorized", "session expired or revoked")
    return Principal(user_id, str(username), session_id, int(expires_at))


def bearer_token(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if there is one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def authenticate(request: web.Request) -> Principal:
    token = bearer_token(request)
    if token is None:
        raise ChatError("unauthorized", "missing 'Authorization: Bearer <token>' header")
    return await verify_token(request.app[NODE], token)


async def authenticate_read(request: web.Request) -> Principal:
    """The caller of a read, who has taken a token of its read bucket."""
    principal = await authenticate(request)
    await ratelimit.take_read(request.app[NODE], principal.user_id)
    return principal


async def logout(node: Node, principal: Principal) -> None:
    """Revoke the session on every node: the record first, then the live connections."""
    await node.redis.cmd.delete(keys.session(principal.user_id, principal.session_id))
    await control.notify_user(node, principal.user_id, {
        "k": "x", "u": principal.user_id, "sid": principal.session_id})
