-- release.lua: hand running jobs back (graceful shutdown): queued again at once, the attempt
-- not counted; one someone asked to cancel ends cancelled instead.
-- KEYS[1] P:j. ARGV: now, then (job id, attempt id) per claim. Writes P:j, P:lease, P:g:*,
-- P:Q:*, P:s:*, P:c (P:d:<id>, P:f:cancelled when cancelled); publishes P:w:<queue>.
-- Returns how many were still ours.
local now = tonumber(ARGV[1])
local released = 0
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  local raw = redis.call('HGET', J, id)
  local r = raw and cmsgpack.unpack(raw)
  if r and not is_fresh(r) and owned(r, ARGV[i + 1]) then
    released = released + 1
    detach(id, r)
    unrun(id, r, now)
  end
end
flush()
return released
