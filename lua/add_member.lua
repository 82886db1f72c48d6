--[[ add_member: the room side of adding a member to a group room.

KEYS[1]  the room (hash: kind, seq, ...)
KEYS[2]  the room's members (hash: user id -> role)
KEYS[3]  the partition's pending index stream
KEYS[4]  the room's interested nodes (set of node ids)
KEYS[5]  the partition's inbox prefix (node id appended)

ARGV[1]  room id
ARGV[2]  acting user id
ARGV[3]  user id to add
ARGV[4]  role to give: 'member' or 'admin'
ARGV[5]  '1' when the user to add exists (a user key is in another slot)
ARGV[6]  maximum number of members
ARGV[7]  '1' when the user to add is in the maximum number of rooms (its room index
         is in another slot: counted by the caller just before)
ARGV[8]  inbox max length
ARGV[9]  the member frame (JSON) for the live event

Returns  {1, seq, pending entry id} when added; {0, seq} when already a member
         (nothing changes, whatever the role asked). seq is the room's last seq.
Errors   CHATD_NOT_FOUND the actor is not a member (or no such room);
         CHATD_FORBIDDEN a direct room, or the actor may not grant that role;
         CHATD_BAD_REQUEST unknown user; CHATD_CONFLICT the room is full, or the
         user is in the maximum number of rooms.

Invariant: the members hash is the truth; the pending entry and the event are
written in the same step, so a member is never added without both.
]]
local room = KEYS[1]
local members = KEYS[2]
local pending = KEYS[3]
local nodes = KEYS[4]
local inbox_prefix = KEYS[5]
local room_id = ARGV[1]
local actor = ARGV[2]
local subject = ARGV[3]
local role = ARGV[4]
local subject_exists = ARGV[5]
local max_members = tonumber(ARGV[6])
local subject_full = ARGV[7]
local maxlen = ARGV[8]
local frame = ARGV[9]

local actor_role, refused = group_role(room, members, actor)
if refused then return refused end
if not can_manage(actor_role, role) then
  return redis.error_reply('CHATD_FORBIDDEN your role in this room cannot add a ' .. role)
end
if subject_exists ~= '1' then
  return redis.error_reply('CHATD_BAD_REQUEST unknown user id')
end
local seq = tonumber(redis.call('HGET', room, 'seq') or '0')
if redis.call('HEXISTS', members, subject) == 1 then
  return {0, seq}
end
if redis.call('HLEN', members) >= max_members then
  return redis.error_reply('CHATD_CONFLICT the room has the maximum number of members')
end
if subject_full == '1' then
  return redis.error_reply('CHATD_CONFLICT the user is in the maximum number of rooms ' ..
                           '(limits.max_rooms_per_user)')
end

redis.call('HSET', members, subject, role)
local entry = redis.call('XADD', pending, '*', 'op', 'add', 'u', subject, 'r', room_id)
fanout(nodes, inbox_prefix, maxlen,
       {'k', 'e', 'r', room_id, 's', seq, 'u', subject, 'ev', 'added', 'f', frame})
return {1, seq, entry}
