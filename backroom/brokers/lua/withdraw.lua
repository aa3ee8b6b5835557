-- withdraw.lua: a worker that stops takes back its offer and empties its inbox.
-- KEYS[1] P:j. ARGV[1] worker id. Writes P:o, P:o:*, P:i:<worker>.
-- Returns the inbox's entries (jobs claimed for this worker at enqueue, for it to hand back).
local worker = ARGV[1]
local raw = redis.call('HGET', P .. ':o', worker)
drop_offer(worker, raw and cmsgpack.unpack(raw))
local inbox = k_inbox(worker)
local entries = redis.call('LRANGE', inbox, 0, -1)
redis.call('DEL', inbox)
return entries
