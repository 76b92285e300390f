-- reauth.lua: the login backend re-checked the password: auth_time := now.
--
-- KEYS[1]  user hash
-- ARGV[1]  session field  ARGV[2] idle timeout ms  ARGV[3] global cutoff ms
-- ARGV[4]  logout-all epoch  ARGV[5] nonce
-- KEYS[2]  event stream; last ARGV: event context (prelude.lua, `emit`)
-- Events: session.reauthenticated when auth_time changed.
-- Returns  {nonce, 0} when the session is not alive, else {nonce, 1, auth_time_ms}
local key, field = KEYS[1], ARGV[1]
local blob = redis.call('HGET', key, field)
if not blob then
  return {ARGV[5], 0}
end
local now = now_ms()
local rec = cmsgpack.unpack(blob)
if not alive(rec, now, tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])) then
  return {ARGV[5], 0}
end
rec[3] = now
redis.call('HSET', key, field, cmsgpack.pack(rec))
emit('session.reauthenticated', '', nil, redis.call('HGET', key, '!u') or '', field, rec[5], rec[4])
return {ARGV[5], 1, now}
