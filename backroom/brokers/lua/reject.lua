-- reject.lua: a check failed in the worker: running -> rejected with the reason; never retried.
-- KEYS[1] P:j. ARGV: now, call id, job id, attempt id, reason, reason category.
-- Writes P:j -> P:d:<id>, P:lease, P:s:*, P:f:rejected, P:u:*, P:c, P:h ("x:<category>").
-- Returns 1, or 0 when the lease was lost (nothing written).
local now, call, id, ai = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local r, reply = claimed_record(id, ai, call)
if not r then return reply end
detach(id, r)
r.rs, r.ak = ARGV[5], call
finish(id, r, 'rejected', now, false)
event(r.j, 'x:' .. ARGV[6])
flush()
return 1
