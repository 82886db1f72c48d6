"""The key schema: every Redis key chatd uses is built here, with its hash tag.

Three kinds of hash tag keep each Lua script inside one cluster slot:

- `{<p>}`: partition p of the rooms (like a Kafka partition). A room's meta,
  members, watermarks, log, idempotency keys and interest set, and (on a
  cluster) the inbox of every node for that partition, share it; so the
  send script, which stores and fans out, touches a single slot.
- `{u:<user_id>}`: a user's record, sessions, room index, send bucket and
  the nodes holding the user's connections.
- `{n:<node_id>}`: a node's control inbox and the users it serves.

Global keys (`meta`, `nodes`, the janitor lock, username claims, login
buckets) each sit in a slot of their own and are only used by single-key
commands or scripts.
"""

from __future__ import annotations

import re
import zlib

PREFIX = "chatd"

META = f"{PREFIX}:meta"
NODES = f"{PREFIX}:nodes"
JANITOR_LOCK = f"{PREFIX}:janitor:lock"


_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_valid_id(value: str) -> bool:
    """Ids from clients are spliced into keys: only the server's own alphabet, no braces
    that would move a key to another hash tag."""
    return _ID.fullmatch(value) is not None


def partition_of(room_id: str, partitions: int) -> int:
    return zlib.crc32(room_id.encode()) % partitions


# --- users -------------------------------------------------------------------

def username(name: str) -> str:
    return f"{PREFIX}:uname:{{{name}}}"


def user(uid: str) -> str:
    return f"{PREFIX}:{{u:{uid}}}:user"


def session(uid: str, sid: str) -> str:
    return f"{PREFIX}:{{u:{uid}}}:sess:{sid}"


def user_rooms(uid: str) -> str:
    return f"{PREFIX}:{{u:{uid}}}:rooms"


def user_nodes(uid: str) -> str:
    return f"{PREFIX}:{{u:{uid}}}:nodes"


def user_presence(uid: str) -> str:
    return f"{PREFIX}:{{u:{uid}}}:presence"


def send_bucket(uid: str) -> str:
    return f"{PREFIX}:{{u:{uid}}}:bucket:send"


def room_ops_bucket(uid: str) -> str:
    return f"{PREFIX}:{{u:{uid}}}:bucket:rooms"


def read_bucket(uid: str) -> str:
    return f"{PREFIX}:{{u:{uid}}}:bucket:reads"


def login_bucket_ip(ip: str) -> str:
    return f"{PREFIX}:bucket:login:ip:{{{ip}}}"


def login_bucket_name(name: str) -> str:
    return f"{PREFIX}:bucket:login:name:{{{name}}}"


# --- rooms (partition-tagged) --------------------------------------------------

def ptag(p: int) -> str:
    return f"{PREFIX}:{{{p}}}"


def room(p: int, rid: str) -> str:
    return f"{ptag(p)}:room:{rid}"


def room_members(p: int, rid: str) -> str:
    return f"{ptag(p)}:room:{rid}:members"


def room_marks(p: int, rid: str) -> str:
    return f"{ptag(p)}:room:{rid}:marks"


def room_log(p: int, rid: str) -> str:
    return f"{ptag(p)}:room:{rid}:log"


def room_nodes(p: int, rid: str) -> str:
    return f"{ptag(p)}:room:{rid}:nodes"


def idempotency(p: int, rid: str, uid: str, client_msg_id: str) -> str:
    return f"{ptag(p)}:room:{rid}:idem:{uid}:{client_msg_id}"


def index_pending(p: int) -> str:
    """Room-side membership changes whose user-side index step may not have run yet."""
    return f"{ptag(p)}:pending"


def direct_pair(p: int, a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"{ptag(p)}:direct:{lo}:{hi}"


def direct_pair_partition(a: str, b: str, partitions: int) -> int:
    lo, hi = sorted((a, b))
    return partition_of(f"{lo}:{hi}", partitions)


# --- nodes -------------------------------------------------------------------

def inbox_partition(p: int, *, cluster: bool) -> int:
    """The partition whose inboxes carry the events of partition p's rooms.

    On a cluster their own: the script that fans out must stay in the room's
    slot. On one server a script may touch any key, so every room's events go
    to partition 0's inbox, and a node reads one room inbox, not `partitions`:
    a blocking XREADGROUP costs Redis work for every stream it names, each
    time it blocks and each time it is woken.
    """
    return p if cluster else 0


def inbox_prefix(p: int) -> str:
    """Scripts append the node id to this to reach that node's inbox in partition p."""
    return f"{ptag(p)}:inbox:"


def inbox(p: int, node_id: str) -> str:
    return f"{inbox_prefix(p)}{node_id}"


def node_rooms(p: int, node_id: str) -> str:
    return f"{ptag(p)}:node:{node_id}:rooms"


def control(node_id: str) -> str:
    return f"{PREFIX}:{{n:{node_id}}}:ctl"


def node_users(node_id: str) -> str:
    return f"{PREFIX}:{{n:{node_id}}}:users"
