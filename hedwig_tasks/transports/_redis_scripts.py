"""The Redis transport's Lua scripts: each settles, moves or counts atomically in one round trip.

Settling scripts act only on an entry still pending to this consumer with the delivery count
its receipt was made at, so a receipt whose lease ran out (and was taken over, even by the same
consumer) settles nothing. Field names are ``_redis_wire``'s. See ``redis.py`` for the design.
"""

from __future__ import annotations

from hedwig_tasks.transports._redis_wire import ATTEMPT, DEAD_AT, DEAD_ATTEMPTS, REASON, SUBSCRIPTION

__all__ = [
    "ACK",
    "ADD_DELAYED",
    "COUNTS",
    "DEAD_LETTER",
    "EXTEND",
    "MOVE_DUE",
    "PURGE",
    "RELEASE",
    "REQUEUE",
    "RETRY",
    "TAKEOVER",
    "TRIM",
]

_HELPERS = f"""
local ATTEMPT, SUBSCRIPTION = '{ATTEMPT}', '{SUBSCRIPTION}'
local REASON, DEAD_ATTEMPTS, DEAD_AT = '{REASON}', '{DEAD_ATTEMPTS}', '{DEAD_AT}'
"""
_HELPERS += """
local function owned(key, group, consumer, id, count)
  local found = redis.call('XPENDING', key, group, id, id, 1)[1]
  return found ~= nil and found[2] == consumer and tonumber(found[4]) == tonumber(count)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Items as netstrings ("<length>:<bytes>" each): binary-safe, and cheap to read back here.
local function netstrings(items)
  local parts = {}
  for i, item in ipairs(items) do parts[i] = #item .. ':' .. item end
  return table.concat(parts)
end

local function unnet(s, limit)
  local items, i = {}, 1
  while i <= #s and (limit == nil or #items < limit) do
    local colon = string.find(s, ':', i, true)
    local n = tonumber(string.sub(s, i, colon - 1))
    items[#items + 1] = string.sub(s, colon + 1, colon + n)
    i = colon + n + 1
  end
  return items
end

-- A flat field list {name, value, ...} without the names in ``skip``, then ``extra`` appended.
local function copy(fields, skip, extra)
  local out = {}
  for i = 1, #fields, 2 do
    if not skip[fields[i]] then
      out[#out + 1] = fields[i]
      out[#out + 1] = fields[i + 1]
    end
  end
  for _, item in ipairs(extra or {}) do out[#out + 1] = item end
  return out
end

local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local function entry(key, id)
  return redis.call('XRANGE', key, id, id)[1]
end
"""

# KEYS: streams; ARGV: group, then (key number, id, delivery count, consumer) per receipt.
ACK = (
    _HELPERS
    + """
local group, done = ARGV[1], 0
for i = 2, #ARGV, 4 do
  local key = KEYS[tonumber(ARGV[i])]
  if owned(key, group, ARGV[i + 3], ARGV[i + 1], ARGV[i + 2]) then
    done = done + redis.call('XACK', key, group, ARGV[i + 1])
  end
end
return done
"""
)

# Resets the idle time of entries still held: their lease starts again. Same arguments as ACK.
EXTEND = (
    _HELPERS
    + """
local group, done = ARGV[1], 0
for i = 2, #ARGV, 4 do
  local key = KEYS[tonumber(ARGV[i])]
  if owned(key, group, ARGV[i + 3], ARGV[i + 1], ARGV[i + 2]) then
    done = done + #redis.call('XCLAIM', key, group, ARGV[i + 3], 0, ARGV[i + 1], 'JUSTID')
  end
end
return done
"""
)

# Hands entries still held to the parking consumer ARGV[2] with an idle time of ARGV[3] ms (the
# lease), so that the next takeover of any consumer of the group takes them at once.
RELEASE = (
    _HELPERS
    + """
local group, parking, idle, done = ARGV[1], ARGV[2], ARGV[3], 0
for i = 4, #ARGV, 4 do
  local key = KEYS[tonumber(ARGV[i])]
  if owned(key, group, ARGV[i + 3], ARGV[i + 1], ARGV[i + 2]) then
    done = done + #redis.call('XCLAIM', key, group, parking, 0, ARGV[i + 1], 'IDLE', idle, 'JUSTID')
  end
end
return done
"""
)

