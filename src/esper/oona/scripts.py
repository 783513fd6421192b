"""The bus's server-side scripts, each one round trip and all-or-nothing.

Why scripts: a handler's replies, its replay claim and the XACK of its entry
must commit together, so a consumer killed at any instant leaves either all
of them or none (the entry is then delivered again). Each script first checks
the type of every key it will write and returns an error before writing
anything when one is wrong (e.g. someone SET the dead-letter stream to a
string); a server out of memory refuses a script at its first write, which
also happens before anything is written. Every key a script touches is passed
in KEYS, so the scripts work on Redis Cluster when all keys share a hash tag
(:mod:`esper.oona.keys`).

Scripts are loaded once per server (EVALSHA, reloaded after a restart).
"""

from __future__ import annotations

# Commit a batch of entries of one stream in one group.
# KEYS[1] source stream, KEYS[2] dead-letter stream, KEYS[3 .. 2+S] reply streams, then the replay
# keys, in the order of the items that claim one.
# ARGV[1] this subscription's settings, one per line: group, consumer, replay ttl ms, publish cap
#         (0: none), dead-letter cap, source stream name (encoded once per subscription);
# ARGV[2] "S item item ...", each item a letter, the entry id and for some a count:
#   a<id>        acknowledge only (ignored type, entry for another group)
#   d<id>/<n>    dead letter with the next n ARGV (field, value, ...), then acknowledge
#   c<id>/<n>    claim the next replay key, publish the n replies that follow in ARGV (each four
#                values: index of its stream in KEYS, payload, signature, kid) and acknowledge; a
#                replay (the key was claimed already, by whatever entry) is dead-lettered instead
#   u<id>/<n>    the same without a replay key (published only while the entry is still ours)
# Why so few arguments: the client pays for every argument it encodes, once per commit, and a
# commit of one entry is on every message's path. The ids in ARGV[2] are stream ids (digits and
# one dash); everything binary stays an argument of its own.
# Returns one letter per item: "o" ok, "d" dead, "r" replay or "l" lost (the entry is no longer
# pending for this consumer: another consumer took it over, or it was acknowledged already); fails
# with NOGROUP, having written nothing, when the group or the stream is gone.
COMMIT = r"""
local stream, dlq = KEYS[1], KEYS[2]
local group, consumer, ttl, cap, dlq_cap, source_name =
  string.match(ARGV[1], '^([^\n]*)\n([^\n]*)\n(%d+)\n(%d+)\n(%d+)\n(.*)$')
ttl, cap, dlq_cap = tonumber(ttl), tonumber(cap), tonumber(dlq_cap)
local nstreams, items = string.match(ARGV[2], '^(%d+)(.*)$')
nstreams = tonumber(nstreams)
local lone = not string.find(items, ' ', 2, true)

-- Nothing is written unless the group still exists (this fails with NOGROUP if it, or the stream,
-- was deleted after the read): a claim or reply may not outlive an acknowledgement that failed.
redis.call('XPENDING', stream, group)
-- Each write that may follow another must not fail halfway, so the types of the keys written are
-- checked first. A lone item's first write (its replay claim, dead letter or first reply) needs
-- no check: if it fails, nothing has been written; only its reply streams do. KEYS[1] is the
-- stream just read, as a stream with this group (above).
local last_checked = lone and (2 + nstreams) or #KEYS
for i = lone and 3 or 2, last_checked do
  local want = (i <= 2 + nstreams) and 'stream' or 'string'
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= want then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. t .. ', not a ' .. want)
  end
end

local function add(key, limit, fields)
  if limit > 0 then
    redis.call('XADD', key, 'MAXLEN', '~', limit, '*', unpack(fields))
  else
    redis.call('XADD', key, '*', unpack(fields))
  end
end

local function owned(id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p == 1 and p[1][2] == consumer
end

local function replayed(id)
  local entry = redis.call('XRANGE', stream, id, id)
  local fields = {}
  if #entry == 1 then
    local raw = entry[1][2]
    for j = 1, #raw, 2 do
      local name = raw[j]
      if name == 'payload' or name == 'signature' or name == 'kid' then
        fields[#fields + 1] = name
        fields[#fields + 1] = raw[j + 1]
      end
    end
  end
  for _, v in ipairs({'reason', 'replay', 'source_stream', source_name, 'source_id', id,
                      'group', group, 'detail', 'nonce already seen'}) do
    fields[#fields + 1] = v
  end
  add(dlq, dlq_cap, fields)
end

local out = {}
local n = 3  -- the next unread ARGV
local rk = 3 + nstreams  -- the next unclaimed replay key
for kind, id, count in string.gmatch(items, '(%a)([%d%-]+)/?(%d*)') do
  count = tonumber(count) or 0
  local status = 'o'
  if kind == 'a' then
    if owned(id) then redis.call('XACK', stream, group, id) else status = 'l' end
  elseif kind == 'd' then
    local fields = {}
    for j = 1, count do fields[j] = ARGV[n + j - 1] end
    n = n + count
    if owned(id) then
      add(dlq, dlq_cap, fields)
      redis.call('XACK', stream, group, id)
      status = 'd'
    else
      status = 'l'
    end
  else
    local first = n
    n = n + 4 * count
    local previous = false
    if kind == 'c' then
      previous = redis.call('SET', KEYS[rk], source_name .. '/' .. id, 'NX', 'GET', 'PX', ttl)
      rk = rk + 1
    elseif not owned(id) then
      previous = 'not ours'
    end
    if not previous then
      -- The first claim of this message: publish its replies and acknowledge it. (Should another
      -- consumer have taken the entry over meanwhile, its own commit finds this claim and
      -- publishes nothing.) The common case needs no ownership check.
      for r = 0, count - 1 do
        local at = first + 4 * r
        add(KEYS[tonumber(ARGV[at])], cap, {'payload', ARGV[at + 1], 'signature', ARGV[at + 2],
                                            'kid', ARGV[at + 3]})
      end
      redis.call('XACK', stream, group, id)
    elseif not owned(id) then
      -- Claimed before and no longer pending for us: our own commit already went through (this is
      -- a retry after a lost reply), or another consumer has the entry now.
      status = 'l'
    else
      -- Claimed before by another entry, or by this one before it was deleted and re-added at its
      -- original id: a copy. Dead-letter it, publish nothing.
      replayed(id)
      redis.call('XACK', stream, group, id)
      status = 'r'
    end
  end
  out[#out + 1] = status
end
return table.concat(out)
"""

