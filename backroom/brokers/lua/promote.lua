-- promote.lua: scheduled and retrying jobs whose due time has come -> queued. First, waiting
-- jobs whose expiry has passed (a paused queue, a late eta) end cancelled "expired", and unique
-- keys held for a time that has lapsed are forgotten, so neither lingers.
-- KEYS[1] P:j. ARGV: now, limit. Reads P:x, P:uu, P:due; writes P:j, P:d:*, P:g:*, P:Q:*,
-- P:s:*, P:n:*, P:f:*, P:u:*, P:c; publishes P:w:<queue>. queued_at becomes the due time
-- (wait time counts from then). Returns how many moved to their queue.
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])

for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. ':x', '-inf', ARGV[1], 'LIMIT', 0, limit)) do
  redis.call('ZREM', P .. ':x', id)
  local raw = redis.call('HGET', J, id)
  local r = raw and cmsgpack.unpack(raw)
  local fresh = r and is_fresh(r)
  if fresh then r = expand_by_json(r) end
  if r and r.st ~= 'running' then
    if fresh then unlist_fresh(id, r) else detach(id, r) end
    r.rs = 'expired'
    finish(id, r, 'cancelled', now, fresh)
  end
end

for _, key in ipairs(redis.call('ZRANGEBYSCORE', P .. ':uu', '-inf', '(' .. ARGV[1], 'LIMIT', 0, limit)) do
  redis.call('ZREM', P .. ':uu', key)
  local held = redis.call('GET', P .. ':u:' .. key)
  if held then
    local untils = tonumber(string.sub(held, string.find(held, '\0', 1, true) + 1))
    if untils and untils < now then redis.call('DEL', P .. ':u:' .. key) end
  end
end

local ids = redis.call('ZRANGEBYSCORE', P .. ':due', '-inf', ARGV[1], 'LIMIT', 0, limit)
local moved = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. ':due', id)
  local raw = redis.call('HGET', J, id)
  local r = raw and cmsgpack.unpack(raw)
  if r and not is_fresh(r) and (r.st == 'scheduled' or r.st == 'retrying') then
    local old = r.st
    r.st, r.qa, r.du = 'queued', r.du, nil
    reindex(id, r, old, false)
    attach(id, r)
    save_live(id, r)
    moved = moved + 1
  end
end
flush()
return moved
