-- read.lua: the global state as stored (see global.lua), changing nothing,
-- and Redis's clock: the state refresher's periodic read. It is the only
-- caller of HMGET, so each HMGET Redis counts is one of these reads (tests
-- rely on that). The time is the clock verify judges records by (see
-- RedisClock in src/store/record.rs).
--
-- KEYS[1]  global hash
-- ARGV[1]  nonce
-- Returns  {nonce, cutoff_ms or nil, ring_json or nil, epoch or nil, now_ms}
local v = redis.call('HMGET', KEYS[1], 'cutoff', 'ring', 'epoch')
local t = redis.call('TIME')
return {ARGV[1], v[1], v[2], v[3], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
