--[[ _lib: helpers prepended by chatd/scripts.py to every script (files named _*.lua
are libraries, never run on their own). Keep them pure functions of their arguments.
]]

-- Server time in milliseconds: every node agrees on it, whatever their clocks say.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Append one event to the partition inbox of every node interested in a room.
-- nodes_key and inbox_prefix carry the room's partition tag, so this stays in
-- the script's slot. Inboxes are trimmed approximately: a node that falls more
-- than maxlen entries behind gets a gap, which it fills from the room log.
local function fanout(nodes_key, inbox_prefix, maxlen, fields)
  local nodes = redis.call('SMEMBERS', nodes_key)
  for i = 1, #nodes do
    redis.call('XADD', inbox_prefix .. nodes[i], 'MAXLEN', '~', maxlen, '*', unpack(fields))
  end
  return #nodes
end

-- Token bucket (hash: tokens, ms), refilled continuously at `rate` per second up
-- to `burst`. Takes `cost` tokens or nothing; returns 0 when taken, else the
-- milliseconds until they will be there. The key expires once the bucket would
-- be full again, so idle buckets cost no memory.
local function take_token(bucket, rate, burst, cost)
  local now = now_ms()
  local state = redis.call('HMGET', bucket, 'tokens', 'ms')
  local tokens = tonumber(state[1])
  local last = tonumber(state[2])
  if tokens == nil or last == nil then
    tokens = burst
    last = now
  end
  tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
  if tokens < cost then
    return math.ceil((cost - tokens) * 1000 / rate)
  end
  tokens = tokens - cost
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'ms', now)
  redis.call('PEXPIRE', bucket, math.ceil((burst - tokens) * 1000 / rate) + 1000)
  return 0
end
