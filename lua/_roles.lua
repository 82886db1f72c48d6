--[[ _roles: the room role hierarchy, shared by add_member and remove_member.

owner > admin > member. Only an owner or an admin manages members, and only
strictly below itself: an admin adds and removes members, the owner also
admins, and nobody but the owner itself (leaving) removes the owner.
]]
local ROLE_RANK = {member = 1, admin = 2, owner = 3}

-- True when a member with actor_role may add or remove someone holding target_role.
local function can_manage(actor_role, target_role)
  local actor = ROLE_RANK[actor_role] or 0
  return actor >= ROLE_RANK.admin and actor > (ROLE_RANK[target_role] or 0)
end

-- The actor's role in a group room, or an error reply: not_found for a
-- non-member (existence is not revealed), forbidden for a direct room.
local function group_role(room, members, actor)
  local actor_role = redis.call('HGET', members, actor)
  if not actor_role then
    return nil, redis.error_reply('CHATD_NOT_FOUND no such room')
  end
  if redis.call('HGET', room, 'kind') ~= 'group' then
    return nil, redis.error_reply('CHATD_FORBIDDEN the members of a direct room never change')
  end
  return actor_role, nil
end
