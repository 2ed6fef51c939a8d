"""Lua scripts: each multi-key change is one atomic script and one round trip.

Scripts receive every key they touch in KEYS except the host-agent set of an agent's
previous owner, which they read from the agent hash (field ``host_set``) — so the
layout is for a single Redis (or one hash slot), not Redis Cluster.
"""


# Resource accounting (base/resources.py), shared by the scripts below that change what an
# agent holds. Each host has ``p:host:{addr}:alloc``, a hash member -> allocation JSON of the
# agents that hold resources there; it is named from the host hash (``host_key .. ':alloc'``)
# and an agent hash remembers its own in ``host_alloc``. What a host has in use is the sum of
# that hash, computed inside the claim (so a claim sees every earlier claim: two engines
# cannot overcommit a host) and cached in the host hash's ``used`` field for listings. Agents
# without a resource request have no entry: they take one slot (the host's capacity) only.
_ALLOC_LUA = """
local function usage_of(alloc_key, skip)
  local used = {cpu = 0, mem = 0, gpu = {}, custom = {}}
  local flat = redis.call('HGETALL', alloc_key)
  for i = 1, #flat, 2 do
    if flat[i] ~= skip then
      local a = cjson.decode(flat[i + 1])
      used.cpu = used.cpu + (a.cpu or 0)
      used.mem = used.mem + (a.mem or 0)
      if type(a.gpu) == 'table' then
        for d, m in pairs(a.gpu) do used.gpu[d] = (used.gpu[d] or 0) + m end
      end
      if type(a.custom) == 'table' then
        for k, v in pairs(a.custom) do used.custom[k] = (used.custom[k] or 0) + v end
      end
    end
  end
  return used
end

-- Caches the host's usage in its hash, only while the hash (its lease) exists: an HSET on a
-- missing hash would create a lease without a TTL.
local function store_usage(host_key, alloc_key)
  if redis.call('EXISTS', host_key) == 1 then
    redis.call('HSET', host_key, 'used', cjson.encode(usage_of(alloc_key, nil)))
  end
end

-- Gives back what the agent (hash agent_key, set member) holds on the host that owns it.
local function release(agent_key, member)
  local alloc_key = redis.call('HGET', agent_key, 'host_alloc')
  if alloc_key and redis.call('HDEL', alloc_key, member) == 1 then
    local host_key = redis.call('HGET', agent_key, 'host_key')
    if host_key then store_usage(host_key, alloc_key) end
  end
end

-- Chooses what a request gets from a host: nil plus (what is short, needed, largest free)
-- when it does not fit. Whole GPUs take free devices exclusively; a fraction goes to the
-- fullest device that still has room (best fit, so whole devices stay free for whole requests).
local function allocate(need, inv, used)
  local alloc = {}
  for _, r in ipairs({'cpu', 'mem'}) do
    local n = need[r] or 0
    if n > 0 then
      local free = (inv[r] or 0) - used[r]
      if free < n then return nil, r, n, free end
      alloc[r] = n
    end
  end
  if type(need.custom) == 'table' then
    local have = type(inv.custom) == 'table' and inv.custom or {}
    for k, n in pairs(need.custom) do
      local free = (have[k] or 0) - (used.custom[k] or 0)
      if free < n then return nil, 'custom:' .. k, n, free end
      if alloc.custom == nil then alloc.custom = {} end
      alloc.custom[k] = n
    end
  end
  local g = need.gpu or 0
  if g > 0 then
    local devices = type(inv.gpus) == 'table' and inv.gpus or {}
    local largest = 0
    for _, d in ipairs(devices) do
      local free = 1000 - (used.gpu[d] or 0)
      if free > largest then largest = free end
    end
    alloc.gpu = {}
    if g >= 1000 then
      local want, got = g / 1000, 0
      for _, d in ipairs(devices) do
        if got < want and (used.gpu[d] or 0) == 0 then
          alloc.gpu[d] = 1000
          got = got + 1
        end
      end
      if got < want then
        if got > 0 then largest = got * 1000 end
        return nil, 'gpu', g, largest
      end
    else
      local best, best_used = nil, -1
      for _, d in ipairs(devices) do
        local u = used.gpu[d] or 0
        if 1000 - u >= g and u > best_used then best, best_used = d, u end
      end
      if not best then return nil, 'gpu', g, largest end
      alloc.gpu[best] = g
    end
  end
  return alloc
end

-- Does an allocation an agent held before still fit beside what the others hold now?
local function still_fits(a, inv, used)
  if (a.cpu or 0) > 0 and used.cpu + a.cpu > (inv.cpu or 0) then return false end
  if (a.mem or 0) > 0 and used.mem + a.mem > (inv.mem or 0) then return false end
  local have = type(inv.custom) == 'table' and inv.custom or {}
  if type(a.custom) == 'table' then
    for k, n in pairs(a.custom) do
      if (used.custom[k] or 0) + n > (have[k] or 0) then return false end
    end
  end
  if type(a.gpu) == 'table' then
    local known = {}
    for _, d in ipairs(type(inv.gpus) == 'table' and inv.gpus or {}) do known[d] = true end
    for d, m in pairs(a.gpu) do
      if not known[d] or (used.gpu[d] or 0) + m > 1000 then return false end
    end
  end
  return true
end
"""

