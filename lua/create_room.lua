--[[ create_room: create a room with its first members; for a direct room, claim the pair.

KEYS[1]  the room (hash: kind, name, created_at, created_by, seq)
KEYS[2]  the room's members (hash: user id -> role)
KEYS[3]  the partition's pending index stream (fields op, u, r)
KEYS[4]  direct rooms only: the pair claim (string: room id), same partition as the room

ARGV[1]  room id
ARGV[2]  kind: 'group' or 'direct'
ARGV[3]  name ('' for a direct room)
ARGV[4]  creator's user id
ARGV[5..] user id, role, user id, role, ... (every first member, the creator included)

Returns  {1, room_id, pending entry id of each member in ARGV order} when created,
         {0, room_id} when the pair already has a room (that room's id) or the room
         exists already (a retried call).

Invariant: the pair claim and the room it names are written together, so a pair
never names a missing room and two concurrent creations for one pair, on any
nodes, end with one room. Every new member has a pending entry until the user-side
index step has run for it.
]]
local room = KEYS[1]
local members = KEYS[2]
local pending = KEYS[3]
local pair = KEYS[4]
local room_id = ARGV[1]
local kind = ARGV[2]
local name = ARGV[3]
local creator = ARGV[4]

if pair then
  local existing = redis.call('GET', pair)
  if existing then
    return {0, existing}
  end
end
if redis.call('EXISTS', room) == 1 then
  return {0, room_id}
end

redis.call('HSET', room, 'kind', kind, 'name', name, 'created_at', now_ms(),
           'created_by', creator, 'seq', 0)
local reply = {1, room_id}
for i = 5, #ARGV, 2 do
  local user_id = ARGV[i]
  redis.call('HSET', members, user_id, ARGV[i + 1])
  reply[#reply + 1] = redis.call('XADD', pending, '*', 'op', 'add', 'u', user_id, 'r', room_id)
end
if pair then
  redis.call('SET', pair, room_id)
end
return reply
