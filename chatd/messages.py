"""The send path and the room log: send, history pages, one message with its status.

`send` is shared by the WebSocket `send` frame and `POST .../messages`: a
per-user token bucket, then ONE Lua script that checks membership and
idempotency, assigns the seq, appends to the log and fans out. The caller
acks only after it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

from chatd import keys, ratelimit, rooms
from chatd.errors import ChatError
from chatd.node import Node
from chatd.protocol import CLIENT_MSG_ID


@dataclass(frozen=True, slots=True)
class Sent:
    seq: int
    ts: int
    duplicate: bool


async def send(node: Node, user_id: str, room_id: str, client_msg_id: str, body: str) -> Sent:
    limits = node.settings.limits
    if not CLIENT_MSG_ID.fullmatch(client_msg_id):
        raise ChatError("bad_request", "client_msg_id must be 1-64 of [A-Za-z0-9_-]")
    if not body:
        raise ChatError("bad_request", "body must not be empty")
    if len(body) > limits.max_body_chars:
        raise ChatError("too_large", f"body is longer than {limits.max_body_chars} characters")
    p = keys.partition_of(room_id, node.partitions)
    idem_key = keys.idempotency(p, room_id, user_id, client_msg_id)
    durability = node.settings.durability
    bucket_keys: list[str] = []
    bucket_args: list[float] = []
    if not node.redis.is_cluster:
        # One round trip: the send script takes the token itself (after answering
        # a duplicate, so a retry is acked whatever the bucket holds).
        bucket_keys = [keys.send_bucket(user_id)]
        bucket_args = [limits.send_rate_per_s, limits.send_burst]
    else:
        # On a cluster the bucket is in the user's slot: take the token first.
        try:
            await ratelimit.take(node, keys.send_bucket(user_id), limits.send_rate_per_s,
                                 limits.send_burst)
        except ChatError as e:
            # A retry of a message already stored is answered, bucket or not.
            previous = await node.redis.cmd.get(idem_key) if e.code == "rate_limited" else None
            if previous is None:
                raise
            if not durability.replicas:
                await rooms.require_member(node, room_id, user_id)
                seq, ts = previous.split(":")
                return Sent(int(seq), int(ts), True)
            # With durability.replicas an ack waits for the replicas, a duplicate's too (the
            # stored original may be one whose WAIT failed): the script answers the
            # duplicate and writes, so the WAIT below covers the original.
    retention = node.settings.messages
    retention_value = (retention.max_len if retention.retention == "maxlen"
                       else retention.max_age_s * 1000)
    reply = await node.scripts.run("send_message", [
        keys.room(p, room_id), keys.room_members(p, room_id), keys.room_log(p, room_id),
        keys.room_nodes(p, room_id), node.inbox_prefix(p), idem_key, *bucket_keys,
    ], [
        room_id, user_id, client_msg_id, msgspec.json.encode(body),
        limits.idempotency_ttl_s * 1000, retention.retention, retention_value,
        node.settings.fanout.inbox_max_len, *bucket_args,
    ], replicas=durability.replicas, wait_ms=durability.wait_timeout_ms)
    if durability.replicas:
        reply, confirmed = reply
        if int(confirmed) < durability.replicas:
            raise ChatError("unavailable", f"stored, but only {confirmed} of "
                            f"{durability.replicas} replicas confirmed in time; retry with "
                            "the same client_msg_id")
    seq, ts, dup = reply
    sent = Sent(int(seq), int(ts), bool(dup))
    (node.metrics.sends_duplicate if sent.duplicate else node.metrics.sends_new).inc()
    return sent


async def history(node: Node, user_id: str, room_id: str, *, after_seq: int | None,
                  before_seq: int | None, limit: int) -> tuple[list[bytes], bool]:
    """A page of message objects (raw JSON, ascending by seq) and whether more exist."""
    if after_seq is not None and before_seq is not None:
        raise ChatError("bad_request", "give after_seq or before_seq, not both")
    await rooms.require_member(node, room_id, user_id)
    p = keys.partition_of(room_id, node.partitions)
    log_key = keys.room_log(p, room_id)
    if after_seq is not None:
        entries = await node.redis.log_range(log_key, f"{after_seq + 1}-0", "+", limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
    else:
        if before_seq is not None and before_seq <= 1:
            return [], False
        top = "+" if before_seq is None else f"{before_seq - 1}-0"
        entries = await node.redis.log_range(log_key, top, "-", limit + 1, reverse=True)
        more = len(entries) > limit
        entries = entries[:limit][::-1]
    return [fields[b"m"] for _, fields in entries], more


def page_json(room_id: str | None, messages: list[bytes], has_more: bool,
              request_id: str | None = None) -> bytes:
    """Assemble a page without decoding the stored message objects."""
    head: dict[str, Any] = {}
    if room_id is not None:
        head = {"type": "history"}
        if request_id is not None:
            head["id"] = request_id
        head["room_id"] = room_id
    prefix = json.dumps(head, separators=(",", ":"))[:-1]
    sep = "," if head else ""
    return (f'{prefix}{sep}"messages":['.encode() + b",".join(messages)
            + f'],"has_more":{"true" if has_more else "false"}}}'.encode())


async def message_with_status(node: Node, user_id: str, room_id: str, seq: int) -> dict[str, Any]:
    await rooms.require_member(node, room_id, user_id)
    p = keys.partition_of(room_id, node.partitions)
    entries = await node.redis.cmd.xrange(keys.room_log(p, room_id), f"{seq}-0", f"{seq}-0")
    if not entries:
        raise ChatError("not_found", f"no message {seq} in this room")
    message: dict[str, Any] = json.loads(entries[0][1]["m"])
    others = [r for r in await receipts(node, user_id, room_id)
              if r["user_id"] != message["sender_id"]]
    delivered = all(r["delivered_seq"] >= seq for r in others)
    read = all(r["read_seq"] >= seq for r in others)
    message["status"] = "read" if read else "delivered" if delivered else "sent"
    message["receipts"] = [{"user_id": r["user_id"], "delivered": r["delivered_seq"] >= seq,
                            "read": r["read_seq"] >= seq} for r in others]
    return message


async def receipts(node: Node, user_id: str, room_id: str) -> list[dict[str, Any]]:
    """Both watermarks of every member, read in one round trip."""
    await rooms.require_member(node, room_id, user_id)
    p = keys.partition_of(room_id, node.partitions)
    async with node.redis.cmd.pipeline(transaction=False) as pipe:
        pipe.hkeys(keys.room_members(p, room_id))
        pipe.hgetall(keys.room_marks(p, room_id))
        members, marks = await pipe.execute()
    return [{"user_id": m, "delivered_seq": int(marks.get(f"d:{m}", 0)),
             "read_seq": int(marks.get(f"r:{m}", 0))} for m in sorted(members)]


async def mark(node: Node, user_id: str, room_id: str, kind: str, seq: int) -> None:
    """Move the `delivered` or `read` watermark; the script publishes the receipt."""
    p = keys.partition_of(room_id, node.partitions)
    await node.scripts.run("mark_seen", [
        keys.room(p, room_id), keys.room_members(p, room_id), keys.room_marks(p, room_id),
        keys.room_nodes(p, room_id), node.inbox_prefix(p),
    ], [room_id, user_id, kind, seq, node.settings.fanout.inbox_max_len])


async def typing(node: Node, user_id: str, room_id: str, active: bool) -> None:
    p = keys.partition_of(room_id, node.partitions)
    frame = json.dumps({"type": "typing", "room_id": room_id, "user_id": user_id,
                        "active": active}, separators=(",", ":"))
    await node.scripts.run("publish_typing", [
        keys.room_members(p, room_id), keys.room_nodes(p, room_id), node.inbox_prefix(p),
    ], [room_id, user_id, frame, node.settings.fanout.inbox_max_len])
