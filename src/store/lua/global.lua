-- global.lua: the small global state every instance caches, one hash
-- (key `<prefix>global`, no TTL):
--   cutoff -> ms; sessions created at or before it are revoked (by time:
--             `revoke-before`; logout-all raises it too, for its reply)
--   epoch  -> the logout-all epoch: a session record carries the epoch its
--             creator knew and is dead once below this one. Only rises: each
--             logout-all sets it to max(epoch + 1, now ms), so it never
--             depends on a clock for order, and a state lost and initialised
--             again (to now) still lands above the epochs of old records.
--   ring   -> JSON {"active": kid, "keys": [{"kid": kid, "retire_at": ms or 0}]}
-- Key material never lives here: signing keys derive from the secret and kid.
-- Every change is published on the events channel so instances re-read it.
--
-- KEYS[1]  global hash
-- ARGV[1]  op: "init"   - create what is missing (ring with kid ARGV[2];
--                         cutoff = now, so lost state never means "no cutoff")
--               "rotate" - new active kid ARGV[2]; the old one retires at
--                         now + ARGV[3] ms; retired kids are dropped
--               "cutoff" - cutoff := max(cutoff, min(ARGV[2], now)), or now if ""
--                         (it never moves back, nor into the future); with
--                         "" (logout-all, `revoke-before now`) the epoch
--                         rises as well
-- ARGV[4]  events channel  ARGV[5] nonce
-- Returns  {nonce, cutoff_ms, ring_json, now_ms, epoch}
-- KEYS[2]  global event stream; last ARGV: event context (prelude.lua)
-- Events: sessions.logout_all (with "cutoff") when the cutoff or the epoch
--          rose; keys.rotated (with "kid") on a rotation.
local key, op, nonce = KEYS[1], ARGV[1], ARGV[5]
local now = now_ms()
local changed = false
local cutoff = tonumber(redis.call('HGET', key, 'cutoff') or '')
if not cutoff then
  cutoff = now
  redis.call('HSET', key, 'cutoff', cutoff)
  changed = true
end
local epoch = tonumber(redis.call('HGET', key, 'epoch') or '')
if not epoch then
  epoch = now
  redis.call('HSET', key, 'epoch', epoch)
  changed = true
end
local ring_json = redis.call('HGET', key, 'ring')
local ring
if ring_json then
  ring = cjson.decode(ring_json)
else
  ring = {active = ARGV[2], keys = {{kid = ARGV[2], retire_at = 0}}}
  changed = true
end
if op == 'rotate' and ring.active ~= ARGV[2] then
  local keep = {}
  for _, k in ipairs(ring.keys) do
    if k.kid == ring.active then
      k.retire_at = now + tonumber(ARGV[3])
    end
    if k.retire_at == 0 or k.retire_at > now then
      keep[#keep + 1] = k
    end
  end
  keep[#keep + 1] = {kid = ARGV[2], retire_at = 0}
  ring = {active = ARGV[2], keys = keep}
  changed = true
  emit('keys.rotated', '', nil, '', '', '', 0, {'kid', ARGV[2]})
elseif op == 'cutoff' then
  local wanted = now
  if ARGV[2] ~= '' then
    -- Never in the future: it would refuse every new login until then.
    wanted = math.min(tonumber(ARGV[2]), now)
  end
  if wanted > cutoff then
    cutoff = wanted
    redis.call('HSET', key, 'cutoff', cutoff)
    changed = true
  end
  if ARGV[2] == '' then
    epoch = math.max(epoch + 1, now)
    redis.call('HSET', key, 'epoch', epoch)
    changed = true
  end
  if changed then
    emit('sessions.logout_all', '', nil, '', '', '', 0, {'cutoff', string.format('%d', cutoff)})
  end
end
if changed then
  ring_json = cjson.encode(ring)
  redis.call('HSET', key, 'ring', ring_json)
  redis.call('PUBLISH', ARGV[4], op)
end
return {nonce, cutoff, ring_json, now, epoch}
