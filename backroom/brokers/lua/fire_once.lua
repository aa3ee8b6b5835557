-- fire_once.lua: grant a schedule's tick to exactly one caller.
-- KEYS[1] P:j. ARGV: schedule name, tick. Writes P:fired. Returns 1 for the one caller.
local cur = redis.call('HGET', P .. ':fired', ARGV[1])
if cur and tonumber(ARGV[2]) <= tonumber(cur) then return 0 end
redis.call('HSET', P .. ':fired', ARGV[1], ARGV[2])
return 1
