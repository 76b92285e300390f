-- verify.lua: the hot path. Confirms one session in one round trip, and
-- slides its idle expiry at most once per touch interval (otherwise it is
-- read-only, so AOF `appendfsync always` costs verify nothing).
-- Never re-creates a record: it writes only after finding one, atomically.
--
-- The key is derived from the token's user id, and create.lua refuses a
-- hash owned by another user id, so a record found here is that user's.
-- Kept lean: every redis.call and every reply element costs on each request.
--
-- KEYS[1]  user hash
-- ARGV[1]  session field   ARGV[2] device id
-- ARGV[3]  idle timeout ms ARGV[4] touch interval ms (-1: never touch)
-- ARGV[5]  global cutoff ms ARGV[6] "1" to return the full record
-- ARGV[7]  largest password age ms allowed (-1: not checked)
-- ARGV[8]  logout-all epoch the caller knows
-- ARGV[9]  nonce (echoed first, so the caller can match reply to request)
-- Returns  {nonce, 0} when the session is not alive (gone, expired, revoked,
--          or not this device's); else
--          {nonce, status
--           [, created_ms, auth_time_ms, last_seen_ms, expires_ms, metadata_json]}
--          with status 1 (alive) or 2 (alive, but the password is older than
--          ARGV[7]: refused, so the idle expiry is not slid).
local key, field, nonce = KEYS[1], ARGV[1], ARGV[9]
local blob = redis.call('HGET', key, field)
if not blob then
  return {nonce, 0}
end
local now = now_ms()
local idle = tonumber(ARGV[3])
local rec = cmsgpack.unpack(blob)
if not alive(rec, now, idle, tonumber(ARGV[5]), tonumber(ARGV[8])) then
  redis.call('HDEL', key, field)
  drop_if_empty(key)
  return {nonce, 0}
end
if rec[5] ~= ARGV[2] then
  return {nonce, 0}
end
local status = 1
local max_auth_age = tonumber(ARGV[7])
if max_auth_age >= 0 and now - rec[3] > max_auth_age then
  status = 2
end
local touch = tonumber(ARGV[4])
if status == 1 and touch >= 0 and now - rec[2] >= touch then
  -- Best effort: when Redis refuses writes (out of memory), the session is
  -- still confirmed; only its idle expiry is not slid this time.
  local touched = cmsgpack.pack({rec[1], now, rec[3], rec[4], rec[5], rec[6], rec[7]})
  local ok = redis.pcall('HSET', key, field, touched)
  if type(ok) == 'number' then
    rec[2] = now
    local want = deadline(rec, idle)
    if redis.call('PTTL', key) < want - now then
      redis.pcall('PEXPIREAT', key, want)
    end
  end
end
if ARGV[6] == '1' then
  return {nonce, status, rec[1], rec[3], rec[2], rec[4], rec[6]}
end
return {nonce, status}
