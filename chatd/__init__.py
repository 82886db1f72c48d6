"""chatd: a self-hosted, real-time chat server on aiohttp and Redis streams."""

__version__ = "0.1.0"
