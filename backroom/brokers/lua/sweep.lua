-- sweep.lua: running jobs whose lease ran out -> queued again (a recovery), or dead with
-- "LeaseExpired" when that attempt was their last, or cancelled when they were told to stop; one
-- handed over to a worker that never received it goes back uncounted (not a recovery).
-- Also forgets finished jobs older than the result ttl (their records carry a Redis TTL a
-- little longer, so what names them in the indexes is removed here first).
-- KEYS[1] P:j. ARGV: now, limit, cutoff for succeeded/cancelled, cutoff for dead/rejected,
-- cutoff for forgotten P:wait entries (wall clock).
-- Reads P:lease, P:f:*; writes P:j, P:d:*, P:g:*, P:Q:*, P:s:*, P:n:*, P:t:*, P:c, P:h, P:F.
-- Returns the ids recovered.
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
local ids = redis.call('ZRANGEBYSCORE', P .. ':lease', '-inf', '(' .. ARGV[1], 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. ':lease', id)
  local raw = redis.call('HGET', J, id)
  local r = raw and cmsgpack.unpack(raw)
  if r and r.hd and not is_fresh(r) and r.st == 'running' then
    unrun(id, r, now)  -- handed over at enqueue to a worker that never took it: it never ran
  elseif r and not is_fresh(r) and r.st == 'running' then
    event(r.j, 'recovery')
    if r.cr then  -- told to stop before its worker was lost: never run it again
      r.rs = r.rs or 'cancelled'
      finish(id, r, 'cancelled', now, false)
    elseif (r.a or 0) > (r.mr or DEFAULT_RETRIES) then
      r.er = {'LeaseExpired', string.format('the worker running attempt %d stopped heart-beating '
        .. '(killed or lost) and no retries were left', r.a or 0), ''}
      failure_group(r, id, r.er[1], r.er[2], true, now)
      finish(id, r, 'dead', now, false)
    else
      r.st, r.qa, r.lu, r.w, r.ai = 'queued', now, nil, nil, nil
      reindex(id, r, 'running', false)
      attach(id, r)
      save_live(id, r)
    end
    out[#out + 1] = id
  end
end
local cutoffs = {succeeded = ARGV[3], cancelled = ARGV[3], dead = ARGV[4], rejected = ARGV[4]}
for st, cutoff in pairs(cutoffs) do forget_finished(st, tonumber(cutoff), limit) end
redis.call('ZREMRANGEBYSCORE', P .. ':wait', '-inf', ARGV[5])
flush()
return out
