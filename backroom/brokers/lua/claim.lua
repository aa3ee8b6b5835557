-- claim.lua: reserve up to `limit` queued jobs under a lease, in one step.
-- KEYS[1] P:j. ARGV: now, lease_until, worker id, limit, attempt id salt, offer seconds (0: no
-- offer), queue names...
-- Reads P:paused, P:Q:<queue>; pops P:l:<queue>:* lists and P:g:<queue>:* zsets; writes P:j,
-- P:lease, P:s:*, P:n:*, P:c, P:h, P:T, P:Tn, P:cl:<salt>, P:o, P:o:*; a job past its expiry
-- ends cancelled ("expired") in P:d. With offer seconds > 0, a call that claims fewer than
-- `limit` leaves an offer for the rest (common.lua, take_offer) unless the worker's inbox holds
-- anything; one that claims `limit` takes the worker's offer back.
-- Order: queues as given, then higher priority, then lower seq (oldest first).
-- Returns msgpack: a flat array [id, envelope, attempts, attempt id, ...] (one bulk reply
-- parses far faster in Python than a long multi-bulk one).
local now, lease_until = tonumber(ARGV[1]), tonumber(ARGV[2])
local worker, limit, salt = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local offer_s = tonumber(ARGV[6])  -- > 0: offer to take what comes, when this finds too little
local FIRST_QUEUE = 7
local out, n = {}, 0

