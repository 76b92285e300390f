-- revoke.lua: deletes sessions of one user; counts the live ones removed
-- (dead records are pruned on the way without being counted).
--
-- KEYS[1]  user hash
-- ARGV[1]  mode: "one"    - the session in field ARGV[2]
--                "except" - every session but field ARGV[2] ("" keeps none)
--                "device" - every session whose device id is ARGV[2]
--                "before" - every session created at or before ARGV[2] ms
-- ARGV[3]  idle timeout ms  ARGV[4] global cutoff ms  ARGV[5] nonce
-- Returns  {nonce, the number of live sessions removed}
local key, mode, arg = KEYS[1], ARGV[1], ARGV[2]
local idle, cutoff = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local removed = 0
local function drop(f, rec)
  if alive(rec, now, idle, cutoff) then
    removed = removed + 1
  end
  redis.call('HDEL', key, f)
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
          or (mode == 'before' and rec[1] <= tonumber(arg))
          or not alive(rec, now, idle, cutoff) then
        drop(f, rec)
      end
    end
  end
end
drop_if_empty(key)
return {ARGV[5], removed}
