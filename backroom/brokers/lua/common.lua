-- common.lua: helpers every script starts with (redis_scripts.py prepends this file and fills
-- in the __NAME__ constants). KEYS[1] is always P:j, so P is the app's prefix "{name}" and every
-- key of one app hashes to one Redis Cluster slot.
--
-- Key layout (P = "{prefix}"; Q = a queue name with "%" and ":" escaped as %25 and %3A):
--   P:seq               STRING  enqueue sequence: orders FIFO and "newest first"
--   P:j                 HASH    id -> live record (scheduled, queued, running, retrying)
--   P:d:<id>            STRING  finished record (succeeded, dead, cancelled, rejected), PX ttl
--   P:Q:<Q>             ZSET    the queue's ready slots, score -priority:
--                               "<priority>:<job>" (a fresh list) or "<priority>" (again zset)
--   P:l:<Q>:<prio>:<job> LIST   ids of fresh jobs: queued at enqueue and never moved since
--   P:g:<Q>:<prio>      ZSET    ids queued again (promoted, released, recovered, retried), score seq
--   P:queues            SET     every queue name that has held a fresh job
--   P:due               ZSET    scheduled and retrying ids, score due time
--   P:lease             ZSET    running ids, score lease_until
--   P:x                 ZSET    waiting (scheduled, queued, retrying) ids with an expiry, score it
--   P:s:<state>         ZSET    ids per state, score seq (fresh queued jobs are in P:l lists only)
--   P:n:<job>           ZSET    ids per job name, score seq (idem)
--   P:t:<tag>           ZSET    ids per tag, score seq (every tagged job)
--   P:f:<state>         LIST    finished ids per final state in the order they finished (the
--                               result ttl sweep and prune pop from its head)
--   P:u:<unique_key>    STRING  "<job id>\0<held until or empty>"
--   P:uu                ZSET    unique keys held for a time, score held until (to forget them)
--   P:c                 HASH    "<job>\0<queue>\0<state>" -> count
--   P:h                 HASH    "<job>\0w:<bucket>", "\0wc" count, "\0wt" total and "\0wm" max in
--                               microseconds (wait); the same with r (run); "\0retry",
--                               "\0recovery", "\0x:<category>" (rejections by category)
--   P:T                 HASH    "<tag>\0<kind>" -> n: per tag outcomes, "retry", "j:<job>",
--                               the run histogram "r:<bucket>", "rt", "rm", the wait
--                               histogram "w:<bucket>", "wt", "wm" (sampled at claim) and
--                               "running" (jobs running now) (base.py's kinds); tag "" sums
--                               the tags past MAX_TAGS
--   P:Tn                SET     the tags with numbers of their own (at most MAX_TAGS)
--   P:m:<minute>        HASH    "<job>\0<kind>" -> n for one minute (Unix time // 60); expires
--                               KEEP_MINUTES after it
--   P:F                 HASH    "<job>\0<exception type>" -> msgpack [failures, dead, latest id,
--                               latest message, latest at]; "\0" sums groups past the cap
--   P:paused            SET     paused queue names
--   P:fired             HASH    schedule -> last tick granted
--   P:workers           HASH    worker id -> "<expires_at>\0<info json>"
--   P:wait / P:done:<id> ZSET / LIST  wait_finished: waiters by deadline, and their wake-up
--   P:o / P:o:<Q>       HASH / ZSET  offers of workers waiting for work (see take_offer)
--   P:i:<worker>        LIST    a worker's inbox: jobs claimed for it at enqueue, wake-ups
--   channel P:w:<Q>             PUBLISH when a queue gains work
-- A live record is msgpack: a fresh job is the array [seq, envelope, queued_at, meta?] (the
-- smallest thing that can be claimed); any other is a map with the short keys used below.
-- The envelope is its JSON with the leading "id" member cut off (the id is the hash field).

local J = KEYS[1]
local P = string.sub(J, 1, -3)
local BOUNDS = nil  -- base.BUCKET_BOUNDS, built on first use
local DEFAULT_RETRIES = __DEFAULT_RETRIES__
local TTL = {succeeded = __TTL_MS__, cancelled = __TTL_MS__, dead = __TTL_LONG_MS__,
             rejected = __TTL_LONG_MS__}

local function num(x) return string.format('%.17g', x) end
local function esc(queue)
  return (string.gsub(string.gsub(queue, '%%', '%%25'), ':', '%%3A'))
end
local function prio_text(p) return string.format('%.0f', p) end
local function k_slots(queue) return P .. ':Q:' .. esc(queue) end
local function k_fresh(queue, member) return P .. ':l:' .. esc(queue) .. ':' .. member end
local function k_again(queue, prio) return P .. ':g:' .. esc(queue) .. ':' .. prio end
local function k_final(id) return P .. ':d:' .. id end

-- records ----------------------------------------------------------------------------------
local function load(id)
  local raw = redis.call('HGET', J, id)
  if raw then return cmsgpack.unpack(raw) end
  raw = redis.call('GET', k_final(id))
  if raw then return cmsgpack.unpack(raw) end
  return nil
end

local function is_fresh(rec) return rec[1] ~= nil end

-- A fresh record as a full map; job, queue and priority come from the list it sits in.
local function expand(rec, job, queue, prio)
  local r = {st = 'queued', sq = rec[1], e = rec[2], qa = rec[3], j = job, q = queue,
             p = prio, a = 0}
  if type(rec[4]) == 'table' then
    for k, v in pairs(rec[4]) do r[k] = v end
  end
  return r
end

-- A fresh record found by id alone: job, queue and priority are read from the envelope (or
-- its meta, where enqueue put them for an envelope encoded some other way).
local function expand_by_json(rec)
  local meta = rec[4]
  if type(meta) == 'table' and type(meta.j) == 'string' then
    return expand(rec, meta.j, meta.q, meta.p)
  end
  local ok, env = pcall(cjson.decode, rec[2])
  if not ok or type(env) ~= 'table' or type(env.job) ~= 'string' then return nil end
  local queue = env.queue
  if type(queue) ~= 'string' then queue = 'default' end
  local prio = env.priority
  if type(prio) ~= 'number' then prio = 0 end
  return expand(rec, env.job, queue, prio)
end

local function save_live(id, r) redis.call('HSET', J, id, cmsgpack.pack(r)) end

-- counters and histograms: gathered in tables, written once by flush() -------------------------
local counts, hints, hmaxes = {}, {}, {}
local function add(t, k, n) t[k] = (t[k] or 0) + n end
local function count(r, st, n) add(counts, r.j .. '\0' .. r.q .. '\0' .. st, n) end
local function event(job, name) add(hints, job .. '\0' .. name, 1) end

local function bucket_of(s)  -- bisect_left over BOUNDS, 0-based like base.bucket_of
  if BOUNDS == nil then BOUNDS = {__BOUNDS__} end
  local lo, hi = 1, #BOUNDS + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if BOUNDS[mid] < s then lo = mid + 1 else hi = mid end
  end
  return lo - 1
end

-- A sample of `s` seconds as the histograms keep it: its bucket and whole microseconds (totals
-- and maxima are kept in microseconds, so HINCRBY serves them).
local function measured(s)
  if s ~= s or s < 0 then s = 0 end
  return bucket_of(s), math.floor(s * 1e6 + 0.5)
end

local function sample(job, kind, s)  -- kind: 'w' (wait) or 'r' (run)
  local f = job .. '\0' .. kind
  local b, us = measured(s)
  add(hints, f .. ':' .. b, 1)
  add(hints, f .. 'c', 1)
  add(hints, f .. 't', us)
  if (hmaxes[f .. 'm'] or -1) < us then hmaxes[f .. 'm'] = us end
end

-- per tag, per minute and per failure type: gathered like the counters, written by flush() ---
-- One accumulator per job name (for now's minute hash) and per tag prefix (for P:T), updated in
-- place per job: {r = the run time's histogram, w = the wait time's (per tag only), n =
-- {[kind] = n}, j = {[job] = finished}}; a histogram is {b = {[bucket] = n}, t = total us,
-- m = max us (-1: none)}. flush() builds each "<prefix>\0<kind>" field once per batch.
local MAX_TAGS = __MAX_TAGS__
local KEEP_MINUTES = __KEEP_MINUTES__
local MAX_FAILURE_GROUPS = __MAX_FAILURE_GROUPS__
local job_accs, tag_accs, prefix_accs = {}, {}, {}
local minute_key, minute_ttl = nil, nil  -- a call has one `now`, so one minute

local function histogram()
  return {b = {}, t = 0, m = -1}
end

local function accumulator()
  return {r = histogram(), w = histogram(), n = {}, j = {}}
end

local function add_sample(h, b, us)
  h.b[b] = (h.b[b] or 0) + 1
  h.t = h.t + us
  if h.m < us then h.m = us end
end

-- The accumulator of job r's numbers in now's minute; the minute's hash expires once the minute
-- is KEEP_MINUTES old.
local function job_acc(r, now)
  if minute_key == nil then
    local m = math.floor(now / 60)
    minute_key = P .. ':m:' .. string.format('%d', m)
    minute_ttl = math.max(1, math.ceil((m + KEEP_MINUTES + 1) * 60 - now))
  end
  local a = job_accs[r.j]
  if a == nil then
    a = accumulator()
    job_accs[r.j] = a
  end
  return a
end

-- The accumulator of a tag: its own while the tag has (or gets) one of the MAX_TAGS places in
-- P:Tn, else the one of prefix '' (the sum of the rest); false for the empty tag.
local tag_room = nil
local function tag_acc(tag)
  local a = tag_accs[tag]
  if a ~= nil then return a end
  local f = false
  if type(tag) == 'string' and tag ~= '' then
    if redis.call('SISMEMBER', P .. ':Tn', tag) == 1 then
      f = tag
    else
      if tag_room == nil then tag_room = MAX_TAGS - redis.call('SCARD', P .. ':Tn') end
      if tag_room > 0 then
        redis.call('SADD', P .. ':Tn', tag)
        tag_room = tag_room - 1
        f = tag
      else
        f = ''
      end
    end
  end
  a = false
  if f then
    a = prefix_accs[f]
    if a == nil then
      a = accumulator()
      prefix_accs[f] = a
    end
  end
  tag_accs[tag] = a
  return a
end

-- An attempt of job r that ran `s` seconds and ended now: its minute's and its tags' histograms.
local function run_tally(r, s, now)
  local b, us = measured(s)
  add_sample(job_acc(r, now).r, b, us)
  if type(r.tg) ~= 'table' then return end
  for _, tag in ipairs(r.tg) do
    local a = tag_acc(tag)
    if a then add_sample(a.r, b, us) end
  end
end

-- Job r ended in final state st (called by finish()); "retry" for a failed attempt retried.
local function outcome_tally(r, st, now)
  if st ~= 'cancelled' then
    local n = job_acc(r, now).n
    n[st] = (n[st] or 0) + 1
  end
  if type(r.tg) ~= 'table' then return end
  for _, tag in ipairs(r.tg) do
    local a = tag_acc(tag)
    if a then
      a.n[st] = (a.n[st] or 0) + 1
      if st ~= 'retry' then a.j[r.j] = (a.j[r.j] or 0) + 1 end
    end
  end
end

-- A job of record r started running (claimed) after waiting `s` seconds queued: its tags' wait
-- histograms.
local function wait_tally(r, s)
  if type(r.tg) ~= 'table' then return end
  local b, us = measured(s)
  for _, tag in ipairs(r.tg) do
    local a = tag_acc(tag)
    if a then add_sample(a.w, b, us) end
  end
end

-- A job of record r started running (delta 1) or left it (-1: any outcome, a retry, a release,
-- a lost lease), per tag. reindex() calls it, so no path into or out of running can miss it.
local function running_tally(r, delta)
  if type(r.tg) ~= 'table' then return end
  for _, tag in ipairs(r.tg) do
    local a = tag_acc(tag)
    if a then a.n.running = (a.n.running or 0) + delta end
  end
end

local function flush_histogram(key, f, prefix, h)
  for b, n in pairs(h.b) do redis.call('HINCRBY', key, f .. prefix .. ':' .. b, n) end
  if h.m >= 0 then
    redis.call('HINCRBY', key, f .. prefix .. 't', h.t)
    local cur = tonumber(redis.call('HGET', key, f .. prefix .. 'm'))
    if cur == nil or h.m > cur then redis.call('HSET', key, f .. prefix .. 'm', h.m) end
  end
end

local function flush_accumulator(key, f, a)
  flush_histogram(key, f, 'r', a.r)
  flush_histogram(key, f, 'w', a.w)
  for kind, n in pairs(a.n) do
    if n ~= 0 then redis.call('HINCRBY', key, f .. kind, n) end
  end
  for job, n in pairs(a.j) do redis.call('HINCRBY', key, f .. 'j:' .. job, n) end
end

-- A failed attempt of job `id` (record r): its (job, exception type) group, and the latest.
local function failure_group(r, id, error_type, message, dead, now)
  local key, field = P .. ':F', r.j .. '\0' .. error_type
  local raw = redis.call('HGET', key, field)
  if not raw and redis.call('HLEN', key) >= MAX_FAILURE_GROUPS then
    field = '\0'
    raw = redis.call('HGET', key, field)
  end
  local g = raw and cmsgpack.unpack(raw) or {0, 0, '', '', 0}
  g[1] = g[1] + 1
  if dead then g[2] = g[2] + 1 end
  if now >= g[5] then g[3], g[4], g[5] = id, message, now end
  redis.call('HSET', key, field, cmsgpack.pack(g))
end

-- Index writes, gathered per key and sent by flush() as one command per key: a batch of jobs
-- costs one ZADD per index, not one per job. A job changes state at most once per call, so
-- removals (sent first) and additions never compete for one member. What a script reads back
-- while it runs (the ready lists and zsets it claims from) it writes directly instead.
local zadds, zrems, rpushes = {}, {}, {}
local function gather(t, key, a, b)
  local list = t[key]
  if list == nil then
    list = {}
    t[key] = list
  end
  list[#list + 1] = a
  if b ~= nil then list[#list + 1] = b end
end
local function zadd(key, score, member) gather(zadds, key, score, member) end
local function zrem(key, member) gather(zrems, key, member) end
local function rpush(key, member) gather(rpushes, key, member) end

local function send(command, key, args, step)
  for i = 1, #args, step do
    redis.call(command, key, unpack(args, i, math.min(i + step - 1, #args)))
  end
end

local function flush()
  for key, members in pairs(zrems) do send('ZREM', key, members, 1000) end
  for key, pairs_ in pairs(zadds) do send('ZADD', key, pairs_, 1000) end
  for key, members in pairs(rpushes) do send('RPUSH', key, members, 1000) end
  local c, h = P .. ':c', P .. ':h'
  for f, n in pairs(counts) do
    if n ~= 0 then redis.call('HINCRBY', c, f, n) end
  end
  for f, n in pairs(hints) do redis.call('HINCRBY', h, f, n) end
  for f, m in pairs(hmaxes) do
    local cur = tonumber(redis.call('HGET', h, f))
    if cur == nil or m > cur then redis.call('HSET', h, f, m) end
  end
  for job, a in pairs(job_accs) do flush_accumulator(minute_key, job .. '\0', a) end
  for f, a in pairs(prefix_accs) do flush_accumulator(P .. ':T', f .. '\0', a) end
  if minute_key then redis.call('EXPIRE', minute_key, minute_ttl) end
end

-- unique keys --------------------------------------------------------------------------------
-- Released at "start" (claimed) or "finish" (a final state); a key held for seconds only by time.
local function free_unique(id, r, when)
  local uk, uf = r.uk, r.uf
  if uk == nil or type(uf) == 'number' then return end
  if when == 'start' and uf ~= 'start' then return end
  local key = P .. ':u:' .. uk
  local held = redis.call('GET', key)
  if held and string.sub(held, 1, #id + 1) == id .. '\0' then redis.call('DEL', key) end
end

-- offers: a worker whose claim found fewer jobs than it wanted leaves an offer, P:o (worker ->
-- msgpack {until, how many, lease seconds, attempt id salt, queue names...}) and P:o:<Q> (worker
-- -> when offered), until its next claim. The work that next comes to one of its queues goes
-- straight to it: enqueue claims fresh jobs for the oldest live offer and pushes them to that
-- worker's inbox P:i:<worker>, one entry per call (msgpack {lease until, id, envelope,
-- attempts, attempt id, ...}); anything else that makes a queue claimable pushes a wake-up ''.
-- An offer serves once. What sits in an inbox is leased: a worker that dies before it pops
-- them loses nothing, its jobs come back when their lease runs out.
local INBOX_TTL_MS = 60000
local function k_offers(queue) return P .. ':o:' .. esc(queue) end
local function k_inbox(worker) return P .. ':i:' .. worker end

local function drop_offer(worker, o)
  redis.call('HDEL', P .. ':o', worker)
  if o then
    for i = 5, #o do redis.call('ZREM', k_offers(o[i]), worker) end
  end
end

local function to_inbox(worker, item, ttl_ms)
  local inbox = k_inbox(worker)
  redis.call('RPUSH', inbox, item)
  redis.call('PEXPIRE', inbox, math.max(ttl_ms, INBOX_TTL_MS))
end

-- The oldest live offer on `queue`, taken (no other work goes to it): worker id and offer; nil
-- when there is none. Offers past their time are dropped on the way.
local function take_offer(queue, now)
  local key = k_offers(queue)
  while true do
    local top = redis.call('ZRANGE', key, 0, 0)
    if #top == 0 then return nil end
    local worker = top[1]
    local raw = redis.call('HGET', P .. ':o', worker)
    local o = raw and cmsgpack.unpack(raw)
    drop_offer(worker, o)
    redis.call('ZREM', key, worker)
    if o and o[1] > now then return worker, o end
  end
end

-- where a live job sits ----------------------------------------------------------------------
-- `queue` gained claimable work: publish (for waiters on the channel) and wake every worker
-- with an offer on it (each claims again, and offers again if it finds nothing).
local woken = {}
local function wake(queue)
  if woken[queue] then return end
  woken[queue] = true
  redis.call('PUBLISH', P .. ':w:' .. esc(queue), '1')
  local key = k_offers(queue)
  local workers = redis.call('ZRANGE', key, 0, -1)
  for _, worker in ipairs(workers) do
    local raw = redis.call('HGET', P .. ':o', worker)
    if raw then
      drop_offer(worker, cmsgpack.unpack(raw))
      to_inbox(worker, '', INBOX_TTL_MS)
    end
  end
  if #workers > 0 then redis.call('DEL', key) end
end

-- Take a (non-fresh) live job out of the structure its state keeps it in. (Its P:x entry, if
-- any, stays: a waiting job keeps it until it starts running or finishes.)
local function detach(id, r)
  local st = r.st
  if st == 'running' then zrem(P .. ':lease', id)
  elseif st == 'scheduled' or st == 'retrying' then zrem(P .. ':due', id)
  elseif st == 'queued' then redis.call('ZREM', k_again(r.q, prio_text(r.p)), id) end
end

-- Put a live job where its new state keeps it.
local function attach(id, r)
  local st = r.st
  if st ~= 'running' and type(r.x) == 'number' then zadd(P .. ':x', num(r.x), id) end
  if st == 'running' then zadd(P .. ':lease', num(r.lu), id)
  elseif st == 'scheduled' or st == 'retrying' then zadd(P .. ':due', num(r.du), id)
  elseif st == 'queued' then
    local prio = prio_text(r.p)
    zadd(k_again(r.q, prio), r.sq, id)
    zadd(k_slots(r.q), -r.p, prio)
    wake(r.q)
  end
end

-- Move a job from state `old` to r.st in the indexes and counts; `fresh` when it was in a P:l
-- list. Every state change passes here, so this is where the per-tag running count moves.
local function reindex(id, r, old, fresh)
  if fresh then
    zadd(P .. ':n:' .. r.j, r.sq, id)
  else
    zrem(P .. ':s:' .. old, id)
  end
  zadd(P .. ':s:' .. r.st, r.sq, id)
  count(r, old, -1)
  count(r, r.st, 1)
  if r.st == 'running' and old ~= 'running' then running_tally(r, 1)
  elseif old == 'running' and r.st ~= 'running' then running_tally(r, -1) end
end

local waiters = nil  -- how many wait_finished calls are registered (read once per call)
local function notify(id)
  if waiters == nil then waiters = redis.call('ZCARD', P .. ':wait') end
  if waiters > 0 and redis.call('ZSCORE', P .. ':wait', id) then
    local key = P .. ':done:' .. id
    redis.call('RPUSH', key, '1')
    redis.call('PEXPIRE', key, 10000)
  end
end

-- A live job (already detached) ends in final state `st` at `now`; its outcome is counted per
-- tag and per minute (P:T, P:Tn, P:m:<minute>) with the counts.
local function finish(id, r, st, now, fresh)
  local old = r.st
  r.st = st
  r.fa = now
  r.lu = nil
  r.du = nil
  reindex(id, r, old, fresh)
  outcome_tally(r, st, now)
  if type(r.x) == 'number' then zrem(P .. ':x', id) end
  rpush(P .. ':f:' .. st, id)
  free_unique(id, r, 'finish')
  redis.call('HDEL', J, id)
  redis.call('SET', k_final(id), cmsgpack.pack(r), 'PX', TTL[st])
  notify(id)
end

-- A fresh job that ends where it stands (cancelled, expired) leaves a stale entry in its list;
-- popped here when it is the head, so that a list whose head is stale stays rare (enqueue wakes
-- workers only for a list that was empty).
local function unlist_fresh(id, r)
  local key = k_fresh(r.q, prio_text(r.p) .. ':' .. r.j)
  if redis.call('LINDEX', key, 0) == id then redis.call('LPOP', key) end
end

-- A running record still owned by the claim with attempt id `ai`.
local function owned(r, ai)
  return r ~= nil and r.st == 'running' and r.ai == ai
end

-- The live record of job `id` when the claim with attempt id `ai` still owns it; else nil and
-- the reply to give: 1 when this very call already recorded the outcome (a call repeated after
-- a lost reply), 0 when the lease was lost (nothing is written).
local function claimed_record(id, ai, call)
  local raw = redis.call('HGET', J, id)
  local r = raw and cmsgpack.unpack(raw)
  if r and not is_fresh(r) and owned(r, ai) then return r, nil end
  local done = not r and load(id)
  if done and done.ak == call and done.ai == ai then return nil, 1 end
  return nil, 0
end

-- A queued job (expanded, already out of its list or zset) starts running for `worker`, leased
-- until `lu`, with attempt id `ai`: true. One past its expiry ends cancelled ("expired"): false.
-- `handed`: claimed at enqueue for a worker's offer; it has not received it until it renews the
-- lease (until then a lost lease puts it back uncounted, see unrun).
local function start_job(id, r, fresh, now, lu, worker, ai, handed)
  if type(r.x) == 'number' and r.x <= now then
    r.rs = 'expired'
    finish(id, r, 'cancelled', now, fresh)
    return false
  end
  if type(r.x) == 'number' then redis.call('ZREM', P .. ':x', id) end
  r.st = 'running'
  r.a = (r.a or 0) + 1
  r.lu, r.w, r.ai, r.sa = lu, worker, ai, now
  r.cr, r.pg, r.pm, r.hd = nil, nil, nil, handed
  reindex(id, r, 'queued', fresh)
  attach(id, r)
  save_live(id, r)
  free_unique(id, r, 'start')
  sample(r.j, 'w', now - (r.qa or now))
  wait_tally(r, now - (r.qa or now))
  return true
end

-- A running job that never ran (handed back by its worker, or handed over and never received)
-- is queued again, its attempt uncounted; one someone asked to cancel ends cancelled instead.
-- (Out of P:lease already.)
local function unrun(id, r, now)
  if r.cr then
    r.rs = r.rs or 'cancelled'
    finish(id, r, 'cancelled', now, false)
  else
    r.st, r.a, r.qa = 'queued', math.max((r.a or 1) - 1, 0), now
    r.lu, r.w, r.ai, r.hd = nil, nil, nil, nil
    reindex(id, r, 'running', false)
    attach(id, r)
    save_live(id, r)
  end
end

-- Pop up to `limit` jobs from the head of P:f:<st> that finished before `cutoff` and forget
-- them. Stops at the first that finished later: the list is in finishing order (workers' clocks
-- may disagree a little, which delays a few by as much). Returns how many were forgotten.
local forget
local function forget_finished(st, cutoff, limit)
  local key, n = P .. ':f:' .. st, 0
  while n < limit do
    local id = redis.call('LINDEX', key, 0)
    if not id then break end
    local raw = redis.call('GET', k_final(id))
    local r = raw and cmsgpack.unpack(raw)
    if r and r.st == st then
      if not (r.fa < cutoff) then break end
      forget(id, r)
      n = n + 1
    end
    redis.call('LPOP', key)  -- forgotten now, or gone already (deleted, retried, expired)
  end
  return n
end

-- Forget a finished job and every index entry that names it (its P:f entry is popped by the
-- caller, or left for the sweep to drop when it reaches the head).
forget = function(id, r)
  redis.call('DEL', k_final(id))
  zrem(P .. ':s:' .. r.st, id)
  zrem(P .. ':n:' .. r.j, id)
  if type(r.tg) == 'table' then
    for _, tag in ipairs(r.tg) do zrem(P .. ':t:' .. tag, id) end
  end
end
