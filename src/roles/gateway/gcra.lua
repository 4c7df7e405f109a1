-- GCRA over several policies at once, atomically, on Redis's own clock.
-- KEYS[i]: the policy's key for this caller; ARGV[2i-1]: emission interval T (µs);
-- ARGV[2i]: tolerance tau = T * (burst - 1) (µs). A request is allowed only if every policy
-- allows it, and only then are the new theoretical arrival times stored.
-- Returns, per policy: allowed (1/0), remaining, reset (µs until full), retry_after (µs).
-- With one key more than policies, that last key is read (GET) and its value (or nil) ends the
-- answer: the gateway's response-cache lookup shares the rate limit's round trip.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local new_tats = {}
local all_allowed = true
local policies = #ARGV / 2
for i = 1, policies do
  local T = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + T
  local allow_at = new_tat - tau - T
  if now < allow_at then
    all_allowed = false
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = tat - now
    out[#out + 1] = allow_at - now
  else
    new_tats[i] = new_tat
    out[#out + 1] = 1
    out[#out + 1] = math.floor((now - allow_at) / T)
    out[#out + 1] = new_tat - now
    out[#out + 1] = 0
  end
end
if all_allowed then
  for i = 1, policies do
    redis.call('SET', KEYS[i], new_tats[i], 'PX', math.ceil((new_tats[i] - now) / 1000) + 1)
  end
end
if #KEYS > policies then
  out[#out + 1] = redis.call('GET', KEYS[#KEYS])
end
return out
