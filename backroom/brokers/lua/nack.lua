-- nack.lua: record a failed attempt: running -> retrying until ARGV retry_at, or dead.
-- KEYS[1] P:j. ARGV: now, call id, job id, attempt id, retry_at ('' = dead), error type,
-- message, traceback, the message cut for its failure group (P:F). A running job someone
-- asked to cancel ends cancelled instead of retrying.
-- Writes P:j (P:d:<id> when final), P:lease, P:due, P:s:*, P:f:*, P:u:*, P:c, P:h, P:T,
-- P:Tn, P:m:<minute>, P:F.
-- Returns 1, or 0 when the lease was lost (nothing written).
local now, call, id, ai = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local retry_at = tonumber(ARGV[5])
local r, reply = claimed_record(id, ai, call)
if not r then return reply end
detach(id, r)
r.er, r.ak = {ARGV[6], ARGV[7], ARGV[8]}, call
sample(r.j, 'r', now - (r.sa or now))
run_tally(r, now - (r.sa or now), now)
if retry_at == nil then
  finish(id, r, 'dead', now, false)
elseif r.cr then  -- told to stop: a retry would run it again
  r.rs = r.rs or 'cancelled'
  finish(id, r, 'cancelled', now, false)
else
  r.st, r.lu, r.du, r.w = 'retrying', nil, retry_at, nil
  reindex(id, r, 'running', false)
  attach(id, r)
  save_live(id, r)
  event(r.j, 'retry')
  outcome_tally(r, 'retry', now)
end
failure_group(r, id, ARGV[6], ARGV[9], retry_at == nil, now)
flush()
return 1
