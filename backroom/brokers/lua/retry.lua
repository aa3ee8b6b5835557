-- retry.lua: a dead, rejected or cancelled job -> queued again with its attempts reset.
-- KEYS[1] P:j. ARGV: now, job id. Moves P:d:<id> back into P:j; writes P:g:*, P:Q:*, P:s:*,
-- P:c; publishes P:w:<queue>. Returns 1, or 0 when the job is not in one of those states.
local now, id = tonumber(ARGV[1]), ARGV[2]
local raw = redis.call('GET', k_final(id))
if not raw then return 0 end
local r = cmsgpack.unpack(raw)
local old = r.st
if old ~= 'dead' and old ~= 'rejected' and old ~= 'cancelled' then return 0 end
redis.call('DEL', k_final(id))
r.st, r.a, r.qa = 'queued', 0, now
r.fa, r.rs, r.cr, r.du, r.ak = nil, nil, nil, nil, nil
reindex(id, r, old, false)
attach(id, r)
save_live(id, r)
flush()
return 1