# Create a group positioned at ARGV[2] (entries after it are delivered) with an exact
# entries-read count, so the server's lag for it stays exact and trimmed-unread entries can be
# counted later. KEYS[1] stream. ARGV: group, start id. Returns 1 when created, 0 when it existed.
CREATE_GROUP = r"""
local key, group, start = KEYS[1], ARGV[1], ARGV[2]
if redis.call('EXISTS', key) == 1 then
  local groups = redis.call('XINFO', 'GROUPS', key)
  for _, g in ipairs(groups) do
    for j = 1, #g, 2 do
      if g[j] == 'name' and g[j + 1] == group then return 0 end
    end
  end
end
local added = 0
if redis.call('EXISTS', key) == 1 then
  local info = redis.call('XINFO', 'STREAM', key)
  for j = 1, #info, 2 do
    if info[j] == 'entries-added' then added = info[j + 1] end
  end
end
local after, cursor = 0, '(' .. start
while true do
  local chunk = redis.call('XRANGE', key, cursor, '+', 'COUNT', 1000)
  after = after + #chunk
  if #chunk < 1000 then break end
  cursor = '(' .. chunk[#chunk][1]
end
redis.call('XGROUP', 'CREATE', key, group, start, 'MKSTREAM', 'ENTRIESREAD', added - after)
return 1
"""

# Trim one stream by age and length without removing anything a group still needs.
# KEYS[1] stream. ARGV: now ms, ttl ms (0: none), max length (0: none), idle ms after which a
# group whose consumers have all been silent no longer protects what it has not read.
# Returns {entries removed, cut id or ""}.
TRIM = r"""
local key = KEYS[1]
local now, ttl, maxlen, idle_limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                                     tonumber(ARGV[4])
if redis.call('EXISTS', key) == 0 then return {0, ''} end

local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return {tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))}
end
local function less(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local function field(list, name)
  for j = 1, #list, 2 do if list[j] == name then return list[j + 1] end end
  return nil
end

local cut = nil
if ttl > 0 then cut = {now - ttl, 0} end
if maxlen > 0 then
  local length = redis.call('XLEN', key)
  if length > maxlen then
    local head = redis.call('XRANGE', key, '-', '+', 'COUNT', length - maxlen + 1)
    local keep_from = parse(head[#head][1])
    if cut == nil or less(cut, keep_from) then cut = keep_from end
  end
end
if cut == nil then return {0, ''} end

for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local name = field(g, 'name')
  if tonumber(field(g, 'pending')) > 0 then
    local summary = redis.call('XPENDING', key, name)
    local oldest = parse(summary[2])
    if less(oldest, cut) then cut = oldest end
  end
  local live = false
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, name)) do
    if tonumber(field(c, 'idle')) < idle_limit then live = true end
  end
  if live then
    local last = parse(field(g, 'last-delivered-id'))
    local first_unread = {last[1], last[2] + 1}
    if less(first_unread, cut) then cut = first_unread end
  end
end
local cut_id = string.format('%d-%d', cut[1], cut[2])
return {redis.call('XTRIM', key, 'MINID', cut_id), cut_id}
"""

