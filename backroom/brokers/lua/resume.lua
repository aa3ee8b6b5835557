-- resume.lua: a paused queue serves again.
-- KEYS[1] P:j. ARGV[1] queue. Writes P:paused; wakes the queue's waiting workers (P:w:<queue>,
-- their offers and inboxes).
redis.call('SREM', P .. ':paused', ARGV[1])
wake(ARGV[1])
