-- touch.lua: the one write a verify may need, sent apart from its read.
-- Verify itself reads the record with a plain HGET and judges it
-- in-process (src/store/record.rs); only when that judgement says the
-- idle expiry is due to slide, or the record is dead, does it run this.
-- Everything is checked again here by Redis's own clock, atomically: it
-- writes only after finding the record alive, so it never re-creates a
-- deleted one (a logout that won the race stays a logout), and a touch
-- that is not due (another verify slid it first) writes nothing.
--
-- KEYS[1]  user hash
-- ARGV[1]  session field   ARGV[2] device id
-- ARGV[3]  idle timeout ms ARGV[4] touch interval ms (-1: never touch,
--          only delete the record if it is dead)
-- ARGV[5]  global cutoff ms  ARGV[6] logout-all epoch the caller knows
-- ARGV[7]  the client's address  ARGV[8] its user agent (both "": record
--          nothing): stored as the record's last_ip / last_user_agent
--          (elements 8 and 9, see prelude.lua) when the touch slides it
-- ARGV[9]  nonce
-- KEYS[2]  event stream; last ARGV: event context (prelude.lua, `emit`)
-- Events: session.revoked (idle_expired / lifetime_expired / logout_all,
--          actor "system") when a dead record is found and deleted.
-- Returns  {nonce, 0} when the record is gone or dead (a dead one is
--          deleted here); else {nonce, 1, last_seen_ms} (slid to now, or
--          as stored when not due, not this device's, or Redis refused the
--          write: best effort, the session is alive either way).
local key, field, nonce = KEYS[1], ARGV[1], ARGV[9]
local blob = redis.call('HGET', key, field)
if not blob then
  return {nonce, 0}
end
local now = now_ms()
local idle = tonumber(ARGV[3])
local rec = cmsgpack.unpack(blob)
local cutoff, epoch = tonumber(ARGV[5]), tonumber(ARGV[6])
if not alive(rec, now, idle, cutoff, epoch) then
  redis.call('HDEL', key, field)
  emit('session.revoked', dead_reason(rec, now, idle, cutoff, epoch), 'system',
    redis.call('HGET', key, '!u') or '', field, rec[5], rec[4])
  drop_if_empty(key)
  return {nonce, 0}
end
local touch = tonumber(ARGV[4])
local seen = rec[2]
if rec[5] ~= ARGV[2] or touch < 0 or now - seen < touch then
  return {nonce, 1, seen}
end
-- Packs the whole record back: elements a later schema appends are kept.
rec[2] = now
-- Where it was used from, recorded only here (once per touch interval).
-- rec[7] (the epoch) is always there: alive() refuses a record without
-- it, so setting 8 and 9 leaves no hole (cmsgpack would write a map).
if ARGV[7] ~= '' or ARGV[8] ~= '' then
  rec[8] = ARGV[7]
  rec[9] = ARGV[8]
end
local ok = redis.pcall('HSET', key, field, cmsgpack.pack(rec))
if type(ok) ~= 'number' then
  return {nonce, 1, seen}
end
local want = deadline(rec, idle)
if redis.call('PTTL', key) < want - now then
  redis.pcall('PEXPIREAT', key, want)
end
return {nonce, 1, now}
