--[[ create_session: store a login session that expires by itself.

KEYS[1]  the session (hash: username, created_at, expires_at)
ARGV[1]  time to live in milliseconds
ARGV[2]  the user's (folded) username

Returns  expires_at, in ms since the Unix epoch (server time).

Invariant: the record never exists without its TTL, so a crash cannot leave a
session that lives for ever.
]]
local session = KEYS[1]
local ttl_ms = tonumber(ARGV[1])
local username = ARGV[2]

local now = now_ms()
local expires_at = now + ttl_ms
redis.call('HSET', session, 'username', username, 'created_at', now, 'expires_at', expires_at)
redis.call('PEXPIRE', session, ttl_ms)
return expires_at
