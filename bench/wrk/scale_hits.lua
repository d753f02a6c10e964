-- Range hits spread over every cached slice of many objects (bench/scale-hits.sh).
-- Env: QUERIES (file, one signed query per object), SLICES (per object),
--      SLICE_BYTES, RANGE_LEN (bytes of each request, within one slice).
local slices = tonumber(os.getenv("SLICES"))
local slice_bytes = tonumber(os.getenv("SLICE_BYTES"))
local len = tonumber(os.getenv("RANGE_LEN") or os.getenv("SLICE_BYTES"))
local queries = {}

function init(args)
  for line in io.lines(os.getenv("QUERIES")) do
    queries[#queries + 1] = line
  end
  math.randomseed(os.time() + (tonumber(tostring({}):sub(8)) or 0))
end

function request()
  local q = queries[math.random(1, #queries)]
  local a = math.random(0, slices - 1) * slice_bytes + math.random(0, slice_bytes - len)
  return wrk.format("GET", "/range/" .. a .. "-" .. (a + len - 1) .. "?" .. q)
end

function done(summary, latency, requests)
  io.write(string.format("requests=%d p50_us=%d p99_us=%d non2xx=%d\n", summary.requests,
    latency:percentile(50), latency:percentile(99), summary.errors.status))
end