# KEYS: agent hash, guild set, new host-agents set, new host hash, guild's desired-state hash,
#       new host's alloc hash, unplaced hash
# ARGV: agent ttl ms, member, agent id, host address, exclusive ("1"/"0"),
#       require desired ("1"/"0"), resource request JSON ("" = none), previous allocation JSON
#       ("" = none), force it ("1"/"0"), field, value, ...
# Returns {"ok", allocation JSON}, {"conflict", other_host}, {"not_desired"} or
# {"short", resource, needed, largest free}: the request does not fit what the host has left
# (nothing changed). A previous allocation is kept when it still fits beside the others (a
# restart keeps its devices), else a new one is chosen; with force it is taken as it is (a
# host re-registering an agent whose process runs on those devices: what runs is the truth).
# The claim also clears the agent from the unplaced hash.
# With exclusive, a live record owned by another host whose lease still exists is not taken
# over: one agent, one owner.
# With require desired, an agent whose desired state is gone is not claimed: an engine
# clears it before stopping an agent, so an adopter that read it earlier cannot start the
# agent again after the stop (the check and the claim are one step).
CLAIM_AGENT = _ALLOC_LUA + """
if ARGV[6] == '1' and redis.call('HEXISTS', KEYS[5], ARGV[3]) == 0 then
  return {'not_desired'}
end
local old_host = redis.call('HGET', KEYS[1], 'host')
if old_host and old_host ~= ARGV[4] then
  if ARGV[5] == '1' then
    local state = redis.call('HGET', KEYS[1], 'state')
    local old_host_key = redis.call('HGET', KEYS[1], 'host_key')
    local live = state == 'starting' or state == 'running' or state == 'restarting' or state == 'stopping'
    local old_set = redis.call('HGET', KEYS[1], 'host_set')
    -- Owned means: a current lease *and* the member in that host's set. A reaped host's
    -- members were moved to the orphan queue; a late renewal that revived its lease does
    -- not make them its own again.
    if live and old_host_key and redis.call('EXISTS', old_host_key) == 1
        and old_set and redis.call('SISMEMBER', old_set, ARGV[2]) == 1 then
      return {'conflict', old_host}
    end
  end
end
local alloc_json = ''
if ARGV[8] ~= '' and ARGV[9] == '1' then
  alloc_json = ARGV[8]
elseif ARGV[7] ~= '' then
  local inv = cjson.decode(redis.call('HGET', KEYS[4], 'inventory') or '{}')
  local used = usage_of(KEYS[6], ARGV[2])
  if ARGV[8] ~= '' and still_fits(cjson.decode(ARGV[8]), inv, used) then
    alloc_json = ARGV[8]
  else
    local alloc, what, needed, free = allocate(cjson.decode(ARGV[7]), inv, used)
    if not alloc then return {'short', what, tostring(needed), tostring(free)} end
    alloc_json = cjson.encode(alloc)
  end
end
if old_host and old_host ~= ARGV[4] then
  local old_set = redis.call('HGET', KEYS[1], 'host_set')
  if old_set then redis.call('SREM', old_set, ARGV[2]) end
  release(KEYS[1], ARGV[2])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'host_set', KEYS[3], 'host_key', KEYS[4], 'host_alloc', KEYS[6], 'alloc', alloc_json,
           unpack(ARGV, 10))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[2])
local changed
if alloc_json ~= '' then
  changed = redis.call('HGET', KEYS[6], ARGV[2]) ~= alloc_json
  redis.call('HSET', KEYS[6], ARGV[2], alloc_json)
else
  changed = redis.call('HDEL', KEYS[6], ARGV[2]) == 1
end
if changed then store_usage(KEYS[4], KEYS[6]) end
redis.call('HDEL', KEYS[7], ARGV[2])
return {'ok', alloc_json}
"""

