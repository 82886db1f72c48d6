"""Shared pytest fixtures for chatd tests (helpers live in ``tests/harness.py``).

Fixtures:

* ``valkey_binaries`` (session): ``ValkeyBinaries(server, cli)`` paths
* ``valkey`` (function): a running private :class:`ValkeyProcess`
* ``make_valkey_cluster`` (function): ``await make_valkey_cluster(masters=3,
  replicas_per_master=0)`` -> running :class:`ValkeyCluster`
* ``valkey_cluster`` (function): a running 3-master cluster
* ``redis_backend`` (function, parametrized ``standalone`` / ``cluster``): a running
  :class:`RedisBackend`; ``await chatd_nodes.start(n, **redis_backend.chatd_args)``
  runs the same test on one Valkey and on a 3-master Valkey Cluster
* ``chatd_nodes`` (function): :class:`ChatdNodes` factory, ``await chatd_nodes.start(n, ...)``
* ``one_node`` (function): :class:`OneNode` on ``valkey``; ``async with one_node.chat(env) as
  chat:`` starts a chatd node and gives a :class:`tests.client.Chat` on it
* ``fake_redis_server`` / ``fake_redis`` (function): fresh ``fakeredis`` server + async client

Everything a fixture starts is killed at teardown, also when the test fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import fakeredis
import pytest

from tests.client import FAST_ENV, Chat
from tests.harness import (
    ChatdNode,
    ChatdNodes,
    ValkeyBinaries,
    ValkeyCluster,
    ValkeyProcess,
    assert_clean_logs,
    find_valkey_binaries,
    kill_all_spawned,
)

# ------------------------------------------------------------- test outcome tracking

_phase_reports = pytest.StashKey[dict[str, pytest.TestReport]]()
_log_problem_reports: list[str] = []


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_phase_reports, {})[report.when] = report
    return report


def _test_failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_phase_reports, {})
    return any(r.failed for r in reports.values())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _log_problem_reports:
        terminalreporter.section("chatd log problems (reported, not failing)", yellow=True)
        for text in _log_problem_reports:
            terminalreporter.write_line(text)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: the test's Redis is a 3-master Valkey Cluster "
        "(deselect with -m 'not cluster')")


def pytest_sessionfinish(session: pytest.Session) -> None:
    kill_all_spawned()  # safety net; fixtures already stop what they start


# ------------------------------------------------------------------------- valkey


@pytest.fixture(scope="session")
def valkey_binaries() -> ValkeyBinaries:
    """Paths to ``valkey-server`` and ``valkey-cli``."""
    return find_valkey_binaries()


@pytest.fixture
async def valkey(valkey_binaries: ValkeyBinaries, tmp_path: Path) -> AsyncIterator[ValkeyProcess]:
    """A private valkey-server on 127.0.0.1 (appendonly), killed at teardown."""
    server = ValkeyProcess(valkey_binaries, tmp_path / "valkey")
    try:
        await server.start()
        yield server
    finally:
        server.close()


class ValkeyClusterFactory(Protocol):
    def __call__(
        self, masters: int = 3, replicas_per_master: int = 0
    ) -> Awaitable[ValkeyCluster]: ...


@pytest.fixture
async def make_valkey_cluster(
    valkey_binaries: ValkeyBinaries, tmp_path: Path
) -> AsyncIterator[ValkeyClusterFactory]:
    """``await make_valkey_cluster(masters=3, replicas_per_master=0)``; all killed at teardown."""
    clusters: list[ValkeyCluster] = []

    async def make(masters: int = 3, replicas_per_master: int = 0) -> ValkeyCluster:
        cluster = ValkeyCluster(
            valkey_binaries,
            tmp_path / f"cluster{len(clusters)}",
            masters=masters,
            replicas_per_master=replicas_per_master,
        )
        clusters.append(cluster)
        await cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.close()


@pytest.fixture
async def valkey_cluster(make_valkey_cluster: ValkeyClusterFactory) -> ValkeyCluster:
    """A healthy 3-master, 0-replica valkey cluster."""
    return await make_valkey_cluster()


# ----------------------------------------------------------------- redis backends


@dataclass
class RedisBackend:
    """What a test's chatd nodes run on: one Valkey (``valkey``) or a Valkey Cluster
    (``cluster``, 3 masters, no replicas). Exactly one of the two is set."""

    kind: str
    valkey: ValkeyProcess | None = None
    cluster: ValkeyCluster | None = None

    @property
    def is_cluster(self) -> bool:
        return self.cluster is not None

    @property
    def chatd_args(self) -> dict[str, Any]:
        """Keyword arguments for ``chatd_nodes.start``: ``redis_url`` or ``redis_cluster``."""
        if self.cluster is not None:
            return {"redis_cluster": self.cluster}
        return {"redis_url": self.valkey}

    async def client(self, **kwargs: Any) -> Any:
        """A ``Redis`` or an initialized ``RedisCluster`` for checks (caller ``aclose()``s)."""
        if self.cluster is not None:
            return await self.cluster.client(**kwargs)
        assert self.valkey is not None
        return self.valkey.client(**kwargs)


REDIS_BACKENDS = ["standalone", pytest.param("cluster", marks=pytest.mark.cluster)]


@pytest.fixture(params=REDIS_BACKENDS)
async def redis_backend(
    request: pytest.FixtureRequest, valkey_binaries: ValkeyBinaries, tmp_path: Path
) -> AsyncIterator[RedisBackend]:
    """The test runs twice: on one Valkey and on a 3-master Valkey Cluster.

    Request it before ``chatd_nodes`` so that Redis outlives the nodes at teardown.
    """
    if request.param == "cluster":
        cluster = ValkeyCluster(valkey_binaries, tmp_path / "cluster")
        try:
            await cluster.start()
            yield RedisBackend("cluster", cluster=cluster)
        finally:
            cluster.close()
    else:
        server = ValkeyProcess(valkey_binaries, tmp_path / "valkey")
        try:
            await server.start()
            yield RedisBackend("standalone", valkey=server)
        finally:
            server.close()


# -------------------------------------------------------------------------- chatd


@pytest.fixture
async def chatd_nodes(
    request: pytest.FixtureRequest, valkey_binaries: ValkeyBinaries, tmp_path: Path
) -> AsyncIterator[ChatdNodes]:
    """Factory: ``nodes = await chatd_nodes.start(n, redis_url=..., ...)``.

    Teardown: SIGTERM every running node, wait up to 10 s, SIGKILL the rest. Log
    problems (tracebacks, "unhandled" error lines) are reported -- in the test's
    teardown section and the terminal summary -- but do not fail the test; call
    ``assert_clean_logs(node)`` for that. If the test failed, log tails are attached.
    """
    factory = ChatdNodes(tmp_path / "chatd", valkey_binaries)
    try:
        yield factory
    finally:
        await factory.close()
        item = request.node
        if isinstance(item, pytest.Item) and _test_failed(item):
            for node in factory.nodes:
                item.add_report_section(
                    "teardown", f"chatd {node.node_id} log tail", node.log_tail(80)
                )
        problems = factory.log_problems() if factory.report_log_problems else {}
        if problems:
            text = "\n".join(
                f"{request.node.nodeid} :: {node_id}:\n" + "\n".join(lines)
                for node_id, lines in problems.items()
            )
            _log_problem_reports.append(text)
            if isinstance(item, pytest.Item):
                item.add_report_section("teardown", "chatd log problems", text)


@dataclass
class OneNode:
    """Starts the test's single chatd node (on the test's Redis, with ``FAST_ENV``)."""

    chatd_nodes: ChatdNodes
    redis_args: dict[str, Any]

    async def start(self, env: Mapping[str, str] | None = None) -> ChatdNode:
        """The node, its environment ``FAST_ENV`` updated with ``env``."""
        (node,) = await self.chatd_nodes.start(1, **self.redis_args,
                                               env={**FAST_ENV, **(env or {})})
        return node

    @contextlib.asynccontextmanager
    async def chat(self, env: Mapping[str, str] | None = None, *,
                   clean_logs: bool = True) -> AsyncIterator[Chat]:
        """Start the node and yield a :class:`Chat` on it (``chat.node``). On the way out
        the connections are closed and, unless ``clean_logs=False`` or the body raised,
        ``assert_clean_logs(node)``."""
        node = await self.start(env)
        async with Chat(node) as chat:
            yield chat
        if clean_logs:
            assert_clean_logs(node)


@pytest.fixture
def one_node(valkey: ValkeyProcess, chatd_nodes: ChatdNodes) -> OneNode:
    """A :class:`OneNode` on the test's private ``valkey``."""
    return OneNode(chatd_nodes, {"redis_url": valkey})


# ---------------------------------------------------------------------- fakeredis


@pytest.fixture
def fake_redis_server() -> fakeredis.FakeServer:
    """A fresh fake server per test (Lua globals must not leak between tests)."""
    return fakeredis.FakeServer()


@pytest.fixture
async def fake_redis(
    fake_redis_server: fakeredis.FakeServer,
) -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    """``FakeAsyncRedis`` (bytes responses, Lua via lupa) on ``fake_redis_server``."""
    client = fakeredis.FakeAsyncRedis(server=fake_redis_server, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()
