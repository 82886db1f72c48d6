"""Peer systems measured with the same workloads: python-socketio on aiohttp + Redis
pub/sub (sio_server.py), Node socket.io 4.8 + @socket.io/redis-streams-adapter (node/).
Both speak socket.io, so one lean client (sio_client.py) drives both."""
