-- jobs.lua: a page of jobs, newest first (highest seq), read from indexes only.
-- KEYS[1] P:j. ARGV: state, job, tag ('' = any), limit, before (a job id, '' = none).
-- Reads P:t:<tag>, P:s:<state>, P:n:<job>, and for queued jobs never moved since enqueue the
-- P:l:* lists (found through P:queues and P:Q:*), which are in seq order already. Each source
-- yields its own newest `limit` matches; the merge keeps the newest `limit` of them all.
-- Returns a flat list [id, record, ...].
local want_state, want_job, tag = ARGV[1], ARGV[2], ARGV[3]
local limit, before = tonumber(ARGV[4]), ARGV[5]
if limit <= 0 then return {} end
local STATES = {'scheduled', 'queued', 'running', 'retrying', 'succeeded', 'dead', 'cancelled',
                'rejected'}

local function raw_of(id)
  return redis.call('HGET', J, id) or redis.call('GET', k_final(id))
end
local function seq_of(rec) if is_fresh(rec) then return rec[1] end return rec.sq end

local before_seq = nil
if before ~= '' then
  local raw = raw_of(before)
  if not raw then return {} end
  before_seq = seq_of(cmsgpack.unpack(raw))
end

-- does a record pass the filters its source does not already guarantee?
local function passes(rec, check_state, check_job)
  local st, job
  if is_fresh(rec) then
    st = 'queued'
    if check_job then
      local r = expand_by_json(rec)
      job = r and r.j
    end
  else
    st, job = rec.st, rec.j
  end
  return (not check_state or st == want_state) and (not check_job or job == want_job)
end

local found = {}  -- {seq, id, raw}
local function from_zset(key, check_state, check_job)
  local top = '+inf'
  if before_seq then top = '(' .. before_seq end
  local taken, offset = 0, 0
  local chunk = math.max(limit, 50)
  while taken < limit do
    local ids = redis.call('ZREVRANGEBYSCORE', key, top, '-inf', 'LIMIT', offset, chunk)
    for _, id in ipairs(ids) do
      local raw = raw_of(id)
      if raw then
        local rec = cmsgpack.unpack(raw)
        if passes(rec, check_state, check_job) then
          found[#found + 1] = {seq_of(rec), id, raw}
          taken = taken + 1
          if taken >= limit then break end
        end
      end
    end
    if #ids < chunk then break end
    offset = offset + chunk
  end
end

local function seq_at(key, i)
  local id = redis.call('LINDEX', key, i)
  local raw = id and raw_of(id)
  return raw and seq_of(cmsgpack.unpack(raw))
end

local function from_list(key)
  local last = redis.call('LLEN', key) - 1
  if before_seq then  -- the last position holding a seq below before_seq (binary search)
    local lo, hi, answer = 0, last, -1
    while lo <= hi do
      local mid = math.floor((lo + hi) / 2)
      local m, s = mid, nil
      while m <= hi do
        s = seq_at(key, m)
        if s then break end
        m = m + 1
      end
      if s and s < before_seq then
        answer, lo = m, m + 1
      else
        hi = mid - 1
      end
    end
    last = answer
  end
  local taken = 0
  local chunk = math.max(limit, 50)
  while last >= 0 and taken < limit do
    local first = math.max(last - chunk + 1, 0)
    local ids = redis.call('LRANGE', key, first, last)
    for k = #ids, 1, -1 do
      local raw = redis.call('HGET', J, ids[k])
      if raw then
        local rec = cmsgpack.unpack(raw)
        if is_fresh(rec) then
          found[#found + 1] = {rec[1], ids[k], raw}
          taken = taken + 1
          if taken >= limit then break end
        end
      end
    end
    last = first - 1
  end
end

local function fresh_lists()
  for _, queue in ipairs(redis.call('SMEMBERS', P .. ':queues')) do
    for _, member in ipairs(redis.call('ZRANGE', k_slots(queue), 0, -1)) do
      local colon = string.find(member, ':', 1, true)
      if colon and (want_job == '' or string.sub(member, colon + 1) == want_job) then
        from_list(k_fresh(queue, member))
      end
    end
  end
end

if tag ~= '' then
  from_zset(P .. ':t:' .. tag, want_state ~= '', want_job ~= '')
elseif want_state ~= '' and want_job ~= '' then
  local by_state, by_job = P .. ':s:' .. want_state, P .. ':n:' .. want_job
  if redis.call('ZCARD', by_state) <= redis.call('ZCARD', by_job) then
    from_zset(by_state, false, true)
  else
    from_zset(by_job, true, false)
  end
  if want_state == 'queued' then fresh_lists() end
elseif want_state ~= '' then
  from_zset(P .. ':s:' .. want_state, false, false)
  if want_state == 'queued' then fresh_lists() end
elseif want_job ~= '' then
  from_zset(P .. ':n:' .. want_job, false, false)
  fresh_lists()
else
  for _, st in ipairs(STATES) do from_zset(P .. ':s:' .. st, false, false) end
  fresh_lists()
end

table.sort(found, function(a, b) return a[1] > b[1] end)
local out = {}
for i = 1, math.min(limit, #found) do
  out[#out + 1] = found[i][2]
  out[#out + 1] = found[i][3]
end
return out
