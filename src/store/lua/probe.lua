-- probe.lua: the readiness probe. Runs a script (as verify does) that issues
-- a write command (as create and logout do) without changing anything: DEL
-- of a key that never exists. Redis refuses it exactly when it refuses the
-- service's writes (read-only replica, MISCONF, NOREPLICAS, an ACL without
-- write or script rights), yet allows it when out of memory, when deletes
-- (logout) still work.
--
-- KEYS[1]  <prefix>readyz-probe (never set)
-- Returns  the number of keys deleted (always 0)
return redis.call('DEL', KEYS[1])
