--[[ remove_member: the room side of removing a member from a group room (or leaving it).

KEYS[1]  the room (hash: kind, seq, ...)
KEYS[2]  the room's members (hash: user id -> role)
KEYS[3]  the partition's pending index stream
KEYS[4]  the room's interested nodes (set of node ids)
KEYS[5]  the partition's inbox prefix (node id appended)

ARGV[1]  room id
ARGV[2]  acting user id
ARGV[3]  user id to remove (the actor itself to leave)
ARGV[4]  inbox max length
ARGV[5]  the member frame (JSON) for the live event

Returns  {seq, pending entry id}; seq is the room's last seq.
Errors   CHATD_NOT_FOUND the actor is not a member (or no such room), or the
         user to remove is not a member;
         CHATD_FORBIDDEN a direct room, or the actor's role does not allow it.

Invariant: the members hash is the truth: once this returns, every membership
check fails for the removed user, whatever the user's room index still says.
]]
local room = KEYS[1]
local members = KEYS[2]
local pending = KEYS[3]
local nodes = KEYS[4]
local inbox_prefix = KEYS[5]
local room_id = ARGV[1]
local actor = ARGV[2]
local subject = ARGV[3]
local maxlen = ARGV[4]
local frame = ARGV[5]

local actor_role, refused = group_role(room, members, actor)
if refused then return refused end
if subject ~= actor then
  if not can_manage(actor_role, 'member') then
    return redis.error_reply('CHATD_FORBIDDEN only the owner or an admin can remove members')
  end
  local subject_role = redis.call('HGET', members, subject)
  if not subject_role then
    return redis.error_reply('CHATD_NOT_FOUND that user is not a member of this room')
  end
  if not can_manage(actor_role, subject_role) then
    return redis.error_reply('CHATD_FORBIDDEN your role in this room cannot remove a '
                             .. subject_role)
  end
end

local seq = tonumber(redis.call('HGET', room, 'seq') or '0')
redis.call('HDEL', members, subject)
local entry = redis.call('XADD', pending, '*', 'op', 'remove', 'u', subject, 'r', room_id)
fanout(nodes, inbox_prefix, maxlen,
       {'k', 'e', 'r', room_id, 's', seq, 'u', subject, 'ev', 'removed', 'f', frame})
return {seq, entry}
