--[[ take_token: a token bucket, refilled continuously.

KEYS[1]  the bucket (hash: tokens, ms)
ARGV[1]  refill rate, tokens per second (float)
ARGV[2]  burst: capacity of the bucket (integer)
ARGV[3]  cost of this call in tokens (integer, usually 1)

Returns  {1, 0} when the tokens were taken, {0, retry_after_ms} when not.

Invariant: tokens stay within [0, burst]; a refused call takes nothing, so a
refused request never consumes capacity. The key expires once it would be full
again, so idle buckets cost no memory.
]]
local bucket = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local state = redis.call('HMGET', bucket, 'tokens', 'ms')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
  tokens = burst
  last = now
end
tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)

if tokens < cost then
  local wait_ms = math.ceil((cost - tokens) * 1000 / rate)
  return {0, wait_ms}
end

tokens = tokens - cost
redis.call('HSET', bucket, 'tokens', tostring(tokens), 'ms', now)
redis.call('PEXPIRE', bucket, math.ceil((burst - tokens) * 1000 / rate) + 1000)
return {1, 0}
