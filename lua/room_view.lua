--[[ room_view: a room as one member sees it, read in one consistent step.

KEYS[1]  the room (hash: kind, name, created_at, created_by, seq)
KEYS[2]  the room's members (hash: user id -> role)
KEYS[3]  the room's watermarks (hash: 'r:<user id>' -> read_seq, ...)
KEYS[4]  the room's log (stream; entry id '<seq>-0', fields m: the message JSON, u: sender)

ARGV[1]  the asking user's id
ARGV[2]  '1' to add the summary (unread, last message), '0' for the room alone
ARGV[3]  unread scan cap: at most this many messages are read to find the asker's own

Returns  {kind, name, created_at, created_by, {user id, role, ...}, last_seq,
          unread, last message JSON or false}; unread and the last message are 0
          and false without the summary.
Errors   CHATD_NOT_FOUND when the asker is not a member (or there is no such room).

Invariant: only a member reads a room. unread = messages above the asker's
read_seq minus the asker's own among the newest `cap` of them: exact when at
most `cap` are unread, an upper bound beyond (seqs have no gaps, so the count
needs no scan; only the sender check does).
]]
local room = KEYS[1]
local members = KEYS[2]
local marks = KEYS[3]
local log = KEYS[4]
local user_id = ARGV[1]
local summary = ARGV[2] == '1'
local scan_cap = tonumber(ARGV[3])

if redis.call('HEXISTS', members, user_id) == 0 then
  return redis.error_reply('CHATD_NOT_FOUND no such room')
end
local meta = redis.call('HMGET', room, 'kind', 'name', 'created_at', 'created_by', 'seq')
local last_seq = tonumber(meta[5] or '0')
local unread = 0
local last_message = false
if summary then
  local read_seq = tonumber(redis.call('HGET', marks, 'r:' .. user_id) or '0')
  if last_seq > read_seq then
    local newest = redis.call('XREVRANGE', log, '+', (read_seq + 1) .. '-0', 'COUNT', scan_cap)
    local own = 0
    for i = 1, #newest do
      local fields = newest[i][2]
      for j = 1, #fields, 2 do
        if fields[j] == 'u' and fields[j + 1] == user_id then
          own = own + 1
        end
      end
    end
    unread = last_seq - read_seq - own
  end
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if #last == 1 then
    local fields = last[1][2]
    for j = 1, #fields, 2 do
      if fields[j] == 'm' then
        last_message = fields[j + 1]
      end
    end
  end
end
return {meta[1], meta[2], meta[3], meta[4], redis.call('HGETALL', members),
        last_seq, unread, last_message}
