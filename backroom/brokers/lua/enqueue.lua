-- enqueue.lua: store a batch of envelopes, all or none.
-- KEYS[1] P:j. ARGV[1] msgpack array of rows [id, envelope, job, queue, priority (text),
-- due (nil unless scheduled), meta (nil or map: mr x uk uf tg ca, and j q p when the envelope
-- is not backroom's own JSON)], ARGV[2] now.
-- Writes P:seq, P:j, P:l:*, P:Q:*, P:queues, P:due, P:x, P:s:scheduled, P:n:*, P:t:*, P:u:*,
-- P:uu, P:c; publishes on P:w:<queue> when a ready list of the queue was empty before. A job
-- for a queue with an offer (common.lua, take_offer) is claimed for that worker instead, and
-- written as a running job (P:j, P:lease, P:s:running, P:n:*, P:h, P:T) and to its P:i inbox.
-- Returns a flat list [index, existing id, ...] for rows whose unique key is held (0-based).
local rows = cmsgpack.unpack(ARGV[1])
local now = tonumber(ARGV[2])

-- The stored envelope of a job id, or nil.
local function stored_envelope(id)
  if redis.call('HEXISTS', J, id) == 0 and redis.call('EXISTS', k_final(id)) == 0 then
    return nil
  end
  local rec = load(id)
  if rec == nil then return nil end
  if is_fresh(rec) then return rec[2] end
  return rec.e
end

-- pass 1: decide, write nothing (a script that fails half-way keeps its writes)
local out, take, held, seen = {}, {}, {}, {}
for i, row in ipairs(rows) do
  local id, meta = row[1], row[7]
  local uk = type(meta) == 'table' and meta.uk or nil
  local holder = nil
  if uk ~= nil then
    holder = held[uk]
    if holder == nil then
      local v = redis.call('GET', P .. ':u:' .. uk)
      if v then
        local sep = string.find(v, '\0', 1, true)
        local untils = string.sub(v, sep + 1)
        if untils == '' or tonumber(untils) > now then holder = string.sub(v, 1, sep - 1) end
      end
    end
  end
  if holder ~= nil then
    out[#out + 1] = i - 1
    out[#out + 1] = holder
  else
    if seen[id] then return redis.error_reply('DUPLICATE job id ' .. id .. ' twice in one batch') end
    local existing = stored_envelope(id)
    if existing ~= nil then
      if existing ~= row[2] then
        return redis.error_reply('DUPLICATE job id ' .. id .. ' is already stored')
      end
      -- the very same envelope: a retried call whose first reply was lost; keep the first
    else
      take[#take + 1] = row
    end
    seen[id] = true
    if uk ~= nil then held[uk] = id end
  end
end
if #take == 0 then return out end

-- pass 2: write. A job for a queue that a worker waits on (an offer) goes straight to it,
-- claimed here: no list, no wake-up, no claim call of its own.
local hands, handed = {}, {}  -- queue -> the offer being filled (false: none), every one taken
local function hand_for(queue)
  local h = hands[queue]
  if h and h.left > 0 then return h end
  if h == false then return nil end
  if h == nil and (redis.call('EXISTS', k_offers(queue)) == 0
                   or redis.call('SISMEMBER', P .. ':paused', queue) == 1) then
    hands[queue] = false
    return nil
  end
  local worker, o = take_offer(queue, now)
  if worker == nil then
    hands[queue] = false
    return nil
  end
  h = {w = worker, left = o[2], lease_ms = o[3] * 1000, salt = o[4], k = 0,
       items = {now + o[3]}}
  handed[#handed + 1] = h
  hands[queue] = h
  return h
end

local seq = redis.call('INCRBY', P .. ':seq', #take) - #take
local lists, list_order = {}, {}
for _, row in ipairs(take) do
  seq = seq + 1
  local id, env, job, queue, prio, due, meta = row[1], row[2], row[3], row[4], row[5], row[6], row[7]
  local h = nil  -- the offer this job goes to
  if type(meta) ~= 'table' then meta = nil end
  if meta and meta.uk ~= nil then
    local untils = ''
    if type(meta.uf) == 'number' then untils = num(now + meta.uf) end
    local key = P .. ':u:' .. meta.uk
    redis.call('SET', key, id .. '\0' .. untils)
    if untils ~= '' then
      redis.call('PEXPIRE', key, math.floor(meta.uf * 1000) + 3600000)  -- a backstop only
      zadd(P .. ':uu', untils, meta.uk)
    end
  end
  if due then
    local r = {st = 'scheduled', sq = seq, e = env, j = job, q = queue, p = tonumber(prio),
               a = 0, du = due}
    if meta then for k, v in pairs(meta) do r[k] = v end end
    save_live(id, r)
    zadd(P .. ':due', num(due), id)
    zadd(P .. ':s:scheduled', seq, id)
    zadd(P .. ':n:' .. job, seq, id)
    count(r, 'scheduled', 1)
  else
    local rec
    if meta then rec = {seq, env, now, meta} else rec = {seq, env, now} end
    h = hand_for(queue)
    if h then
      local r = expand(rec, job, queue, tonumber(prio))
      count(r, 'queued', 1)  -- start_job moves it on to running (or cancelled, expired)
      h.k = h.k + 1
      if start_job(id, r, true, now, h.items[1], h.w, h.salt .. h.k, true) then
        local items = h.items
        items[#items + 1] = id
        items[#items + 1] = r.e
        items[#items + 1] = r.a
        items[#items + 1] = r.ai
        h.left = h.left - 1
      end
    else
      redis.call('HSET', J, id, cmsgpack.pack(rec))
      local member = prio .. ':' .. job
      local key = k_fresh(queue, member)
      local ids = lists[key]
      if ids == nil then
        ids = {}
        lists[key] = ids
        list_order[#list_order + 1] = {key, queue, prio, member}
      end
      ids[#ids + 1] = id
      add(counts, job .. '\0' .. queue .. '\0queued', 1)
    end
  end
  -- a job waiting to start is in P:x by its expiry (one handed over has started)
  if not h and meta and type(meta.x) == 'number' then zadd(P .. ':x', num(meta.x), id) end
  if meta and type(meta.tg) == 'table' then
    for _, tag in ipairs(meta.tg) do zadd(P .. ':t:' .. tag, seq, id) end
  end
end

for _, entry in ipairs(list_order) do
  local key, queue, prio, member = entry[1], entry[2], entry[3], entry[4]
  local ids, length = lists[key], 0
  for i = 1, #ids, 1000 do
    length = redis.call('RPUSH', key, unpack(ids, i, math.min(i + 999, #ids)))
  end
  -- A list that was empty: register it, and wake the workers. One that was not has workers
  -- on it already (waking them all on every enqueue would only make them spin).
  if length == #ids then
    redis.call('ZADD', k_slots(queue), -tonumber(prio), member)
    redis.call('SADD', P .. ':queues', queue)
    wake(queue)
  end
end
for _, h in ipairs(handed) do  -- one inbox entry per worker; '' when all it got had expired
  to_inbox(h.w, #h.items > 1 and cmsgpack.pack(h.items) or '', h.lease_ms)
end
flush()
return out
