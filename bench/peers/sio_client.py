"""The lean load client for the Socket.IO peer: Engine.IO v4 + Socket.IO v5 over a WebSocket.

Speaks exactly what ``socketio.AsyncClient`` would on a websocket-only
transport, without its per-client machinery, so both systems are driven by
equally cheap clients:

- open: server ``0{"sid",...}``; client ``40{auth}``; server ``40{"sid"}``
  (``44{...}`` = refused)
- event with ack: client ``42<id>["send",{room, body}]``; server ``43<id>[...]``
- room message: server ``42["message",{room, from, body}]``
- heartbeat: server ``2``, client ``3``

Streams are (room, sender) and numbers are the sender's own counter, the
only order Redis pub/sub can promise.
"""

from __future__ import annotations

import contextlib

import msgspec

from bench.client_base import BaseClient


class _Message(msgspec.Struct):
    room: str
    body: str


_decode_event = msgspec.json.Decoder(tuple[str, _Message]).decode
_encode = msgspec.json.Encoder().encode


class SioClient(BaseClient):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._ack_ids = 0

    def url(self) -> str:
        return self.spec.url + "/socket.io/?EIO=4&transport=websocket"

    def handshake(self, resume: bool) -> None:
        pass  # the server speaks first (open packet); see on_text

    def _write(self, text: str) -> None:
        # An answer to the server (connect, pong): moot once our close is on its way.
        with contextlib.suppress(ConnectionError):
            self.send_frame(text)

    def on_text(self, data: str) -> None:
        if data.startswith("42["):
            try:
                _, msg = _decode_event(data[2:])
            except msgspec.ValidationError:
                self.rec.other_frames += 1
                return
            parts = msg.body.split(" ", 4)
            try:
                stream, n = f"{msg.room}|{parts[2]}", int(parts[3])
            except (IndexError, ValueError):
                self.rec.other_frames += 1
                return
            self.rec.delivery(self.tracks, stream, n, msg.body)
        elif data.startswith("43"):
            end = data.index("[", 2)
            sent = self.pending.pop(int(data[2:end]), None)
            if sent is not None:
                step, sent_ns, n = sent
                self.rec.ack(f"{self.spec.send_room}|{self.spec.idx}", n, step,
                             self.spec.recipients, sent_ns)
        elif data == "2":
            self._write("3")
        elif data.startswith("0{"):
            auth = {"user": self.spec.token, "rooms": list(self.spec.rooms)}
            self._write("40" + _encode(auth).decode())
        elif data.startswith("40"):
            self.ready()
        elif data.startswith("44"):
            self.rec.errors["connect_refused"] += 1
            self.refuse(data)
        else:
            self.rec.other_frames += 1

    async def send(self, step: int, intended_ns: int) -> None:
        message = self.next_message(step, intended_ns)
        if message is None:
            return
        room, body, now = message
        self._ack_ids += 1
        self.pending[self._ack_ids] = (step, now, self.n)
        packet = _encode(["send", {"room": room, "body": body}]).decode()
        self.send_frame(f"42{self._ack_ids}{packet}")
