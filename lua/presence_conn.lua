--[[ presence_conn: count a user's connections per node; report online/offline edges.

KEYS[1]  the user's node hash (node id -> open connections on that node)
KEYS[2]  the user's presence hash (field last_seen, ms)
ARGV[1]  node id
ARGV[2]  "open", "close" or "drop" (drop: the node is gone, forget all its connections)
ARGV[3]  per-user connection limit across all nodes (used by "open")

Returns  {edge, last_seen}: edge 1 when the user came online, -1 when the user
         went offline, 0 otherwise; CHATD_TOO_MANY when "open" passes the limit.

Invariant: the user is online exactly while the hash has a node with a
positive count, whichever node connects or dies; last_seen is the time the
user was last seen online, kept when they go offline.
]]
local nodes_key = KEYS[1]
local presence_key = KEYS[2]
local node_id = ARGV[1]
local op = ARGV[2]
local limit = tonumber(ARGV[3])

local now = now_ms()
local was_online = redis.call('HLEN', nodes_key) > 0

if op == 'open' then
  local total = 0
  local counts = redis.call('HVALS', nodes_key)
  for i = 1, #counts do total = total + tonumber(counts[i]) end
  if total >= limit then
    return redis.error_reply('CHATD_TOO_MANY ' .. total .. ' connections open')
  end
  redis.call('HINCRBY', nodes_key, node_id, 1)
elseif op == 'close' then
  if redis.call('HINCRBY', nodes_key, node_id, -1) <= 0 then
    redis.call('HDEL', nodes_key, node_id)
  end
else
  redis.call('HDEL', nodes_key, node_id)
end

local online = redis.call('HLEN', nodes_key) > 0
redis.call('HSET', presence_key, 'last_seen', now)
if online and not was_online then return {1, now} end
if was_online and not online then return {-1, now} end
return {0, now}