# KEYS: stream, delayed set. ARGV: group, consumer, id, count, delay ms, subscription, attempts
# made, a unique token. Copies the entry into the delayed set (due at Redis's now + delay) as
# netstrings {token, subscription, field, value, ...} and acks it. 0: not ours; -1: entry gone.
RETRY = (
    _HELPERS
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
local found = entry(KEYS[1], ARGV[3])
if found then
  local extra = {ATTEMPT, ARGV[7], SUBSCRIPTION, ARGV[6]}
  local fields = copy(found[2], {[ATTEMPT] = true, [SUBSCRIPTION] = true}, extra)
  table.insert(fields, 1, ARGV[6])
  table.insert(fields, 1, ARGV[8])
  redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[5]), netstrings(fields))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return found and 1 or -1
"""
)

# KEYS: a delayed set. ARGV: delay ms, then members (see ``_redis_wire.delayed_member``). Adds
# them due at Redis's now + delay: delayed publishes are timed by Redis's clock, as retries are.
ADD_DELAYED = (
    _HELPERS
    + """
local due = now_ms() + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], due, ARGV[i]) end
return #ARGV - 1
"""
)

# KEYS: delayed set, stream. ARGV: most to move. Moves due entries into the stream: a queue's
# retries into its own stream, or a topic's delayed publishes into the topic's stream.
MOVE_DUE = (
    _HELPERS
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local items = unnet(member)
  redis.call('XADD', KEYS[2], '*', unpack(items, 3))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""
)

# KEYS: streams. ARGV: group, consumer, min idle ms, most to take. Takes over entries whose
# lease ran out; returns {key number, id, delivery count, fields} each.
TAKEOVER = (
    _HELPERS
    + """
local group, consumer, idle, left = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local taken = {}
for k = 1, #KEYS do
  local cursor, rounds = '0-0', 0
  repeat
    local reply = redis.call('XAUTOCLAIM', KEYS[k], group, consumer, idle, cursor, 'COUNT', left)
    cursor = reply[1]
    for _, e in ipairs(reply[2]) do
      if type(e) == 'table' and type(e[2]) == 'table' then
        local pending = redis.call('XPENDING', KEYS[k], group, e[1], e[1], 1)[1]
        taken[#taken + 1] = {k, e[1], pending[4], e[2]}
        left = left - 1
      end
    end
    rounds = rounds + 1
  until cursor == '0-0' or left <= 0 or rounds >= 10
  if left <= 0 then break end
end
return taken
"""
)

# KEYS: stream, dead-letter stream. ARGV: group, consumer, id, count, reason, subscription,
# attempts, dead at. Copies the entry with why into the dead-letter stream and acks it.
DEAD_LETTER = (
    _HELPERS
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
local found = entry(KEYS[1], ARGV[3])
local skip = {[ATTEMPT] = true, [SUBSCRIPTION] = true, [REASON] = true, [DEAD_ATTEMPTS] = true, [DEAD_AT] = true}
local extra = {REASON, ARGV[5], SUBSCRIPTION, ARGV[6], DEAD_ATTEMPTS, ARGV[7], DEAD_AT, ARGV[8]}
redis.call('XADD', KEYS[2], '*', unpack(copy(found and found[2] or {}, skip, extra)))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
)

# KEYS: dead-letter stream, queue stream. ARGV: group, ids. Moves those dead letters into the
# queue stream (subscription kept, reason and attempts dropped) and deletes them.
REQUEUE = (
    _HELPERS
    + """
local skip = {[ATTEMPT] = true, [REASON] = true, [DEAD_ATTEMPTS] = true, [DEAD_AT] = true}
local done = 0
for i = 2, #ARGV do
  local found = entry(KEYS[1], ARGV[i])
  if found then
    local fields = copy(found[2], skip)
    if #fields > 0 then redis.call('XADD', KEYS[2], '*', unpack(fields)) end
    redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[i])
    done = done + redis.call('XDEL', KEYS[1], ARGV[i])
  end
end
return done
"""
)

# KEYS: dead-letter stream. ARGV: group, ids. Deletes those dead letters for good.
PURGE = """
local done = 0
for i = 2, #ARGV do
  redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[i])
  done = done + redis.call('XDEL', KEYS[1], ARGV[i])
