-- list.lua: the live sessions of one user (read-only).
--
-- KEYS[1]  user hash
-- ARGV[1]  idle timeout ms  ARGV[2] global cutoff ms  ARGV[3] logout-all epoch
-- ARGV[4]  nonce
-- Returns  the nonce, then a flat array, 9 entries per live session:
--          field, created_ms, last_seen_ms, auth_time_ms, expires_ms, device_id, metadata_json,
--          last_ip, last_user_agent ("" when the touch has not recorded them)
local key = KEYS[1]
local now = now_ms()
local idle, cutoff, epoch = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {ARGV[4]}
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local f = all[i]
  if is_session_field(f) then
    local rec = cmsgpack.unpack(all[i + 1])
    if alive(rec, now, idle, cutoff, epoch) then
      for _, v in ipairs({f, rec[1], rec[2], rec[3], rec[4], rec[5], rec[6], rec[8] or '', rec[9] or ''}) do
        out[#out + 1] = v
      end
    end
  end
end
return out
