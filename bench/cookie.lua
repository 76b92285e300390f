-- bench/cookie.lua — wrk script: GET with session cookies, rotating (the
-- cookie-session peer's twin of verify.lua; bench/yardstick uses it).
--
--   wrk -t1 -c64 -d10s --latency -s bench/cookie.lua http://127.0.0.1:PORT -- COOKIES_FILE [PATH]
--
-- COOKIES_FILE holds one `name=value` cookie per line (bench/yardstick
-- seeds 10 000 through the peer's POST /login). Every request is formatted
-- once, in init(), so the per-request cost in wrk is a table lookup.

local requests = {}
local n, i = 0, 0

function init(args)
  local path = args[1]
  if not path then
    error("usage: wrk ... -s cookie.lua URL -- COOKIES_FILE [REQUEST_PATH]")
  end
  local target = args[2] or "/"
  for cookie in io.lines(path) do
    if #cookie > 0 then
      n = n + 1
      requests[n] = wrk.format("GET", target, { ["Cookie"] = cookie })
    end
  end
  if n == 0 then
    error("no cookies in " .. path)
  end
  i = (math.random(n) - 1)
end

function request()
  i = i % n + 1
  return requests[i]
end