-- The salt is new per call: seen before, this is the same call repeated after its reply was
-- lost (a timeout, a dropped connection). Return what it claimed then, still owned, instead of
-- claiming more: jobs claimed by a reply nobody read would wait for their lease to run out.
local made = P .. ':cl:' .. salt
local before = redis.call('GET', made)
if before then
  local claimed = cmsgpack.unpack(before)
  for i = 1, #claimed, 2 do
    local raw = redis.call('HGET', J, claimed[i])
    local r = raw and cmsgpack.unpack(raw)
    if r and not is_fresh(r) and owned(r, claimed[i + 1]) then
      out[#out + 1] = claimed[i]
      out[#out + 1] = r.e
      out[#out + 1] = r.a
      out[#out + 1] = r.ai
    end
  end
  return cmsgpack.pack(out)
end

-- A queued job (expanded, already out of its list or zset) starts running, or ends expired.
local function start(id, r, fresh)
  if start_job(id, r, fresh, now, lease_until, worker, salt .. (n + 1)) then
    n = n + 1
    out[#out + 1] = id
    out[#out + 1] = r.e
    out[#out + 1] = r.a
    out[#out + 1] = r.ai
  end
end

-- Point slot `h` at its oldest claimable job (h.id = nil when there is none).
local function refill(h)
  h.id = nil
  while true do
    if h.fresh then
      local id = redis.call('LINDEX', h.key, 0)
      if not id then return end
      local raw = redis.call('HGET', J, id)
      local rec = raw and cmsgpack.unpack(raw)
      if rec and is_fresh(rec) then
        h.id, h.seq, h.rec = id, rec[1], rec
        return
      end
      redis.call('LPOP', h.key)  -- cancelled or moved since: a stale entry
    else
      local top = redis.call('ZRANGE', h.key, 0, 0, 'WITHSCORES')
      if #top == 0 then return end
      local raw = redis.call('HGET', J, top[1])
      local rec = raw and cmsgpack.unpack(raw)
      if rec and not is_fresh(rec) and rec.st == 'queued' then
        h.id, h.seq, h.rec = top[1], tonumber(top[2]), rec
        return
      end
      redis.call('ZREM', h.key, top[1])
    end
  end
end

-- One slot at this priority (the usual case): take its oldest jobs in bulk, no merging.
local function claim_slot(queue, member)
  local colon = string.find(member, ':', 1, true)
  local key, prio, job
  if colon then
    key = k_fresh(queue, member)
    prio, job = tonumber(string.sub(member, 1, colon - 1)), string.sub(member, colon + 1)
  else
    key = k_again(queue, member)
  end
  while n < limit do
    local want, ids = math.min(limit - n, 1000), nil  -- unpack() stops near 8,000 values
    if colon then
      ids = redis.call('LPOP', key, want)
    else
      local popped = redis.call('ZPOPMIN', key, want)  -- id, score, id, score ...
      ids = {}
      for i = 1, #popped, 2 do ids[#ids + 1] = popped[i] end
    end
    if not ids or #ids == 0 then
      redis.call('ZREM', k_slots(queue), member)
      return
    end
    local raws = redis.call('HMGET', J, unpack(ids))
    for i, id in ipairs(ids) do
      local rec = raws[i] and cmsgpack.unpack(raws[i])
      if rec and colon and is_fresh(rec) then
        start(id, expand(rec, job, queue, prio), true)
      elseif rec and not colon and not is_fresh(rec) and rec.st == 'queued' then
        start(id, rec, false)
      end  -- else a stale entry: cancelled or moved since it was listed
    end
    if #ids < want then
      redis.call('ZREM', k_slots(queue), member)
      return
    end
  end
end

local function claim_group(queue, members)
  if #members == 1 then return claim_slot(queue, members[1]) end
  local heads = {}
  for _, member in ipairs(members) do
    local colon = string.find(member, ':', 1, true)
    local h = {member = member}
    if colon then
      h.fresh, h.key = true, k_fresh(queue, member)
      h.prio, h.job = tonumber(string.sub(member, 1, colon - 1)), string.sub(member, colon + 1)
    else
      h.fresh, h.key = false, k_again(queue, member)
    end
    refill(h)
    heads[#heads + 1] = h
  end
  while n < limit do
    local best = nil
    for _, h in ipairs(heads) do
      if h.id and (best == nil or h.seq < best.seq) then best = h end
    end
    if best == nil then break end
    local id = best.id
    if best.fresh then
      redis.call('LPOP', best.key)
      start(id, expand(best.rec, best.job, queue, best.prio), true)
    else
      redis.call('ZREM', best.key, id)
      start(id, best.rec, false)
    end
    refill(best)
  end
  for _, h in ipairs(heads) do
    if h.id == nil then redis.call('ZREM', k_slots(queue), h.member) end
  end
end

for i = FIRST_QUEUE, #ARGV do
  if n >= limit then break end
  local queue = ARGV[i]
  if redis.call('SISMEMBER', P .. ':paused', queue) == 0 then
    local slots = redis.call('ZRANGE', k_slots(queue), 0, -1, 'WITHSCORES')
    local j = 1
    while j <= #slots and n < limit do
      local score, members = slots[j + 1], {}
      while j <= #slots and slots[j + 1] == score do
        members[#members + 1] = slots[j]
        j = j + 2
      end
      claim_group(queue, members)
    end
  end
end
if n > 0 then  -- (id, attempt id) per job, for a repeat of this call; kept for the lease
  local claimed = {}
  for i = 1, #out, 4 do
    claimed[#claimed + 1] = out[i]
    claimed[#claimed + 1] = out[i + 3]
  end
  local ttl_ms = math.max(1, math.ceil((lease_until - now) * 1000))
  redis.call('SET', made, cmsgpack.pack(claimed), 'PX', ttl_ms)
end
if offer_s > 0 then  -- replaces this worker's offer, if it had one
  -- none while its inbox holds anything: what the last offer brought may fill its room (it
  -- takes that first, then claims and offers again)
  if n < limit and redis.call('LLEN', k_inbox(worker)) == 0 then
    -- a job handed over is leased for the offer's time at first (a worker that died with its
    -- offer out strands it no longer); the worker renews it in full once it has it
    local o = {now + offer_s, limit - n, math.min(lease_until - now, offer_s), salt .. 'h'}
    for i = FIRST_QUEUE, #ARGV do
      o[#o + 1] = ARGV[i]
      redis.call('ZADD', k_offers(ARGV[i]), now, worker)
    end
    redis.call('HSET', P .. ':o', worker, cmsgpack.pack(o))
  else
    redis.call('HDEL', P .. ':o', worker)
  end
end
flush()
return cmsgpack.pack(out)
