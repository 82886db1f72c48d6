"""The peer: a minimal, faithful chat server on python-socketio.

``socketio.AsyncServer`` on aiohttp with ``socketio.AsyncRedisManager`` (Redis
pub/sub between nodes), run as ``python -m bench.peers.sio_server --port P
--redis-url URL``. Per message it does what a typical Socket.IO chat does and
nothing more: the client emits ``send`` ``{room, body}`` with an ack id; the
server emits ``message`` ``{room, from, body}`` to the room (every member's
connection on this node directly, other nodes through one Redis PUBLISH) and
then acks. No storage, no sequence numbers, no receipts, no resume: a
subscriber that falls behind Redis's pub/sub output limit is disconnected and
what was published meanwhile is gone.

Connection: ``auth = {"user": NAME, "rooms": [ROOM, ...]}``; the rooms are
joined before the connect is acknowledged, so a client may send as soon as it
is connected. Heartbeat: Engine.IO ping every 20 s (chatd's default too).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import socketio
from aiohttp import web


def make_app(redis_url: str) -> web.Application:
    mgr = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=mgr, transports=["websocket"],
                               ping_interval=20, ping_timeout=20)
    app = web.Application()
    sio.attach(app)

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> bool:
        if not isinstance(auth, dict) or not isinstance(auth.get("user"), str):
            return False
        await sio.save_session(sid, {"user": auth["user"]})
        for room in auth.get("rooms") or ():
            await sio.enter_room(sid, str(room))
        return True

    @sio.on("send")
    async def send(sid: str, data: dict[str, Any]) -> dict[str, Any]:
        session = await sio.get_session(sid)
        room = str(data["room"])
        await sio.emit("message", {"room": room, "from": session["user"], "body": data["body"]},
                       room=room)
        return {"ok": True}

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)
    return app


async def serve(port: int, redis_url: str) -> None:
    runner = web.AppRunner(make_app(redis_url), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sio peer ready on 127.0.0.1:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    args = p.parse_args()
    try:
        import uvloop  # the same event loop chatd runs on
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args.port, args.redis_url))
    else:
        uvloop.run(serve(args.port, args.redis_url))


if __name__ == "__main__":
    main()
