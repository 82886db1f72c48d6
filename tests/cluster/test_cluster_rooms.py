"""The rooms suite of tests/integration/test_rooms.py (the HTTP authorization matrix,
existence hiding, membership flows, the crash between the room side and the user side)
collected a second time, here, with a `make_client` whose in-process apps use a
3-master Valkey Cluster instead of one Valkey. Nothing is copied: the test functions
are imported and pytest runs them with this module's fixtures.

One cluster serves the whole module (the tests use fixed usernames, so every master is
flushed before each test); that keeps the nine variants to a few seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd import config
from chatd.app import create_app
from tests.harness import ValkeyBinaries, ValkeyCluster
from tests.integration.test_accounts import (  # noqa: F401 (fixtures are used by name)
    CHEAP_AUTH,
    Client,
    MakeClient,
    client_fixture,
)
from tests.integration.test_rooms import (  # noqa: F401 (collected again, on the cluster)
    test_add_remove_and_leave,
    test_authorization_matrix,
    test_crash_between_room_side_and_user_side,
    test_create_room_rejects_bad_input,
    test_direct_room_is_found_again_from_either_side,
    test_group_room_object,
    test_member_bodies_are_validated,
    test_non_member_cannot_tell_a_room_exists,
    test_room_list_summarizes_messages,
)

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def shared_cluster(valkey_binaries: ValkeyBinaries,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    cluster = ValkeyCluster(valkey_binaries, tmp_path_factory.mktemp("rooms-cluster"))
    try:
        asyncio.run(cluster.start())
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(name="make_client")
async def make_client_on_cluster(shared_cluster: ValkeyCluster, tmp_path: Path,
                                 aiohttp_client: Any) -> MakeClient:
    for port in await shared_cluster.masters():
        async with shared_cluster.node_client(port) as r:
            await r.flushall()
    made = 0

    async def make(**overrides: Any) -> Client:
        nonlocal made
        made += 1
        flags = {"redis.cluster_nodes": shared_cluster.startup_nodes.split(","),
                 "server.data_dir": str(tmp_path / f"node{made}"), **CHEAP_AUTH, **overrides}
        client: Client = await aiohttp_client(create_app(config.load(None, {}, flags)))
        return client

    return make
