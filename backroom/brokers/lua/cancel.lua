-- cancel.lua: scheduled, queued or retrying -> cancelled at once; running -> marked so its
-- worker stops it (the reason is kept for when it ends).
-- KEYS[1] P:j. ARGV: now, job id, reason. Writes P:j (P:d:<id> when cancelled), P:due or
-- P:g:*, P:s:*, P:n:*, P:f:cancelled, P:u:*, P:c.
-- Returns 1 if it will not run or was told to stop; 0 if finished already or unknown.
local now, id, reason = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local raw = redis.call('HGET', J, id)
if not raw then return 0 end
local r = cmsgpack.unpack(raw)
local fresh = is_fresh(r)
if fresh then
  r = expand_by_json(r)
  if r == nil then return redis.error_reply('BADENVELOPE job ' .. id .. ' has a malformed envelope') end
end
if r.st == 'running' then
  r.cr, r.rs = 1, reason
  save_live(id, r)
  return 1
end
if fresh then unlist_fresh(id, r) else detach(id, r) end
r.rs = reason
finish(id, r, 'cancelled', now, fresh)
flush()
return 1
