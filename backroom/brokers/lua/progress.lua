-- progress.lua: record a running job's progress (0..1) and message.
-- KEYS[1] P:j. ARGV: job id, attempt id, fraction, message ('' with ARGV[5] = '0': none).
-- Writes P:j. Returns 1, or 0 when the lease was lost.
local id = ARGV[1]
local raw = redis.call('HGET', J, id)
local r = raw and cmsgpack.unpack(raw)
if not (r and not is_fresh(r) and owned(r, ARGV[2])) then return 0 end
r.pg = tonumber(ARGV[3])
if ARGV[5] == '1' then r.pm = ARGV[4] else r.pm = nil end
save_live(id, r)
return 1
