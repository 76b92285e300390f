-- read.lua: the global state as stored (see global.lua), changing nothing:
-- the state refresher's periodic read. It is the only caller of HMGET, so
-- each HMGET Redis counts is one of these reads (tests rely on that).
--
-- KEYS[1]  global hash
-- ARGV[1]  nonce
-- Returns  {nonce, cutoff_ms or nil, ring_json or nil, epoch or nil}
local v = redis.call('HMGET', KEYS[1], 'cutoff', 'ring', 'epoch')
return {ARGV[1], v[1], v[2], v[3]}
