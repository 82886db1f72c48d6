"""The Node peer's runtime: find ``node`` and ``npm``, install ``bench/peers/node/`` once.

The server is ``bench/peers/node/server.js`` (socket.io 4.8 with
@socket.io/redis-streams-adapter); its dependencies are pinned by the committed
``package-lock.json`` and installed with ``npm ci`` into the gitignored
``node_modules``. Anything missing or failing makes the run skip this peer with
the reason, never fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

NODE_PEER_DIR = Path(__file__).resolve().parent / "node"
SERVER_JS = NODE_PEER_DIR / "server.js"
NPM_CI_TIMEOUT_S = 300
# What the figures depend on besides node itself (reported in the setup line).
PACKAGES = ("socket.io", "@socket.io/redis-streams-adapter", "redis")


def node_binary() -> str | None:
    return shutil.which("node")


def _installed() -> bool:
    # npm writes node_modules/.package-lock.json last: a tree from an interrupted or
    # failed install lacks it, and one older than package-lock.json is stale.
    marker = NODE_PEER_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_PEER_DIR / "package-lock.json"
    return marker.is_file() and marker.stat().st_mtime >= lock.stat().st_mtime


def prepare(say: Callable[[str], None]) -> str | None:
    """Make the Node peer runnable: None, or why it cannot run here."""
    npm = shutil.which("npm")
    if node_binary() is None or npm is None:
        return "node and npm are needed on PATH (Node.js >= 18)"
    if _installed():
        return None
    say(f"node peer: installing its dependencies (npm ci in {NODE_PEER_DIR})")
    started = time.monotonic()
    try:
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_PEER_DIR,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=NPM_CI_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"npm ci did not finish within {NPM_CI_TIMEOUT_S}s"
    except OSError as e:
        return f"npm ci could not start: {e}"
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        # npm prints the error code and message first, then a stack and the log's path.
        lines = [line.removeprefix("npm error").strip()
                 for line in (proc.stderr or proc.stdout).splitlines()]
        why = "; ".join([line for line in lines if line][:4])
        return f"npm ci failed after {seconds:.1f}s (exit {proc.returncode}): {why}"
    say(f"node peer: npm ci took {seconds:.1f}s")
    return None


def versions() -> str:
    """``node vX, socket.io A, ...`` as installed (for the setup line of a run)."""
    node = node_binary()
    assert node is not None, "versions() is for after a successful prepare()"
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10,
                         check=False).stdout.strip()
    parts = [f"node {out or '?'}"]
    for name in PACKAGES:
        meta = NODE_PEER_DIR / "node_modules" / name / "package.json"
        parts.append(f"{name} {json.loads(meta.read_text())['version']}")
    return ", ".join(parts)
