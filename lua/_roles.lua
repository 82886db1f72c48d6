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
