-- prelude.lua: shared helpers, prepended to every session script.
--
-- A user's sessions live in ONE hash (key `<prefix>u{<user tag>}`), so every
-- per-user operation is a single-slot atomic script (Redis Cluster ready):
--   field "!u"        -> the user id (guards against a tag collision)
--   field <22 chars>  -> a session record, MessagePack array:
--       {created_ms, last_seen_ms, auth_time_ms, expires_ms, device_id, metadata_json,
--        epoch, last_ip, last_user_agent}
--     elements 8 and 9 (strings, "" when unknown) are written only by the
--     touch (touch.lua) when it slides the record, so a record the touch
--     never slid has 7; every reader tolerates their absence.
-- Times come from Redis TIME on the node holding the hash (in a Cluster, each
-- node's own clock). `epoch` is the logout-all epoch the creating instance
-- knew (global.lua): logout-all is judged by it, never by comparing clocks.
--
-- Every script's last ARGV is a nonce, unique per call, and every reply
-- starts with it: the caller refuses a reply that does not echo its own
-- nonce (a stale, duplicated or crossed reply) instead of trusting order.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A record is alive while it is within its absolute lifetime, was seen within
-- the idle timeout, was created after the global cutoff (`revoke-before`, by
-- time) and carries the current logout-all epoch or a later one (a record
-- without one is from before epochs: dead).
local function alive(rec, now, idle, cutoff, epoch)
  return rec[4] > now and rec[2] + idle > now and rec[1] > cutoff
    and (rec[7] or 0) >= epoch
end

-- When the record stops being alive by time alone.
local function deadline(rec, idle)
  return math.min(rec[4], rec[2] + idle)
end

local function is_session_field(f)
  return string.byte(f, 1) ~= 33 -- '!'
end

-- Drops the hash when no session is left in it (only "!u" remains).
local function drop_if_empty(key)
  if redis.call('HLEN', key) <= 1 then
    redis.call('DEL', key)
  end
end
