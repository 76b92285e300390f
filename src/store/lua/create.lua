-- create.lua: stores a new session for a user, atomically:
--   * prunes the user's dead records (expired, idle, before the cutoff or
--     of an older epoch),
--   * replaces the user's session on the same device,
--   * evicts least-recently-used sessions down to the cap,
--   * sets the hash expiry to the latest deadline of what remains.
--
-- KEYS[1]  user hash
-- ARGV[1]  session field  ARGV[2] user id  ARGV[3] device id
-- ARGV[4]  auth_time ms ("" = now)         ARGV[5] metadata JSON ("" = none)
-- ARGV[6]  idle timeout ms  ARGV[7] absolute lifetime ms
-- ARGV[8]  max sessions per user  ARGV[9] global cutoff ms
-- ARGV[10] logout-all epoch the caller knows (stamped into the record)
-- ARGV[11] nonce
-- KEYS[2]  event stream; last ARGV: event context (prelude.lua, `emit`)
-- Events: session.revoked for every record removed (dead: its dead_reason,
--          actor "system"; replaced_same_device; cap_evicted), then
--          session.created.
-- Returns  {nonce, created_ms, expires_ms, auth_time_ms, replaced, evicted}
--          (created_ms is after the cutoff even within its millisecond)
--          or an error reply when the user tag collides with another user.
local key = KEYS[1]
local now = now_ms()
local idle, cap, cutoff = tonumber(ARGV[6]), tonumber(ARGV[8]), tonumber(ARGV[9])
local epoch = tonumber(ARGV[10])
local owner = redis.call('HGET', key, '!u')
if owner and owner ~= ARGV[2] then
  return redis.error_reply('ERR sessiongate user tag collision')
end
-- Plan first, write the new record, then delete: if Redis refuses the
-- write (out of memory), nothing was deleted and the caller gets an error.
local live, doomed, replaced, evicted = {}, {}, 0, 0
local gone = {} -- events: {field, rec, reason, actor or nil}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local f = all[i]
  -- Our own field is already there only when this very create runs a second
  -- time (a Cluster client resending it after a dropped connection): it is
  -- written again below, never doomed as "the same device".
  if is_session_field(f) and f ~= ARGV[1] then
    local rec = cmsgpack.unpack(all[i + 1])
    if not alive(rec, now, idle, cutoff, epoch) then
      doomed[#doomed + 1] = f
      gone[#gone + 1] = {f, rec, dead_reason(rec, now, idle, cutoff, epoch), 'system'}
    elseif rec[5] == ARGV[3] then
      doomed[#doomed + 1] = f
      replaced = replaced + 1
      gone[#gone + 1] = {f, rec, 'replaced_same_device'}
    else
      live[#live + 1] = {f, rec[2], deadline(rec, idle), rec}
    end
  end
end
-- least recently used first
table.sort(live, function(a, b) return a[2] < b[2] end)
local first = 1
while #live - first + 1 >= cap do
  doomed[#doomed + 1] = live[first][1]
  gone[#gone + 1] = {live[first][1], live[first][4], 'cap_evicted'}
  first = first + 1
  evicted = evicted + 1
end
local auth = now
if ARGV[4] ~= '' then
  auth = math.min(tonumber(ARGV[4]), now)
end
local expires = now + tonumber(ARGV[7])
-- A session is revoked when created at or before the cutoff; one created in
-- the very millisecond of a logout-all must not be dead on arrival.
local created = math.max(now, cutoff + 1)
local rec = {created, created, auth, expires, ARGV[3], ARGV[5], epoch}
redis.call('HSET', key, '!u', ARGV[2], ARGV[1], cmsgpack.pack(rec))
for _, f in ipairs(doomed) do
  redis.call('HDEL', key, f)
end
local until_ms = deadline(rec, idle)
for i = first, #live do
  until_ms = math.max(until_ms, live[i][3])
end
redis.call('PEXPIREAT', key, until_ms)
for _, g in ipairs(gone) do
  emit('session.revoked', g[3], g[4], ARGV[2], g[1], g[2][5], g[2][4])
end
emit('session.created', '', nil, ARGV[2], ARGV[1], ARGV[3], expires)
return {ARGV[11], created, expires, auth, replaced, evicted}
