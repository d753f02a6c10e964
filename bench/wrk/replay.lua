-- Replays a trace from bench/hitratio/trace.py once, in order, over wrk's connections
-- (run it with -t1: one Lua state holds the trace and its position).
-- Env:
--   TRACE  the trace file
--   FORM   "signed": GET /?<the title's signed query> (cdn-edge)
--          "plain":  GET /objects/<title>/v1 (nginx, Varnish)
--          both with Range: bytes=<first>-<last>
-- After the last trace request, connections ask for /replay-end, which every system
-- under test answers with a local 404, until the last trace answer is in; then the
-- thread stops and prints the line below.
-- Prints one line: REPLAY requests=N ok=N bad=N (ok: 206 answers; bad: anything else).
local trace = os.getenv("TRACE") or error("TRACE is not set")
local form = os.getenv("FORM") or "plain"
local reqs, n, sent, answered, ok, bad = {}, 0, 0, 0, 0, 0
local finish = nil
-- wrk calls request() once on the first thread's state to check what it returns, before
-- any connection sends: that call must not use up a trace request.
local checked = false

function init(args)
  local query = {}
  for line in io.lines(trace) do
    local kind, title, a, b = line:match("^(%u) (%S+) (%S+) ?(%S*)$")
    if kind == "Q" then
      query[title] = a
    elseif kind == "R" then
      local path
      if form == "signed" then
        path = "/?" .. (query[title] or error("no signed query for " .. title))
      else
        path = "/objects/" .. title .. "/v1"
      end
      n = n + 1
      reqs[n] = wrk.format("GET", path, { ["Range"] = "bytes=" .. a .. "-" .. b })
    end
  end
  finish = wrk.format("GET", "/replay-end")
end

function request()
  if not checked then
    checked = true
    return reqs[1] or finish
  end
  if sent < n then
    sent = sent + 1
    return reqs[sent]
  end
  return finish
end

function response(status, headers, body)
  if status == 404 then return end
  answered = answered + 1
  if status == 206 then ok = ok + 1 else bad = bad + 1 end
  if answered == n then
    -- wrk's main thread sleeps out -d whatever the threads do: the caller waits for
    -- this line and then stops wrk with SIGINT.
    io.write(string.format("REPLAY requests=%d ok=%d bad=%d\n", n, ok, bad))
    io.flush()
    wrk.thread:stop()
  end
end
