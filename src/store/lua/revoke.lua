-- revoke.lua: deletes sessions of one user; counts the live ones removed
-- (dead records are pruned on the way without being counted).
--
-- KEYS[1]  user hash
-- ARGV[1]  mode: "one"    - the session in field ARGV[2]
--                "except" - every session but field ARGV[2] ("" keeps none)
--                "device" - every session whose device id is ARGV[2]
--                "dead"   - the logout-all purge: every session the given
--                           cutoff and epoch kill, counted when alive by time
-- ARGV[3]  idle timeout ms  ARGV[4] global cutoff ms  ARGV[5] logout-all epoch
-- ARGV[6]  nonce
-- KEYS[2]  event stream; last ARGV: event context (prelude.lua, `emit`)
-- Events: session.revoked per record removed: a live one with the
--          context's reason ("o") and actor; a dead one with its
--          dead_reason, actor "system".
-- Returns  {nonce, the number of live sessions removed}
local key, mode, arg = KEYS[1], ARGV[1], ARGV[2]
local idle, cutoff, epoch = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local removed = 0
local uid = redis.call('HGET', key, '!u') or ''
-- What counts as live when removed: for the purge, time alone, so it counts
-- the sessions the logout-all revoked.
local count_cutoff, count_epoch = cutoff, epoch
if mode == 'dead' then
  count_cutoff, count_epoch = -1, -1
end
-- The delete first: Redis out of memory refuses a script's first write
-- only, and a logout must still work then (its event and tombstone follow).
local function drop(f, rec)
  redis.call('HDEL', key, f)
  if alive(rec, now, idle, count_cutoff, count_epoch) then
    removed = removed + 1
    emit('session.revoked', ev().o, nil, uid, f, rec[5], rec[4])
  else
    emit('session.revoked', dead_reason(rec, now, idle, cutoff, epoch), 'system', uid, f, rec[5], rec[4])
  end
end
if mode == 'one' then
  local blob = redis.call('HGET', key, arg)
  if blob then
    drop(arg, cmsgpack.unpack(blob))
  end
else
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local f = all[i]
    if is_session_field(f) then
      local rec = cmsgpack.unpack(all[i + 1])
      if (mode == 'except' and f ~= arg)
          or (mode == 'device' and rec[5] == arg)
          or not alive(rec, now, idle, cutoff, epoch) then
        drop(f, rec)
      end
    end
  end
end
drop_if_empty(key)
return {ARGV[6], removed}
