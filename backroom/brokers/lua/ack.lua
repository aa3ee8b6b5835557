-- ack.lua: record successes: running -> succeeded with the result, for many claims in one step.
-- KEYS[1] P:j. ARGV: now, call id, msgpack array of [job id, attempt id, result JSON, started
-- at or false] (started at: when a job claimed ahead really started; its run time counts
-- from there).
-- Writes P:j -> P:d:<id> (PX ttl), P:lease, P:s:*, P:f:succeeded, P:u:*, P:c, P:h, P:done:<id>.
-- Returns 1 per outcome recorded, 0 where the lease was lost (nothing written). The call id
-- makes a call repeated after a lost reply report what the first one did.
local now, call = tonumber(ARGV[1]), ARGV[2]
local out = {}
for _, outcome in ipairs(cmsgpack.unpack(ARGV[3])) do
  local id, ai = outcome[1], outcome[2]
  local r, reply = claimed_record(id, ai, call)
  if r then
    detach(id, r)
    r.r, r.pg, r.rs, r.ak = outcome[3], 1.0, nil, call
    if outcome[4] then r.sa = outcome[4] end
    sample(r.j, 'r', now - (r.sa or now))
    run_tally(r, now - (r.sa or now), now)
    finish(id, r, 'succeeded', now, false)
    reply = 1
  end
  out[#out + 1] = reply
end
flush()
return out
