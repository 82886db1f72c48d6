--[[ take_token: a token bucket, refilled continuously (the logic is take_token in _lib.lua).

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

local wait_ms = take_token(bucket, rate, burst, cost)
if wait_ms > 0 then
  return {0, wait_ms}
end
return {1, 0}
