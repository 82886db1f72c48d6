// The second peer: the same minimal chat as ../sio_server.py, on Node socket.io 4.8
// with @socket.io/redis-streams-adapter, run as `node server.js --port P --redis-url URL`.
//
// Per message: the client emits `send` {room, body} with an ack id; the server emits
// `message` {room, from, body} to the room and acks. The adapter XADDs every broadcast
// to one Redis stream (`socket.io`, MAXLEN ~10000) that every node reads with XREAD
// BLOCK; the local members get the message once the XADD is answered. The ack does
// not wait for that (socket.io's broadcast emit returns nothing to await), which is
// what a typical socket.io chat does. No storage beyond the capped stream, no
// sequence numbers, no receipts, no resume (connection state recovery is off, as in
// the python peer).
//
// Connection: auth = {user: NAME, rooms: [ROOM, ...]}; the rooms are joined in a
// middleware, i.e. before the connect is acknowledged, so a client may send as soon
// as it is connected. Heartbeat: Engine.IO ping every 20 s, like the python peer.

import { createServer } from "node:http";
import { parseArgs } from "node:util";

import { createAdapter } from "@socket.io/redis-streams-adapter";
import { createClient } from "redis";
import { Server } from "socket.io";

const { values: args } = parseArgs({
  options: { port: { type: "string" }, "redis-url": { type: "string" } },
});
if (!args.port || !args["redis-url"]) {
  console.error("usage: node server.js --port P --redis-url URL");
  process.exit(2);
}

const redis = createClient({ url: args["redis-url"] });
// Without a listener node-redis's reconnect errors would crash the process.
redis.on("error", (err) => console.error(`redis: ${err.message}`));
await redis.connect();

// socket.io answers /socket.io/ itself and hands every other request to this handler.
const http = createServer((req, res) => {
  if (req.url === "/healthz") res.end("ok");
  else res.writeHead(404).end();
});
const io = new Server(http, {
  adapter: createAdapter(redis),
  transports: ["websocket"],
  pingInterval: 20_000,
  pingTimeout: 20_000,
  serveClient: false,
});

io.use((socket, next) => {
  const { user, rooms } = socket.handshake.auth;
  if (typeof user !== "string") {
    next(new Error("auth.user missing"));
    return;
  }
  socket.data.user = user;
  socket.join(Array.isArray(rooms) ? rooms.map(String) : []);
  next();
});

io.on("connection", (socket) => {
  socket.on("send", (data, ack) => {
    // A malformed frame must not throw: an exception in a handler ends the process.
    if (typeof data?.room !== "string" || typeof ack !== "function") return;
    io.to(data.room).emit("message", { room: data.room, from: socket.data.user, body: data.body });
    ack({ ok: true });
  });
});

http.listen(Number(args.port), "127.0.0.1", () => {
  console.log(`node peer ready on 127.0.0.1:${args.port}`);
});