# Count, once, the entries each group lost unread to trimming (ours or the publish cap).
# KEYS[1] stream, KEYS[2] hash remembering what was already counted per group.
# Returns a flat list {group, newly counted, ...} for groups with something new.
COUNT_GAPS = r"""
local key, seen = KEYS[1], KEYS[2]
if redis.call('EXISTS', key) == 0 then return {} end
local function field(list, name)
  for j = 1, #list, 2 do if list[j] == name then return list[j + 1] end end
  return nil
end
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return {tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))}
end
local function less(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local info = redis.call('XINFO', 'STREAM', key)
local first = field(info, 'first-entry')
local length = redis.call('XLEN', key)
local out = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local name, lag = field(g, 'name'), field(g, 'lag')
  local last = field(g, 'last-delivered-id')
  -- Behind: every entry after the group's position is gone (an empty stream included).
  local behind = (not first) or less(parse(last), parse(first[1]))
  if behind and lag then
    local gap = tonumber(lag) - length
    local before = redis.call('HGET', seen, name)
    local counted = 0
    if before then
      local bar = string.find(before, '|', 1, true)
      if string.sub(before, 1, bar - 1) == last then counted = tonumber(string.sub(before, bar + 1)) end
    end
    if gap > counted then
      out[#out + 1] = name
      out[#out + 1] = gap - counted
      redis.call('HSET', seen, name, last .. '|' .. gap)
    end
  else
    redis.call('HDEL', seen, name)
  end
end
return out
"""

# Lease the lowest free consumer-name slot of one kind of service, or renew our own.
# KEYS[1] the slots hash. ARGV: token, ttl ms, max slots. Returns the slot number, or -1 if full.
LEASE = r"""
local key, token, ttl, slots = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local free = -1
for slot = 0, slots - 1 do
  local held = redis.call('HGET', key, slot)
  if held then
    local bar = string.find(held, '|', 1, true)
    local owner, expires = string.sub(held, 1, bar - 1), tonumber(string.sub(held, bar + 1))
    if owner == token then
      redis.call('HSET', key, slot, token .. '|' .. (now + ttl))
      return slot
    end
    if expires < now and free < 0 then free = slot end
  elseif free < 0 then
    free = slot
  end
end
if free >= 0 then redis.call('HSET', key, free, token .. '|' .. (now + ttl)) end
return free
"""

# Renew a held slot. KEYS[1] slots hash. ARGV: slot, token, ttl ms. Returns 1, or 0 if it was lost.
RENEW = r"""
local key, slot, token, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local held = redis.call('HGET', key, slot)
if not held or string.sub(held, 1, #token + 1) ~= token .. '|' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', key, slot, token .. '|' .. (now + ttl))
return 1
"""

# Release a held slot on a clean shutdown. KEYS[1] slots hash. ARGV: slot, token.
RELEASE = r"""
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held and string.sub(held, 1, #ARGV[2] + 1) == ARGV[2] .. '|' then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# Re-publish a dead letter and delete it, both or neither. KEYS[1] target stream, KEYS[2] dead
# letters. ARGV: dead-letter id, publish cap (0: none), then field/value pairs. Returns the new id.
REPLAY = r"""
for _, key in ipairs(KEYS) do
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= 'stream' then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t)
  end
end
local fields = {}
for j = 3, #ARGV do fields[#fields + 1] = ARGV[j] end
local id
if tonumber(ARGV[2]) > 0 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(fields))
else
  id = redis.call('XADD', KEYS[1], '*', unpack(fields))
end
redis.call('XDEL', KEYS[2], ARGV[1])
return id
"""

# Read a stream for a broadcast reader, leaving out the entries it ignores, so every replica does
# not fetch and parse every reply on a stream it shares. KEYS[1] stream. ARGV: the id to read
# after, count, then the ignored message types. An entry is left out only when its first field is
# `payload` and the envelope plainly claims an ignored type (envelope.peek_message_type); anything
# else, hostile entries included, is returned for the reader to judge. Returns {} when there is
# nothing after the id, else {id of the last entry scanned, {{id, fields}, ...}, number left out}.
SCAN_BROADCAST = r"""
local rows = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
if #rows == 0 then
  return {}
end
local ignored = {}
for j = 3, #ARGV do ignored[tonumber(ARGV[j])] = true end
local function claimed_type(payload)
  if type(payload) ~= 'string' or string.byte(payload, 1) ~= 8 then return nil end
  local first, second = string.byte(payload, 2, 3)
  if first == nil then return nil end
  if first < 128 then return first end
  if second ~= nil and second < 128 then return (first - 128) + second * 128 end
  return nil
end
local kept = {}
for _, row in ipairs(rows) do
  local fields = row[2]
  if not (fields[1] == 'payload' and ignored[claimed_type(fields[2])]) then
    kept[#kept + 1] = row
  end
end
return {rows[#rows][1], kept, #rows - #kept}
"""
