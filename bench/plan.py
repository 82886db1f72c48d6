"""Who is in which room, who sends, and which node each connection uses.

A :class:`Topology` is system-neutral (users are indexes, rooms are lists of
user indexes); :func:`conn_specs` turns it into the connection list a
load-generator process gets, for chatd (tokens, server room ids) or for the
peer (names). One connection per user; user ``u`` connects to node
``u % len(nodes)``, so members of a room are spread over the nodes, and the
two users of a direct pair are on different nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

MEMBER = "member"  # sends in the stepped load when it is a sender
FEEDER = "feeder"  # writes the messages a resuming client missed


@dataclass(frozen=True)
class ConnSpec:
    idx: int
    url: str  # node base URL, ws://127.0.0.1:PORT
    token: str  # chatd: bearer token; peer: user name
    rooms: tuple[str, ...]
    send_room: str | None
    recipients: int  # connections that receive what this one sends (its send room's size)
    role: str = MEMBER


@dataclass(frozen=True)
class Topology:
    kind: str  # "group" or "direct" (how chatd rooms are created)
    rooms: list[tuple[int, ...]]  # member user indexes; the first one creates the room
    senders: frozenset[int]  # users that send in the stepped load (in their first room)
    roles: dict[int, str]
    n_users: int

    def rooms_of(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.n_users)]
        for j, members in enumerate(self.rooms):
            for u in members:
                out[u].append(j)
        return out


def _topology(kind: str, rooms: list[tuple[int, ...]], senders: set[int],
              roles: dict[int, str] | None = None) -> Topology:
    n_users = 1 + max((u for members in rooms for u in members), default=-1)
    return Topology(kind, rooms, frozenset(senders), roles or {}, n_users)


def groups(n_rooms: int, members: int) -> Topology:
    """`rooms`: n_rooms disjoint groups; every member sends."""
    rooms = [tuple(range(j * members, (j + 1) * members)) for j in range(n_rooms)]
    return _topology("group", rooms, set(range(n_rooms * members)))


def direct_pairs(pairs: int) -> Topology:
    """`direct`: 1:1 rooms; both users of a pair send (user 2j on node 0, 2j+1 on node 1)."""
    rooms: list[tuple[int, ...]] = [(2 * j, 2 * j + 1) for j in range(pairs)]
    return _topology("direct", rooms, set(range(2 * pairs)))


def one_room(members: int) -> Topology:
    """`fanout`: one group room; user 0 is the only sender."""
    return _topology("group", [tuple(range(members))], {0})


def idle_groups(conns: int, members: int) -> Topology:
    """`idle`: conns users in groups of `members` (the last one may be smaller); no sender."""
    rooms = [tuple(range(s, min(conns, s + members))) for s in range(0, conns, members)]
    return _topology("group", rooms, set())


def resume_groups(clients: int, members: int) -> Topology:
    """`resume`: groups of `members` resuming clients plus one feeder each (the last user)."""
    rooms: list[tuple[int, ...]] = []
    roles: dict[int, str] = {}
    u = 0
    for s in range(0, clients, members):
        size = min(members, clients - s)
        room = tuple(range(u, u + size + 1))
        roles[room[-1]] = FEEDER
        rooms.append(room)
        u += size + 1
    return _topology("group", rooms, set(), roles)


def conn_specs(topo: Topology, urls: list[str], tokens: list[str],
               room_ids: list[str]) -> list[ConnSpec]:
    rooms_of = topo.rooms_of()
    specs = []
    for u in range(topo.n_users):
        mine = rooms_of[u]
        send_room = room_ids[mine[0]] if mine and (u in topo.senders or
                                                   topo.roles.get(u) == FEEDER) else None
        recipients = len(topo.rooms[mine[0]]) if mine else 0
        specs.append(ConnSpec(idx=u, url=urls[u % len(urls)], token=tokens[u],
                              rooms=tuple(room_ids[j] for j in mine), send_room=send_room,
                              recipients=recipients, role=topo.roles.get(u, MEMBER)))
    return specs


def receivers_by_room(specs: list[ConnSpec]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for spec in specs:
        for room in spec.rooms:
            out.setdefault(room, []).append(spec.idx)
    return out
