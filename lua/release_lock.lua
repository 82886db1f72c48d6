--[[ release_lock: delete a lock only if we still own it.

KEYS[1]  the lock key (string holding the owner token)
ARGV[1]  the owner token set by `SET key token NX PX ttl`

Returns  1 when released, 0 when the lock was gone or owned by someone else.

Invariant: a holder whose lock expired and was taken by another can never
release the new holder's lock.
]]
local lock = KEYS[1]
local owner = ARGV[1]
if redis.call('GET', lock) == owner then
  return redis.call('DEL', lock)
end
return 0
