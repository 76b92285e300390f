-- epoch.lua: the current logout-all epoch (see global.lua), changing
-- nothing: a create's confirmation that the epoch it stamped is current.
--
-- KEYS[1]  global hash
-- ARGV[1]  nonce
-- Returns  {nonce, epoch or nil}
return {ARGV[1], redis.call('HGET', KEYS[1], 'epoch')}