# KEYS: agent hash; ARGV: host address, member, field, value, ...
# Updates fields only while this host still owns the record. Returns 1 or 0. An agent set to
# "failed" gives its resources back (it will not run again unless launched anew).
UPDATE_AGENT = _ALLOC_LUA + """
if redis.call('HGET', KEYS[1], 'host') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
for i = 3, #ARGV - 1, 2 do
  if ARGV[i] == 'state' and ARGV[i + 1] == 'failed' then
    release(KEYS[1], ARGV[2])
    redis.call('HSET', KEYS[1], 'alloc', '')
  end
end
return 1
"""

# KEYS: agent hash, guild set, host-agents set; ARGV: member, agent id, host ("" = any owner),
# pid ("" or "0" = any)
# Removes the agent unless another host owns it now, or (with a pid) a later process of
# the same agent on this host does. Returns 1 if removed.
REMOVE_AGENT = _ALLOC_LUA + """
local owner = redis.call('HGET', KEYS[1], 'host')
if owner and ARGV[3] ~= '' and owner ~= ARGV[3] then
  redis.call('SREM', KEYS[3], ARGV[1])
  return 0
end
if ARGV[4] and ARGV[4] ~= '' and ARGV[4] ~= '0' then
  local pid = redis.call('HGET', KEYS[1], 'pid')
  if pid and pid ~= '0' and pid ~= ARGV[4] then return 0 end
end
local owner_set = redis.call('HGET', KEYS[1], 'host_set')
if owner_set then redis.call('SREM', owner_set, ARGV[1]) end
release(KEYS[1], ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: host hash, hosts set, host-agents set, hosts meta hash, agent hash 1..n
# ARGV: host ttl ms, agent ttl ms, address, n field pairs, hold max ms, host key prefix,
#       field, value, ..., fresh ("1": first renewal of this process), member 1..n
# Renews the host lease and every agent the host runs in one round trip. Returns
# {missing indexes, lost indexes, host_was_missing, drain, live peers, redis ms}:
# missing = entry gone (expired or Redis restarted: re-register it), lost = another host
# owns it now (stop our copy); drain = the reason an operator asked this host to drain, or
# empty; live peers = addresses of the other hosts whose lease exists (who to ask for a
# hold in an outage); redis ms = this server's clock.
# The meta hash keeps, per host, when it first registered ("addr|since" = a sequence number
# every renewal takes, "|seq") and its last renewal ("addr|renewed" = "ms hold_ms seq": Redis's
# clock, its hold limit, the sequence): the reaper (REAP_HOSTS) uses them to tell whether a
# dead host could have known about it — scripts run one at a time, so a lower sequence is
# an earlier script, exactly.
HEARTBEAT = _ALLOC_LUA + """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local host_existed = redis.call('EXISTS', KEYS[1])
local npairs = tonumber(ARGV[4])
local fields = {}
for i = 1, npairs * 2 do fields[i] = ARGV[6 + i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
local seq = redis.call('HINCRBY', KEYS[4], '|seq', 1)
if host_existed == 0 or ARGV[7 + npairs * 2 - 1] == '1' then
  -- A host whose lease had gone (or a new process at this address) was in nobody's peer
  -- list meanwhile: it counts as registering now.
  redis.call('HSET', KEYS[4], ARGV[3] .. '|since', seq)
else
  redis.call('HSETNX', KEYS[4], ARGV[3] .. '|since', seq)
end
redis.call('HSET', KEYS[4], ARGV[3] .. '|renewed', now_ms .. ' ' .. ARGV[5] .. ' ' .. seq)
local missing, lost = {}, {}
local first_member = 8 + npairs * 2
for i = 5, #KEYS do
  local owner = redis.call('HGET', KEYS[i], 'host')
  local idx = i - 4
  if not owner then
    table.insert(missing, idx)
  elseif owner ~= ARGV[3] then
    table.insert(lost, idx)
    redis.call('SREM', KEYS[3], ARGV[first_member + idx - 1])
    redis.call('HDEL', KEYS[1] .. ':alloc', ARGV[first_member + idx - 1])
  elseif host_existed == 0 then
    -- Our lease had lapsed: we may have been reaped and our agents queued for others. Do not
    -- refresh them behind the queue's back; report them, and the host claims each again.
    table.insert(missing, idx)
  else
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    redis.call('SADD', KEYS[3], ARGV[first_member + idx - 1])
  end
end
local peers = {}
for _, addr in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if addr ~= ARGV[3] then
    local enc = string.gsub(addr, '([^%w%-%._~])', function(c) return string.format('%%%02X', string.byte(c)) end)
    if redis.call('EXISTS', ARGV[6] .. enc) == 1 then table.insert(peers, addr) end
  end
end
store_usage(KEYS[1], KEYS[1] .. ':alloc')  -- the cached usage, fresh once a renewal (and after a Redis restart)
local drain = redis.call('HGET', KEYS[1], 'drain_requested') or ''
return {missing, lost, host_existed, drain, peers, tostring(now_ms)}
"""

# KEYS: guild set; ARGV: agent key prefix (encoded guild)
# Returns flat HGETALL arrays (plus _host_alive: is the owner's lease current) and drops
# members whose hash expired.
LIST_GUILD = """
local out = {}
local alive = {}  -- host key -> '1'/'0': one EXISTS per host, not per agent
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local enc = string.gsub(id, '([^%w%-%._~])', function(c) return string.format('%%%02X', string.byte(c)) end)
  local key = ARGV[1] .. enc
  local h = redis.call('HGETALL', key)
  if #h == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    local host_key = redis.call('HGET', key, 'host_key')
    local up = '0'
    if host_key then
      up = alive[host_key]
      if up == nil then
        up = redis.call('EXISTS', host_key) == 1 and '1' or '0'
        alive[host_key] = up
      end
    end
    table.insert(h, '_host_alive')
    table.insert(h, up)
    table.insert(out, h)
  end
end
return out
"""

# KEYS: hosts set; ARGV: host key prefix
# Returns {address, HGETALL, SCARD(agents)} per live host. Dead hosts are left for REAP_HOSTS,
# which needs their agent sets.
LIST_HOSTS = """
local out = {}
for _, addr in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local enc = string.gsub(addr, '([^%w%-%._~])', function(c) return string.format('%%%02X', string.byte(c)) end)
  local key = ARGV[1] .. enc
  local h = redis.call('HGETALL', key)
  if #h > 0 then
    table.insert(out, {addr, h, redis.call('SCARD', key .. ':agents')})
  end
end
return out
"""

# KEYS: agent hash; ARGV: member. 1 if the agent is starting/running/restarting on a host
# whose lease is current and whose agent set holds it: an agent of a host that died stops
# counting once its lease lapses (its own, longer TTL notwithstanding), and one whose host
# was reaped stops counting even if a late renewal revived that host's lease.
IS_RUNNING = """
local v = redis.call('HMGET', KEYS[1], 'state', 'host_key', 'host_set')
local state, host_key, host_set = v[1], v[2], v[3]
if not (state == 'starting' or state == 'running' or state == 'restarting') then return 0 end
if not host_key or redis.call('EXISTS', host_key) == 0 then return 0 end
if not host_set then return 1 end
return redis.call('SISMEMBER', host_set, ARGV[1])
"""

# KEYS: hosts set, orphans list, hosts meta hash
# ARGV: host key prefix, this host's address, sent ms, validity ms, lease ms, spared address...
# Finds hosts whose lease expired, moves the agents they owned and the orphans they had
# taken but not acked (their adopting list, to the head of the queue: they waited longest)
# onto the orphans queue and forgets the host — atomically, so exactly one reaper takes
# each dead host's agents. Never reaped: the reaper itself, spared addresses (hosts the
# reaper promised a hold, host/lease.py), and — fencing the reaper's own staleness —
#  * nothing at all when this request runs later than ``validity`` after ``sent`` (a lower
#    bound of this server's clock when the reaper sent it): it sat in a buffer while Redis
#    was paused, and its spared list may predate a promise;
#  * a host whose last renewal ran before the reaper first registered, until ``hold + lease``
#    past that renewal: it never heard of the reaper, so it could not have asked it for a
#    hold, and may be holding its agents on the others' word (up to its hold limit).
# Returns the reaped addresses.
REAP_HOSTS = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sent_ms, validity_ms, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if sent_ms > 0 and now_ms - sent_ms > validity_ms then return {} end
local spared = {[ARGV[2]] = true}
for i = 6, #ARGV do spared[ARGV[i]] = true end
local my_since = tonumber(redis.call('HGET', KEYS[3], ARGV[2] .. '|since') or '-1')
local reaped = {}
for _, addr in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local enc = string.gsub(addr, '([^%w%-%._~])', function(c) return string.format('%%%02X', string.byte(c)) end)
  local key = ARGV[1] .. enc
  local ok = not spared[addr] and redis.call('EXISTS', key) == 0
  if ok then
    local renewed = redis.call('HGET', KEYS[3], addr .. '|renewed')
    if renewed then
      local at, hold, seq = string.match(renewed, '(%d+) (%d+) (%d+)')
      at, hold, seq = tonumber(at), tonumber(hold), tonumber(seq)
      -- my_since -1: this reaper is not registered (Redis lost it): it knows nothing either.
      local unknown = my_since < 0 or my_since > seq
      if unknown and now_ms - at < hold + lease_ms then ok = false end
    end
  end
  if ok then
    local members = redis.call('SMEMBERS', key .. ':agents')
    for _, m in ipairs(members) do redis.call('RPUSH', KEYS[2], m) end
    while redis.call('LMOVE', key .. ':adopting', KEYS[2], 'RIGHT', 'LEFT') do end
    redis.call('DEL', key .. ':agents', key .. ':alloc')  -- a dead host holds nothing
    redis.call('SREM', KEYS[1], addr)
    redis.call('HDEL', KEYS[3], addr .. '|since', addr .. '|renewed')
    table.insert(reaped, addr)
  end
end
return reaped
"""

# KEYS: orphans list, this host's adopting list, this host's hash; ARGV: count
# The reliable pop: tops the host's adopting list up to ``count`` members taken from the
# head of the queue (or, when count shrank, gives the surplus back to the head), then
# returns the whole adopting list. Members stay there until acked, so a reply lost on the
# wire costs nothing: the next call (or the client's retry) returns them again. A host
# without a current lease takes nothing: the reaper may already have given its list back,
# and nobody would give back what it took next.
POP_ORPHANS = """
if redis.call('EXISTS', KEYS[3]) == 0 then return {} end
local want = math.max(tonumber(ARGV[1]), 0)
local have = redis.call('LLEN', KEYS[2])
while have > want do
  redis.call('LMOVE', KEYS[2], KEYS[1], 'RIGHT', 'LEFT')
  have = have - 1
end
while have < want and redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do
  have = have + 1
end
return redis.call('LRANGE', KEYS[2], 0, -1)
"""

# KEYS: this host's adopting list; ARGV: member...
# Drops handled orphans (adopted, found unwanted, or re-queued by the caller). Returns how
# many entries were removed.
ACK_ORPHANS = """
local n = 0
for i = 1, #ARGV do n = n + redis.call('LREM', KEYS[1], 0, ARGV[i]) end
return n
"""

# KEYS: this host's adopting list, orphans list; ARGV: member...
# Gives orphans this host popped but cannot adopt now back to the tail of the queue, in one
# step (a push then an ack could die in between). Members not in the adopting list are not
# queued: a retry after a lost reply must not queue them twice. Returns how many moved.
REQUEUE_ORPHANS = """
local n = 0
for i = 1, #ARGV do
  if redis.call('LREM', KEYS[1], 0, ARGV[i]) > 0 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    n = n + 1
  end
end
return n
"""

# KEYS: host hash, host-agents set, hosts set, host's adopting list, orphans list, hosts meta hash
# ARGV: address
# Forgets a host (drain done). Orphans it took and did not ack go back to the head of the
# queue in the same step, so a host that drains mid-adoption loses none. Returns how many.
REMOVE_HOST = """
local n = 0
while redis.call('LMOVE', KEYS[4], KEYS[5], 'RIGHT', 'LEFT') do n = n + 1 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[1] .. ':alloc')
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1] .. '|since', ARGV[1] .. '|renewed')
return n
"""

# KEYS: host hash; ARGV: state. Sets the state of a host that is still there; 0 if it is
# gone (a plain HSET would create a lease hash without a TTL: a host alive forever).
SET_HOST_STATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
"""

# KEYS: agent hash, guild set, this host's agents set, orphans list; ARGV: member, agent id, host
# A draining host hands an agent it stopped to the fleet: removes the entry and its
# memberships and queues it as an orphan in one step, only while this host owns it — a
# kill between "removed" and "queued" cannot lose the agent. Returns 1 if the agent is on
# the queue: handed off now, or by an earlier attempt whose reply was lost (entry gone,
# member queued), so the client's retry answers the same; 0 otherwise.
HAND_OFF_AGENT = _ALLOC_LUA + """
local owner = redis.call('HGET', KEYS[1], 'host')
if not owner then
  if redis.call('LPOS', KEYS[4], ARGV[1]) then return 1 end
  return 0
end
if owner ~= ARGV[3] then
  redis.call('SREM', KEYS[3], ARGV[1])  -- not ours any more: drop our stale membership
  return 0
end
release(KEYS[1], ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('RPUSH', KEYS[4], ARGV[1])
return 1
"""

# KEYS: agent hash, unplaced hash, guild's desired-state hash; ARGV: member, agent id, entry JSON
# Records that a wanted agent fits no host that tried it, unless it is no longer wanted or a
# claim somewhere has taken it meanwhile (that claim cleared the entry; a late report must
# not bring it back). Returns 1 if recorded.
REPORT_UNPLACED = """
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 0
end
local v = redis.call('HMGET', KEYS[1], 'state', 'host_key')
local live = v[1] == 'starting' or v[1] == 'running' or v[1] == 'restarting' or v[1] == 'stopping'
if live and v[2] and redis.call('EXISTS', v[2]) == 1 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""

# KEYS: epoch string, orphans list, hosts set, keeper's missing-since hash, then per agent:
#       agent hash, guild's desired-state hash, hash of the host the engine last saw it on
# ARGV: candidate epoch, epoch the engine last saw ("" = none yet), host key prefix, fallback
#       lease ms, margin ms, then per agent: member, agent id, LaunchRequest JSON, may push ("1"/"0")
# The engine's keeper (engine/keeper.py): puts back what only the engine that launched an agent
# still knows after Redis lost its data. ``epoch`` is a random id the first keeper writes; a
# different (or no) epoch than the caller last saw means Redis lost everything since, so a
# missing desired entry was lost, not cleared by a stop: it is written back. An agent with no
# record, not queued, whose last known host has no lease, while some other host has one (so
# a hold every host shares is over, and someone can adopt it), is noted missing on Redis's own
# clock; still so more than the hosts' lease (+ margin) later, it is pushed onto the orphan
# queue — no copy of it can be alive by then (docs/architecture.md, "Fencing"). Every
# condition is re-checked here, in the step that pushes, so a caller that paused between
# rounds cannot queue an agent that came back meanwhile.
# Returns {epoch, wait ms, then per agent: status, owner}; status is running (owner = its
# host), gone (desired cleared while Redis kept its data: stopped elsewhere), unknown (no desired
# entry and no epoch seen before: nothing done), queued, host_alive
# (its host re-registers it at its next renewal), no_adopter, missing, pushed; plus
# restored_ when the desired entry was written back.
KEEP_AGENTS = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
local lost_data = ARGV[2] ~= '' and epoch ~= ARGV[2]
local queued = {}
for _, m in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do queued[m] = true end
local live, nlive, lease_ms = {}, 0, 0
for _, addr in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local enc = string.gsub(addr, '([^%w%-%._~])', function(c) return string.format('%%%02X', string.byte(c)) end)
  local key = ARGV[3] .. enc
  for _, m in ipairs(redis.call('LRANGE', key .. ':adopting', 0, -1)) do queued[m] = true end
  if redis.call('EXISTS', key) == 1 then
    live[key] = true
    nlive = nlive + 1
    lease_ms = math.max(lease_ms, tonumber(redis.call('HGET', key, 'lease_ms') or '0') or 0)
  end
end
if lease_ms == 0 then lease_ms = tonumber(ARGV[4]) end
local wait_ms = lease_ms + tonumber(ARGV[5])
local out = {epoch, tostring(wait_ms)}
local n = (#KEYS - 4) / 3
for i = 0, n - 1 do
  local agent_key, desired_key, host_key = KEYS[5 + i * 3], KEYS[6 + i * 3], KEYS[7 + i * 3]
  local member, agent_id, request, may_push = ARGV[6 + i * 4], ARGV[7 + i * 4], ARGV[8 + i * 4], ARGV[9 + i * 4]
  local status, owner, prefix = '', '', ''
  if redis.call('HEXISTS', desired_key, agent_id) == 0 then
    if lost_data then
      redis.call('HSET', desired_key, agent_id, request)
      prefix = 'restored_'
    elseif ARGV[2] == '' then
      status = 'unknown'  -- no epoch seen yet: lost or stopped, nobody can tell; left alone
    else
      status = 'gone'
    end
  end
  if status == '' then
    owner = redis.call('HGET', agent_key, 'host') or ''
    if owner ~= '' then
      status = 'running'
    elseif queued[member] then
      status = 'queued'
    elseif live[host_key] then
      status = 'host_alive'
    elseif nlive == 0 then
      status = 'no_adopter'
    else
      local since = tonumber(redis.call('HGET', KEYS[4], member) or '')
      if not since then
        redis.call('HSET', KEYS[4], member, now_ms)
        status = 'missing'
      elseif now_ms - since > wait_ms and may_push == '1' then
        redis.call('RPUSH', KEYS[2], member)
        status = 'pushed'
      else
        status = 'missing'
      end
    end
  end
  if status ~= 'missing' then redis.call('HDEL', KEYS[4], member) end
  table.insert(out, prefix .. status)
  table.insert(out, owner)
end
return out
"""
