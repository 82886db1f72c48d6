"""The lean chatd load client: hello, send, ack, message, resume (docs/protocol.md).

Streams are rooms and numbers are the room's ``seq``: every connection of a
room must see every acked seq, in order (PROTOCOL.md, guarantees 1 and 2).
"""

from __future__ import annotations

import msgspec

from bench.client_base import BaseClient
from bench.tracking import Track


class _WelcomeRoom(msgspec.Struct):
    room_id: str
    last_seq: int = 0


class _Frame(msgspec.Struct):
    type: str
    room_id: str | None = None
    seq: int | None = None
    body: str | None = None
    id: str | None = None
    code: str | None = None
    rooms: list[_WelcomeRoom] | None = None


_decode = msgspec.json.Decoder(_Frame).decode
_encode = msgspec.json.Encoder().encode


class ChatdClient(BaseClient):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.reported: dict[str, int] = {}  # room -> delivered seq already reported

    def url(self) -> str:
        return self.spec.url + "/ws"

    def handshake(self, resume: bool) -> None:
        hello: dict[str, object] = {"type": "hello", "token": self.spec.token}
        if resume and self.tracks:
            hello["resume"] = {room: tr.last for room, tr in self.tracks.items()}
        self.send_frame(_encode(hello))

    def on_text(self, data: str) -> None:
        f = _decode(data)
        kind = f.type
        rec = self.rec
        if kind == "message":
            rec.delivery(self.tracks, f.room_id or "", f.seq or 0, f.body or "")
        elif kind == "ack":
            sent = self.pending.pop(f.id or "", None)
            if sent is not None:
                rec.ack(f.room_id or "", f.seq or 0, sent[0], self.spec.recipients, sent[1])
        elif kind == "error":
            if f.id is not None and self.pending.pop(f.id, None) is not None:
                rec.fail(f.code or "error")
            else:
                rec.errors[f.code or "error"] += 1
                self.refuse(f"error {f.code}")
        elif kind == "welcome":
            for room in f.rooms or ():
                if room.room_id not in self.tracks:
                    self.tracks[room.room_id] = Track(room.last_seq)
            self.ready()
        else:
            rec.other_frames += 1

    async def send(self, step: int, intended_ns: int) -> None:
        message = self.next_message(step, intended_ns)
        if message is None:
            return
        room, body, now = message
        rid = f"{self.spec.idx}-{self.n}"
        self.pending[rid] = (step, now)
        self.send_frame(_encode({"type": "send", "id": rid, "room_id": room,
                                 "client_msg_id": rid, "body": body}))

    async def report_delivered(self) -> None:
        """Cumulative `delivered` receipts for rooms that advanced (--receipts-ms)."""
        if not self.can_send():
            return
        for room, tr in self.tracks.items():
            if tr.last > self.reported.get(room, 0):
                self.reported[room] = tr.last
                self.send_frame(_encode({"type": "delivered", "room_id": room, "seq": tr.last}))
