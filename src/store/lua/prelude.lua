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

-- Lifecycle events (issue 10; see src/store/events.rs). A script that
-- changes sessions takes an event context as its LAST argument, after the
-- nonce (so every other argument keeps its position): JSON
-- (the stream is KEYS[2])
--   {"s": "1" ("" = events off), "a": actor, "m": stream max length,
--    "t": tombstone key base ("" = none), "r": tombstone retention ms,
--    "g": user tag, "o": the reason this call revokes for}
-- emit() appends one event to the stream inside the script making the
-- change: no change without its event, no event without its change.
local EV
local function ev()
  if EV == nil then
    EV = cjson.decode(ARGV[#ARGV])
  end
  return EV
end

-- Why a record found dead by time, cutoff or epoch ended.
local function dead_reason(rec, now, idle, cutoff, epoch)
  if rec[1] <= cutoff or (rec[7] or 0) < epoch then
    return 'logout_all'
  elseif rec[4] <= now then
    return 'lifetime_expired'
  end
  return 'idle_expired'
end

-- kind, reason ('' = none), actor (nil = the context's), user id, session
-- field ('' = none), device id, exp_ms (0 = none), extra: more field/value
-- pairs. A revocation also leaves a tombstone for `r` ms.
local function emit(kind, reason, actor, uid, field, device, exp_ms, extra)
  local c = ev()
  if c.s == '' then
    return
  end
  local sid = ''
  if field ~= '' then
    sid = c.g .. field
  end
  local exp = string.format('%d', math.floor(exp_ms / 1000))
  local args = {'XADD', KEYS[2], 'MAXLEN', '~', c.m, '*', 'v', '1', 'type', kind,
    'reason', reason, 'actor', actor or c.a, 'user_id', uid, 'session_id', sid,
    'device_id', device, 'exp', exp}
  for _, v in ipairs(extra or {}) do
    args[#args + 1] = v
  end
  local id = redis.call(unpack(args))
  if kind == 'session.revoked' and c.t ~= '' then
    -- The tombstone is a key the script did not declare (its name comes
    -- from records read here). In a Cluster slot being migrated away, this
    -- node refuses to create a key (it would have to live on the target),
    -- and the script has already written: the change and its event stand,
    -- and only this session's tombstone is not kept (pcall, never an abort
    -- half-way through).
    local tomb = c.t .. sid
    local ok = redis.pcall('HSET', tomb, 'ended_at', string.match(id, '^%d+'), 'reason', reason,
      'actor', actor or c.a, 'user_id', uid, 'device_id', device, 'exp', exp, 'event', id)
    if type(ok) ~= 'table' or not ok.err then
      redis.call('PEXPIRE', tomb, c.r)
    end
  end
end
