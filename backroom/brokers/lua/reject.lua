-- reject.lua: a check failed in the worker: running -> rejected with the reason; never retried.
-- KEYS[1] P:j. ARGV: now, call id, job id, attempt id, reason, reason category.
-- Writes P:j -> P:d:<id>, P:lease, P:s:*, P:f:rejected, P:u:*, P:c, P:h ("x:<category>").
-- Returns 1, or 0 when the lease was lost (nothing written).
local now, call, id, ai = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local raw = redis.call('HGET', J, id)
local r = raw and cmsgpack.unpack(raw)
if not (r and not is_fresh(r) and owned(r, ai)) then
  local done = not r and load(id)
  if done and done.ak == call and done.ai == ai then return 1 end
  return 0
end
detach(id, r)
r.rs, r.ak = ARGV[5], call
finish(id, r, 'rejected', now, false)
event(r.j, 'x:' .. ARGV[6])
flush()
return 1
