--[[ extend_lock: renew a lock's lease only if we still own it.

KEYS[1]  the lock key
ARGV[1]  the owner token
ARGV[2]  new time to live in milliseconds

Returns  1 when extended, 0 when the lock is no longer ours.

Invariant: the lease of another owner is never extended; a 0 tells the caller
to stop the guarded work (the fencing check).
]]
local lock = KEYS[1]
local owner = ARGV[1]
local ttl_ms = ARGV[2]
if redis.call('GET', lock) == owner then
  return redis.call('PEXPIRE', lock, ttl_ms)
end
return 0
