-- Requests with distinct forged Ed25519 signatures: every request a new URL (its own t
-- and a random 86-character sc), as a forger probing the edge would send them.
-- Env: OBJECT (default "sample"), VERSION (default "1"), RANGE (default "0-16383").
local object = os.getenv("OBJECT") or "sample"
local version = os.getenv("VERSION") or "1"
local range = os.getenv("RANGE") or "0-16383"
local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
local expires = os.time() + 3600
local n = 0
local id = 0

function setup(thread)
  id = id + 1
  thread:set("id", id)
end

function init(args)
  math.randomseed(os.time() * 1000 + (id or 0))
end

function request()
  n = n + 1
  local sc = {}
  for i = 1, 84 do
    local k = math.random(1, 64)
    sc[i] = alphabet:sub(k, k)
  end
  -- The last byte of the signature is the top of its scalar S, which must be below the
  -- group order (top 4 bits zero) or the check stops early: character 85 is one of
  -- A-D. Character 86 carries 2 bits and 4 zero bits (A, Q, g or w), or the spelling
  -- is refused before any check. Every request then costs a full verification.
  local a = math.random(1, 4)
  sc[85] = alphabet:sub(a, a)
  local k = math.random(0, 3) * 16 + 1
  sc[86] = alphabet:sub(k, k)
  return wrk.format("GET", "/range/" .. range .. "?o=" .. object .. "&v=" .. version ..
    "&e=" .. expires .. "&t=f" .. (id or 0) .. "x" .. n .. "&sc=" .. table.concat(sc))
end

function done(summary, latency, requests)
  io.write(string.format("p50_us=%d p99_us=%d non2xx=%d\n",
    latency:percentile(50), latency:percentile(99), summary.errors.status))
end
