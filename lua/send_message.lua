--[[ send_message: store a message in its room's log and fan it out, atomically.

KEYS[1]  room hash (field seq: the room's last seq)
KEYS[2]  room members hash (user_id -> role)
KEYS[3]  room log stream (entry id <seq>-0, fields m: message JSON, u: sender, t: ts)
KEYS[4]  room interest set (ids of nodes holding a member's connection)
KEYS[5]  inbox prefix of the room's partition (node id appended)
KEYS[6]  idempotency key of (sender, room, client_msg_id)
KEYS[7]  optional: the sender's send bucket. Given on a standalone Redis, where
         one script may touch keys of any tag, so a send is one round trip;
         on a cluster it lives in another slot and the caller takes the token
         with take_token.lua first.
ARGV[1]  room id
ARGV[2]  sender user id
ARGV[3]  client_msg_id ([A-Za-z0-9_-]{1,64}, checked by the caller)
ARGV[4]  body, already encoded as a JSON string literal
ARGV[5]  idempotency window in milliseconds
ARGV[6]  retention: "maxlen" or "max_age"
ARGV[7]  retention value: max entries, or max age in milliseconds
ARGV[8]  inbox max length
ARGV[9]  send bucket rate per second (with KEYS[7])
ARGV[10] send bucket burst (with KEYS[7])

Returns  {seq, ts, duplicate (0/1)}; CHATD_NOT_FOUND when the sender is not a
         member (also when the room does not exist: existence is not revealed);
         CHATD_RATE_LIMITED <retry_after_ms> when the bucket is empty.

Invariant: seq is the room's next integer with no gaps; the log entry, the
idempotency record and every inbox entry are written together or not at all,
so a retried send (same client_msg_id) is stored and delivered exactly once.
A duplicate is answered before the bucket is consulted; a refused send takes
no token and stores nothing.
]]
local room_key = KEYS[1]
local members_key = KEYS[2]
local log_key = KEYS[3]
local nodes_key = KEYS[4]
local inbox_prefix = KEYS[5]
local idem_key = KEYS[6]
local bucket_key = KEYS[7]
local room_id = ARGV[1]
local sender = ARGV[2]
local client_msg_id = ARGV[3]
local body_json = ARGV[4]
local idem_ttl_ms = ARGV[5]
local retention = ARGV[6]
local retention_value = tonumber(ARGV[7])
local inbox_maxlen = ARGV[8]
local bucket_rate = tonumber(ARGV[9])
local bucket_burst = tonumber(ARGV[10])

if redis.call('HEXISTS', members_key, sender) == 0 then
  return redis.error_reply('CHATD_NOT_FOUND no such room')
end

local previous = redis.call('GET', idem_key)
if previous then
  -- A write, so that a WAIT after a retried send also covers the original.
  redis.call('SET', idem_key, previous, 'KEEPTTL')
  local sep = string.find(previous, ':', 1, true)
  return {tonumber(string.sub(previous, 1, sep - 1)), tonumber(string.sub(previous, sep + 1)), 1}
end

if bucket_key then
  local wait_ms = take_token(bucket_key, bucket_rate, bucket_burst, 1)
  if wait_ms > 0 then
    return redis.error_reply('CHATD_RATE_LIMITED ' .. wait_ms)
  end
end

local seq = redis.call('HINCRBY', room_key, 'seq', 1)
local ts = now_ms()
local message = '{"room_id":"' .. room_id .. '","seq":' .. seq .. ',"sender_id":"' .. sender ..
  '","client_msg_id":"' .. client_msg_id .. '","body":' .. body_json .. ',"ts":' .. ts .. '}'

if retention == 'maxlen' then
  redis.call('XADD', log_key, 'MAXLEN', '~', retention_value, seq .. '-0',
    'm', message, 'u', sender, 't', ts)
else
  redis.call('XADD', log_key, seq .. '-0', 'm', message, 'u', sender, 't', ts)
  -- Age-based trim, amortised: each send drops at most a few expired entries
  -- from the head, which keeps up because every send adds only one.
  local head = redis.call('XRANGE', log_key, '-', '+', 'COUNT', 8)
  local expired_upto = nil
  for i = 1, #head do
    local fields = head[i][2]
    local t = ts
    for j = 1, #fields, 2 do
      if fields[j] == 't' then t = tonumber(fields[j + 1]) end
    end
    if t >= ts - retention_value then break end
    expired_upto = tonumber(string.match(head[i][1], '^(%d+)'))
  end
  if expired_upto ~= nil then
    redis.call('XTRIM', log_key, 'MINID', (expired_upto + 1) .. '-0')
  end
end

redis.call('SET', idem_key, seq .. ':' .. ts, 'PX', idem_ttl_ms)
fanout(nodes_key, inbox_prefix, inbox_maxlen,
  {'k', 'm', 'r', room_id, 's', seq, 'f', '{"type":"message",' .. string.sub(message, 2)})
return {seq, ts, 0}
