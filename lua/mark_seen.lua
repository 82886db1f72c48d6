--[[ mark_seen: move a member's delivered/read watermark forward and tell the room.

KEYS[1]  room hash (field seq)
KEYS[2]  room members hash
KEYS[3]  room watermarks hash (d:<user_id> delivered_seq, r:<user_id> read_seq)
KEYS[4]  room interest set
KEYS[5]  inbox prefix of the room's partition
ARGV[1]  room id
ARGV[2]  user id
ARGV[3]  "delivered" or "read"
ARGV[4]  seq (integer >= 0)
ARGV[5]  inbox max length

Returns  {moved (0/1), delivered_seq, read_seq}; CHATD_NOT_FOUND for a
         non-member, CHATD_BAD_REQUEST for a seq above the room's last seq.

Invariant: watermarks never move backwards and read implies delivered
(delivered_seq >= read_seq); a receipt is published only when one moved.
]]
local room_key = KEYS[1]
local members_key = KEYS[2]
local marks_key = KEYS[3]
local nodes_key = KEYS[4]
local inbox_prefix = KEYS[5]
local room_id = ARGV[1]
local user = ARGV[2]
local kind = ARGV[3]
local seq = tonumber(ARGV[4])
local inbox_maxlen = ARGV[5]

if redis.call('HEXISTS', members_key, user) == 0 then
  return redis.error_reply('CHATD_NOT_FOUND no such room')
end
local last = tonumber(redis.call('HGET', room_key, 'seq') or '0')
if seq > last then
  return redis.error_reply('CHATD_BAD_REQUEST seq ' .. seq .. ' is above the last seq ' .. last)
end

local marks = redis.call('HMGET', marks_key, 'd:' .. user, 'r:' .. user)
local delivered = tonumber(marks[1] or '0')
local read = tonumber(marks[2] or '0')
local moved = 0
if seq > delivered then
  delivered = seq
  moved = 1
end
if kind == 'read' and seq > read then
  read = seq
  moved = 1
end
if moved == 0 then
  return {0, delivered, read}
end

redis.call('HSET', marks_key, 'd:' .. user, delivered, 'r:' .. user, read)
local frame = '{"type":"receipt","room_id":"' .. room_id .. '","user_id":"' .. user ..
  '","delivered_seq":' .. delivered .. ',"read_seq":' .. read .. '}'
fanout(nodes_key, inbox_prefix, inbox_maxlen, {'k', 'r', 'r', room_id, 'u', user, 'f', frame})
return {1, delivered, read}
