-- delete.lua: forget finished jobs (final states only) and their index entries.
-- KEYS[1] P:j. ARGV: job ids. Deletes P:d:<id>; writes P:s:*, P:n:*, P:t:* (the P:f:* entries
-- are dropped by the sweep when they reach the head).
-- Returns how many were deleted.
local deleted = 0
for i = 1, #ARGV do
  local raw = redis.call('GET', k_final(ARGV[i]))
  if raw then
    forget(ARGV[i], cmsgpack.unpack(raw))
    deleted = deleted + 1
  end
end
flush()
return deleted
