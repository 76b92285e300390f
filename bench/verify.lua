-- bench/verify.lua — wrk script: GET /v1/verify with valid tokens, rotating.
--
--   wrk -t1 -c64 -d10s --latency -s bench/verify.lua http://127.0.0.1:PORT -- TOKENS_FILE
--
-- TOKENS_FILE holds one token per line (bench/run writes 10 000 of the
-- seeded tokens there). Every request is formatted once, in init(), so the
-- per-request cost in wrk is a table lookup, as for a static request.

local requests = {}
local n, i = 0, 0

function init(args)
  local path = args[1]
  if not path then
    error("usage: wrk ... -s verify.lua URL -- TOKENS_FILE [REQUEST_PATH]")
  end
  -- The path to request: /v1/verify by default; bench/gateway asks an app
  -- path through the gateway instead.
  local target = args[2] or "/v1/verify"
  for token in io.lines(path) do
    if #token > 0 then
      n = n + 1
      requests[n] = wrk.format("GET", target, { ["Authorization"] = "Bearer " .. token })
    end
  end
  if n == 0 then
    error("no tokens in " .. path)
  end
  -- Threads (if more than one) start at different places in the rotation.
  i = (math.random(n) - 1)
end

function request()
  i = i % n + 1
  return requests[i]
end
