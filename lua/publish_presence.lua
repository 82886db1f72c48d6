--[[ publish_presence: send a presence change to the nodes of a user's rooms in one partition.

KEYS[1]     inbox prefix of the partition
KEYS[2..n]  interest sets of the user's rooms in this partition
ARGV[1]     user id
ARGV[2]     the presence frame, JSON
ARGV[3]     the room ids, comma separated, in the order of KEYS[2..n]
ARGV[4]     inbox max length

Returns  the number of nodes notified.

Invariant: each interested node gets one entry per change, naming the rooms,
so it can reach every local member of any of them exactly once.
]]
local inbox_prefix = KEYS[1]
local user = ARGV[1]
local frame = ARGV[2]
local rooms = ARGV[3]
local inbox_maxlen = ARGV[4]

local targets = {}
for i = 2, #KEYS do
  local nodes = redis.call('SMEMBERS', KEYS[i])
  for j = 1, #nodes do targets[nodes[j]] = true end
end
local count = 0
for node_id, _ in pairs(targets) do
  redis.call('XADD', inbox_prefix .. node_id, 'MAXLEN', '~', inbox_maxlen, '*',
    'k', 'p', 'u', user, 'rs', rooms, 'f', frame)
  count = count + 1
end
return count
