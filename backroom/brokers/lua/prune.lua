-- prune.lua: forget jobs in the given final states that finished before a time.
-- KEYS[1] P:j. ARGV: finished_before, limit, states... Pops the heads of P:f:<state>; deletes
-- P:d:<id> and index entries. Returns how many records were deleted.
local before, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local deleted = 0
for i = 3, #ARGV do
  if deleted >= limit then break end
  deleted = deleted + forget_finished(ARGV[i], before, limit - deleted)
end
flush()
return deleted
