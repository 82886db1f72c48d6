--[[ publish_typing: tell a room's other members that a member types (nothing stored).

KEYS[1]  room members hash
KEYS[2]  room interest set
KEYS[3]  inbox prefix of the room's partition
ARGV[1]  room id
ARGV[2]  user id
ARGV[3]  the typing frame, JSON
ARGV[4]  inbox max length

Returns  the number of nodes the event went to; CHATD_NOT_FOUND for a non-member.

Invariant: only a member's typing reaches the room.
]]
local members_key = KEYS[1]
local nodes_key = KEYS[2]
local inbox_prefix = KEYS[3]
local room_id = ARGV[1]
local user = ARGV[2]
local frame = ARGV[3]
local inbox_maxlen = ARGV[4]

if redis.call('HEXISTS', members_key, user) == 0 then
  return redis.error_reply('CHATD_NOT_FOUND no such room')
end
return fanout(nodes_key, inbox_prefix, inbox_maxlen, {'k', 't', 'r', room_id, 'u', user, 'f', frame})
