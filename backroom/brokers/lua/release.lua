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
    if r.cr then
      r.rs = r.rs or 'cancelled'
      finish(id, r, 'cancelled', now, false)
    else
      r.st, r.a, r.qa = 'queued', math.max((r.a or 1) - 1, 0), now
      r.lu, r.w, r.ai = nil, nil, nil
      reindex(id, r, 'running', false)
      attach(id, r)
      save_live(id, r)
    end
  end
end
flush()
return released
