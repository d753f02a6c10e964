-- Load shapes for bench/compare.sh, the same for every system under test, over HTTP or
-- HTTPS (whichever URL wrk is given).
-- Env:
--   MODE         "path":   GET /range/a-b?QUERY          (cdn-edge's range route)
--                "header": GET TARGET with Range: bytes=a-b (any system)
--                "fixed":  GET the URL given to wrk, unchanged (dictionary lookups)
--   QUERY        signed query string (MODE=path)
--   TARGET       path and query to request (MODE=header), e.g. "/?o=..." or "/objects/o/v"
--   OBJECT_SIZE  object size in bytes (MODE=path|header)
--   RANGE_LEN    bytes per range (default 310491, the seed request)
--   SEED         random seed (default 42): every system gets the same sequence of ranges,
--                each start uniform in [0, OBJECT_SIZE - RANGE_LEN]
-- Prints one machine-readable line at the end:
--   RESULT requests=N duration_us=N bytes=N p50_us=N p99_us=N non2xx=N socket_errors=N
local mode = os.getenv("MODE") or "fixed"
local query = os.getenv("QUERY") or ""
local target = os.getenv("TARGET") or "/"
local size = tonumber(os.getenv("OBJECT_SIZE") or "0")
local len = tonumber(os.getenv("RANGE_LEN") or "310491")
local seed = tonumber(os.getenv("SEED") or "42")

function init(args)
  math.randomseed(seed)
end

if mode == "path" then
  function request()
    local a = math.random(0, size - len)
    return wrk.format("GET", "/range/" .. a .. "-" .. (a + len - 1) .. "?" .. query)
  end
elseif mode == "header" then
  function request()
    local a = math.random(0, size - len)
    return wrk.format("GET", target, { ["Range"] = "bytes=" .. a .. "-" .. (a + len - 1) })
  end
end
-- MODE=fixed defines no request(), so wrk sends its static request for the URL.

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d bytes=%d p50_us=%d p99_us=%d non2xx=%d socket_errors=%d\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
