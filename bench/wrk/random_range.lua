-- Random 310,491-byte ranges (the size of the seed request) of one object.
-- Env: QUERY (signed query string), OBJECT_SIZE (bytes), RANGE_LEN (default 310491),
--      MODE ("path" for /range/a-b, "header" for / with a Range header).
local query = os.getenv("QUERY")
local size = tonumber(os.getenv("OBJECT_SIZE"))
local len = tonumber(os.getenv("RANGE_LEN") or "310491")
local mode = os.getenv("MODE") or "path"

function init(args)
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8)) or 0))
end

function request()
  local a = math.random(0, size - len)
  local b = a + len - 1
  if mode == "header" then
    return wrk.format("GET", "/?" .. query, { ["Range"] = "bytes=" .. a .. "-" .. b })
  end
  return wrk.format("GET", "/range/" .. a .. "-" .. b .. "?" .. query)
end

function done(summary, latency, requests)
  io.write(string.format("p50_us=%d p99_us=%d non2xx=%d\n",
    latency:percentile(50), latency:percentile(99), summary.errors.status))
end
