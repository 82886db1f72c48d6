"""Peer systems measured with the same workloads (python-socketio on aiohttp + Redis)."""
