-- wrk script for bench/http.py: POST pre-built bodies in rotation, count answers by status,
-- and print one machine-readable `WRK_JSON {...}` line at the end.
-- Arguments (after `--`): PATH BODY_DIR BODY_COUNT CONTENT_TYPE

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local path, body_dir, count, content_type = args[1], args[2], tonumber(args[3]), args[4]
  prepared = {}
  for i = 0, count - 1 do
    local file = assert(io.open(body_dir .. "/" .. i .. ".body", "rb"))
    local body = file:read("*a")
    file:close()
    prepared[#prepared + 1] = wrk.format("POST", path, { ["Content-Type"] = content_type }, body)
  end
  next_index = 0
  completed, accepted, refused, failed = 0, 0, 0, 0
end

function request()
  next_index = next_index % #prepared + 1
  return prepared[next_index]
end

function response(status, headers, body)
  if status == 200 then
    completed = completed + 1
  elseif status == 202 then
    accepted = accepted + 1
  elseif status == 429 or status == 503 then
    refused = refused + 1
  else
    failed = failed + 1
  end
end

function done(summary, latency, requests)
  local totals = { completed = 0, accepted = 0, refused = 0, failed = 0 }
  for _, thread in ipairs(threads) do
    for key, _ in pairs(totals) do
      totals[key] = totals[key] + thread:get(key)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "completed": %d, "accepted": %d, "refused": %d, '
      .. '"failed": %d, "socket_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, '
      .. '"p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, totals.completed, totals.accepted, totals.refused,
    totals.failed, e.connect + e.read + e.write, e.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max
  ))
end
