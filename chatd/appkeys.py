"""Typed application state keys, shared by the modules that register handlers."""

from __future__ import annotations

import asyncio

from aiohttp import web

from chatd.config import Settings
from chatd.fanout import Fanout
from chatd.hellowaits import HelloWaits
from chatd.node import Node

SETTINGS = web.AppKey("settings", Settings)
NODE = web.AppKey("node", Node)
FANOUT = web.AppKey("fanout", Fanout)
HELLO_WAITS = web.AppKey("hello_waits", HelloWaits)
# Connections between their hello and their welcome (ws.py), at most limits.welcomes_at_once.
WELCOMES = web.AppKey("welcomes", asyncio.Semaphore)
