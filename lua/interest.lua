--[[ interest: register or drop a node's interest in a room.

KEYS[1]  room interest set (node ids)
KEYS[2]  the node's room set in this partition (for the janitor's clean-up)
ARGV[1]  node id
ARGV[2]  room id
ARGV[3]  "add" or "remove"

Returns  1 when the set changed, else 0.

Invariant: a node is in a room's interest set exactly when the room is in the
node's room set of that partition, so a dead node's interest can be found
and removed from its own set alone.
]]
local room_nodes = KEYS[1]
local node_rooms = KEYS[2]
local node_id = ARGV[1]
local room_id = ARGV[2]
local op = ARGV[3]

if op == 'add' then
  redis.call('SADD', node_rooms, room_id)
  return redis.call('SADD', room_nodes, node_id)
end
redis.call('SREM', node_rooms, room_id)
return redis.call('SREM', room_nodes, node_id)
