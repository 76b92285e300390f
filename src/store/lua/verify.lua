-- verify.lua: the hot path. Confirms one session in one round trip, and
-- slides its idle expiry at most once per touch interval (otherwise it is
-- read-only, so AOF `appendfsync always` costs verify nothing).
-- Never re-creates a record: it writes only after finding one, atomically.
--
-- KEYS[1]  user hash
-- ARGV[1]  session field   ARGV[2] user id      ARGV[3] device id
-- ARGV[4]  idle timeout ms ARGV[5] touch interval ms (-1: never touch)
-- ARGV[6]  global cutoff ms ARGV[7] "1" to return the full record
-- ARGV[8]  largest password age ms allowed (-1: not checked)
-- Returns  {0} when the session is not alive (gone, expired, revoked, or not
--          this user's / device's); else
--          {status, field, device_id, created_ms, auth_time_ms, now_ms
--           [, last_seen_ms, expires_ms, metadata_json]}
--          with status 1 (alive) or 2 (alive, but the password is older than
--          ARGV[8]: refused, so the idle expiry is not slid)
local key, field = KEYS[1], ARGV[1]
local blob = redis.call('HGET', key, field)
if not blob then
  return {0}
end
local now = now_ms()
local idle = tonumber(ARGV[4])
local rec = cmsgpack.unpack(blob)
if not alive(rec, now, idle, tonumber(ARGV[6])) then
  redis.call('HDEL', key, field)
  drop_if_empty(key)
  return {0}
end
if rec[5] ~= ARGV[3] or redis.call('HGET', key, '!u') ~= ARGV[2] then
  return {0}
end
local status = 1
local max_auth_age = tonumber(ARGV[8])
if max_auth_age >= 0 and now - rec[3] > max_auth_age then
  status = 2
end
local touch = tonumber(ARGV[5])
if status == 1 and touch >= 0 and now - rec[2] >= touch then
  -- Best effort: when Redis refuses writes (out of memory), the session is
  -- still confirmed; only its idle expiry is not slid this time.
  local touched = cmsgpack.pack({rec[1], now, rec[3], rec[4], rec[5], rec[6]})
  local ok = redis.pcall('HSET', key, field, touched)
  if type(ok) == 'number' then
    rec[2] = now
    local want = deadline(rec, idle)
    if redis.call('PTTL', key) < want - now then
      redis.pcall('PEXPIREAT', key, want)
    end
  end
end
if ARGV[7] == '1' then
  return {status, field, rec[5], rec[1], rec[3], now, rec[2], rec[4], rec[6]}
end
return {status, field, rec[5], rec[1], rec[3], now}
