-- POST a 10,000-byte playback event with a unique reqId per request.
-- Env: ROUTE ("event" or "logblob").
local route = os.getenv("ROUTE") or "event"
local body = string.rep("e", 10000)
local n = 0
local prefix = tostring(math.random(1, 1000000000))

function request()
  n = n + 1
  local path
  if route == "logblob" then
    path = "/log/cadmium/logblob/1?reqId=" .. prefix .. "-" .. n
  else
    path = "/msl/playapi/cadmium/event/1?reqAttempt=1&reqName=events/pause&reqId=" .. prefix .. "-" .. n
  end
  return wrk.format("POST", path, { ["Content-Type"] = "application/json" }, body)
end

function done(summary, latency, requests)
  io.write(string.format("p50_us=%d p99_us=%d non2xx=%d\n",
    latency:percentile(50), latency:percentile(99), summary.errors.status))
end
