--[[ node_heartbeat: record that a node is alive, unless it was declared dead.

KEYS[1]  the node registry (sorted set: node id -> last heartbeat, ms)
ARGV[1]  node id
ARGV[2]  "join" on start (always records), "beat" afterwards

Returns  {1, now_ms} when recorded; {0, now_ms} when a "beat" found the node
         gone: the janitor presumed it dead and removed its interest and
         inboxes, so the node must drop its connections and join again.

Invariant: a node the janitor removed never silently carries on as if its
interest were still registered (that would lose messages without a sign).
]]
local registry = KEYS[1]
local node_id = ARGV[1]
local mode = ARGV[2]
local now = now_ms()
if mode == 'beat' and not redis.call('ZSCORE', registry, node_id) then
  return {0, now}
end
redis.call('ZADD', registry, now, node_id)
return {1, now}