end
return done
"""

# KEYS: streams. ARGV: per key '1' if a stream no group reads may be emptied (a topic's), else
# '0'. Trims each to the oldest entry any of its groups still needs: its first pending entry,
# or the one after its last delivered. Returns how many entries went.
TRIM = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq), ms
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local trimmed = 0
for k, key in ipairs(KEYS) do
  if redis.call('TYPE', key)['ok'] == 'stream' then
    local keep = nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
      local info = {}
      for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
      local _, seq, ms = parse(info['last-delivered-id'])
      local need = ms .. '-' .. string.format('%d', seq + 1)
      if tonumber(info['pending']) > 0 then
        local first = redis.call('XPENDING', key, info['name'], '-', '+', 1)[1][1]
        if less(first, need) then need = first end
      end
      if keep == nil or less(need, keep) then keep = need end
    end
    if keep ~= nil then
      trimmed = trimmed + redis.call('XTRIM', key, 'MINID', keep)
    elseif ARGV[k] == '1' then
      trimmed = trimmed + redis.call('XTRIM', key, 'MAXLEN', 0)
    end
  end
end
return trimmed
"""

# KEYS: queue stream, delayed set, dead-letter stream, topic streams. ARGV: group, lease ms,
# most entries read per part, the subscription of each topic stream. Returns (depth, in flight,
# dead letters) per topic stream, flat. What the queue's own stream, delayed set and dead-letter
# stream hold is counted under the subscription it names; what names none (a dead letter the
# Hedwig library requeued) under the first, and so is what lies past the most read.
COUNTS = (
    _HELPERS
    + """
local group, lease, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local rows, index = {}, {}
for i = 4, #ARGV do
  rows[#rows + 1] = {0, 0, 0}
  index[ARGV[i]] = #rows
end

local function add(sub, column, n)
  local row = rows[index[sub] or (sub == nil and 1) or 0]
  if row then row[column] = row[column] + n end
end

local function info_of(key)
  if redis.call('TYPE', key)['ok'] ~= 'stream' then return nil, false end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then return info, true end
  end
  return nil, true
end

local function undelivered(key, info)
  local from = info and ('(' .. info['last-delivered-id']) or '-'
  return redis.call('XRANGE', key, from, '+', 'COUNT', cap)
end

for t = 4, #KEYS do
  local row, info = rows[t - 3], info_of(KEYS[t])
  if info then
    local lag = info['lag']
    if not lag then lag = #undelivered(KEYS[t], info) end
    local expired = #redis.call('XPENDING', KEYS[t], group, 'IDLE', lease, '-', '+', cap)
    row[1] = row[1] + lag + expired
    row[2] = row[2] + tonumber(info['pending']) - expired
  end
end

-- Undelivered and pending entries of a stream of the queue's own, each under its subscription.
local function own_stream(key, column_of)
  local info, exists = info_of(key)
  if not exists then return end
  local waiting = undelivered(key, info)
  for _, e in ipairs(waiting) do add(field(e[2], SUBSCRIPTION), column_of(nil), 1) end
  if info and info['lag'] and info['lag'] > #waiting then add(nil, column_of(nil), info['lag'] - #waiting) end
  if not info then return end
  for _, p in ipairs(redis.call('XPENDING', key, group, '-', '+', cap)) do
    local found = entry(key, p[1])
    add(found and field(found[2], SUBSCRIPTION), column_of(tonumber(p[3])), 1)
  end
end

own_stream(KEYS[1], function(idle) if idle == nil or idle >= lease then return 1 end return 2 end)
own_stream(KEYS[3], function(idle) return 3 end)

local delayed = redis.call('ZRANGE', KEYS[2], 0, cap - 1)
for _, member in ipairs(delayed) do add(unnet(member, 2)[2], 1, 1) end
add(nil, 1, redis.call('ZCARD', KEYS[2]) - #delayed)

local flat = {}
for _, row in ipairs(rows) do
  flat[#flat + 1] = row[1]
  flat[#flat + 1] = row[2]
  flat[#flat + 1] = row[3]
end
return flat
"""
)
