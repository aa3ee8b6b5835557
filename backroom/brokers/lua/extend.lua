-- extend.lua: renew leases (the heartbeat).
-- KEYS[1] P:j. ARGV: lease_until, then (job id, attempt id) per claim. Writes P:j, P:lease.
-- Returns the ids still leased to these claims.
local lease_until = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local raw = redis.call('HGET', J, id)
  local r = raw and cmsgpack.unpack(raw)
  if r and not is_fresh(r) and owned(r, ARGV[i + 1]) then
    r.lu, r.hd = lease_until, nil  -- (handed over: now received)
    save_live(id, r)
    redis.call('ZADD', P .. ':lease', num(lease_until), id)
    out[#out + 1] = id
  end
end
return out
