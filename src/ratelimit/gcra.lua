-- GCRA for a batch of requests, each over several policies, atomically, on Redis's own clock.
-- ARGV[1]: the number of requests. Then, per request: the number of policies p, whether a cache
-- entry is read (1/0), whether it leases (1/0), and per policy the emission interval T, the
-- tolerance tau = T * (burst - 1) (µs) and the cells wanted n. KEYS hold, per request in the
-- same order, its p policy keys and, when it reads, the cache entry's key.
-- A request that does not lease wants one cell of each policy: it is allowed only if every one
-- of its policies allows it, and only then are its new theoretical arrival times (TATs) kept. A
-- request that leases (a gateway in `leased` mode, which then decides locally) takes from each
-- policy on its own as many cells as it may, up to n, and the TAT moves by as many intervals.
-- Requests are decided one after another, in order, each seeing the TATs the ones before it
-- left (a key may come up many times in a batch).
-- Every key is read with one MGET at the start and every changed TAT written once at the end, so
-- a batch costs Redis a few commands, not two per request.
-- Returns one array per request: per policy the cells granted (0 or 1 when not leasing),
-- remaining, reset (µs until full), retry_after (µs); then, when it reads, the entry's value (or
-- nil): the gateway's response-cache lookup shares the rate limit's round trip.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- MGET in chunks, so that unpack stays well inside Lua's stack whatever the batch.
local values = {}
local first = 1
while first <= #KEYS do
  local last = math.min(first + 999, #KEYS)
  local chunk = redis.call('MGET', unpack(KEYS, first, last))
  for j = 1, #chunk do values[first + j - 1] = chunk[j] end
  first = last + 1
end

-- The TAT of each key seen so far (false: none stored), and the keys changed, in order.
local tats = {}
local changed, is_changed = {}, {}
local function tat_of(index)
  local name = KEYS[index]
  local tat = tats[name]
  if tat == nil then
    tat = tonumber(values[index]) or false
    tats[name] = tat
  end
  return tat
end

local function mark(name, tat)
  if not is_changed[name] then
    is_changed[name] = true
    changed[#changed + 1] = name
  end
  tats[name] = tat
end

local answers = {}
local arg, key = 2, 1
for r = 1, tonumber(ARGV[1]) do
  local policies = tonumber(ARGV[arg])
  local reads = ARGV[arg + 1] == '1'
  local leases = ARGV[arg + 2] == '1'
  arg = arg + 3
  local out = {}
  local new_tats = {}
  local all_allowed = true
  for i = 1, policies do
    local T = tonumber(ARGV[arg])
    local tau = tonumber(ARGV[arg + 1])
    local n = tonumber(ARGV[arg + 2])
    arg = arg + 3
    local tat = tat_of(key + i - 1) or now
    if tat < now then tat = now end
    if leases then
      -- Cells available now: the k-th is allowed while tat + (k - 1) T - tau <= now.
      local available = 0
      if tat - tau <= now then available = math.floor((now + tau - tat) / T) + 1 end
      local granted = math.min(n, available)
      if granted > 0 then mark(KEYS[key + i - 1], tat + granted * T) end
      out[#out + 1] = granted
      out[#out + 1] = available - granted
      out[#out + 1] = tat + granted * T - now
      if granted > 0 then out[#out + 1] = 0 else out[#out + 1] = tat - tau - now end
    else
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
  end
  if all_allowed and not leases then
    for i = 1, policies do
      mark(KEYS[key + i - 1], new_tats[i])
    end
  end
  key = key + policies
  if reads then
    out[#out + 1] = values[key]
    key = key + 1
  end
  answers[r] = out
end

for _, name in ipairs(changed) do
  local tat = tats[name]
  redis.call('SET', name, tat, 'PX', math.ceil((tat - now) / 1000) + 1)
end
return answers
