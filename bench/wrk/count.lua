-- Stops after REQUESTS responses (env, default 1000) on this thread.
local limit = tonumber(os.getenv("REQUESTS") or "1000")
local seen = 0

function response(status, headers, body)
  seen = seen + 1
  if seen >= limit then
    wrk.thread:stop()
  end
end
