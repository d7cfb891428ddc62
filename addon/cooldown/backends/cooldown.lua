-- Cooldown's shared limiter: one atomic call applies a batch of operations to one model's
-- limits (every key below carries the model's hash tag, so a Redis Cluster keeps them on one
-- node). The logic mirrors MemoryLimiter in limiter.py: token buckets with amounts in flight
-- held aside, upstream's view re-synced from its x-ratelimit-* reports, pacing, and, beyond
-- it, the heads of every proxy's queue (the oldest waiting request goes first, whichever
-- proxy holds it) and leases on reservations (a proxy that dies leaks nothing for long).
--
-- KEYS[1] state hash   <slot>:<field>      buckets, paces and views, per (unit, period) slot
-- KEYS[2] reservations id -> JSON record
-- KEYS[3] leases       zset id -> when the reservation is dropped if nobody settled it
-- KEYS[4] heads        zset proxy -> rank of the request at the head of its queue
-- KEYS[5] head amounts hash proxy -> JSON {x = expiry, a = {slot = amount}}
--
-- ARGV[1] now in seconds ("" = Redis's TIME: the one clock every proxy shares; tests pass
--         their own), ARGV[2] the calling proxy's id, ARGV[3] lease seconds, then operations:
--         a code, the number of its arguments, its arguments. Confirms, settles, releases,
--         reports and withdrawals take their age first: a proxy may send them with its next
--         call, and they apply at the moment they happened. Results come back flat, in order, as strings (Lua
--         numbers would be truncated to integers).

local EPSILON = 1e-6
local REFUND_CREDIT_DELAY = 0.25
local REFUND_TRUST = 0.9
local STALE_RECHECK_SECONDS = 1.0
local HEAD_TTL = 1.0          -- a published head not refreshed for this long is ignored
local HEAD_RECHECK = 0.1      -- a proxy yielding to another's head looks again this often
local CLASS_SECONDS = 86400.0 -- one priority class outranks any wait within a day

local now
if ARGV[1] ~= "" then
  now = tonumber(ARGV[1])
else
  local t = redis.call("TIME")
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local me = ARGV[2]
local lease = tonumber(ARGV[3])

-- The state hash, read once and written back once (only the fields that changed).
local state, dirty = {}, {}
do
  local flat = redis.call("HGETALL", KEYS[1])
  for i = 1, #flat, 2 do state[flat[i]] = tonumber(flat[i + 1]) end
end
local function get(slot, field, default)
  local v = state[slot .. ":" .. field]
  if v == nil then return default end
  return v
end
local function set(slot, field, value)
  state[slot .. ":" .. field] = value
  dirty[slot .. ":" .. field] = true
end
local function fmt(x) return string.format("%.17g", x) end
local out = {}
local function emit(x)
  if type(x) == "number" then out[#out + 1] = fmt(x) else out[#out + 1] = x end
end

-- Token bucket, kept as what is used; `f` is the amount in flight (released, unconfirmed).
local function drain(s, limit, period)
  local used, at = get(s, "u", 0), get(s, "t", now)
  if now > at then
    used = math.max(0, used - limit / period * (now - at))
  end
  set(s, "u", used)
  set(s, "t", math.max(now, at))
  return used
end
local function bucket_wait(s, amount, limit, period)
  local excess = drain(s, limit, period) + get(s, "f", 0) + amount - limit
  if excess <= EPSILON then return 0 end
  return excess * period / limit
end
-- `A` is everything the bucket ever counted; a reservation's mark is `A` once it was counted.
-- Less than counted comes back as TokenBucket.correct says: `refunded` (what upstream gave
-- back) at once, the rest (never counted upstream) only as far as it is still in the bucket.
local function bucket_correct(s, old, new, limit, period, mark, refunded)
  local used = drain(s, limit, period)
  if new >= old then
    set(s, "u", used + new - old)
    set(s, "A", get(s, "A", 0) + new - old)
    return
  end
  local back = old - new
  local given = 0
  if refunded ~= nil then given = math.min(math.max(refunded, 0), back) end
  local still_in = 0
  if mark ~= nil then
    still_in = math.min(back - given, math.max(0, used - (get(s, "A", 0) - mark)))
  end
  set(s, "u", math.max(0, used - still_in - given))
end

-- Upstream's view of the slot (present once a report named it): level at `va`, refilling at
-- `vr`; our amounts in flight are the bucket's `f`, held aside as in the bucket. Unused
-- reservations settled since are credited REFUND_CREDIT_DELAY to 2x that after the settle
-- (two batches by time: `b1`/`n1` the older, `b2`/`n2` the newer), at the share of refunds
-- upstream has been seen to make.
local function has_view(s) return get(s, "vL", nil) ~= nil end
local function view_level(s)
  local level, at = get(s, "vl", 0), get(s, "va", now)
  if now > at then
    level = math.min(get(s, "vL", 0), level + get(s, "vr", 0) * (now - at))
    set(s, "vl", level)
    set(s, "va", now)
  end
  return level
end
local function mature(s)
  local batch = math.floor(now / REFUND_CREDIT_DELAY)
  for _, b in ipairs({"1", "2"}) do
    local n = get(s, "n" .. b, 0)
    if n > 0 and get(s, "b" .. b, batch) <= batch - 2 then
      set(s, "vm", get(s, "vm", 0) + n)
      set(s, "n" .. b, 0)
    end
  end
end
local function view_refund(s, unused)
  mature(s)
  set(s, "vP", get(s, "vP", 0) + unused)
  local batch = math.floor(now / REFUND_CREDIT_DELAY)
  for _, b in ipairs({"1", "2"}) do
    if get(s, "n" .. b, 0) > 0 and get(s, "b" .. b, -1) == batch then
      set(s, "n" .. b, get(s, "n" .. b, 0) + unused)
      return
    end
  end
  local b = (get(s, "n1", 0) == 0) and "1" or "2"
  set(s, "b" .. b, batch)
  set(s, "n" .. b, unused)
end
local function credit(s)
  mature(s)
  local share = get(s, "vS", 0)
  if share >= REFUND_TRUST then return share * get(s, "vm", 0) end
  return 0
end
local function view_room(s)
  local left = math.min(get(s, "vL", 0), view_level(s) + credit(s))
  return left - get(s, "f", 0) - get(s, "vR", 0)
end
local function view_wait(s, amount)
  local excess = amount - view_room(s)
  if excess <= EPSILON then return 0 end
  local refill = get(s, "vr", 0)
  local wait = math.huge
  if refill > 0 then wait = excess / refill end
  if get(s, "vS", 0) > 0 then -- look again when the next batch of refunds is credited
    for _, b in ipairs({"1", "2"}) do
      if get(s, "n" .. b, 0) > 0 then
        local at = (get(s, "b" .. b, 0) + 2) * REFUND_CREDIT_DELAY
        wait = math.min(wait, math.max(at - now, 0))
      end
    end
  end
  -- A view holds nothing longer than one period past its report; then one request at a
  -- time goes, whose answer re-syncs it (see UpstreamView.wait_time).
  local stale_in = get(s, "vs", now) + get(s, "vp", 60) - now
  if stale_in > 0 then return math.min(wait, stale_in) end
  if get(s, "f", 0) <= 0 then return 0 end
  return math.min(wait, STALE_RECHECK_SECONDS)
end
local function view_charge(s, amount)
  set(s, "vl", view_level(s) - amount)
end

-- Pacing (burst < 1): a small bucket of `burst * limit`, refilled at limit / period.
local function pace_level(s, capacity, rate)
  local level, at = get(s, "pl", capacity), get(s, "pt", now)
  if now > at then
    level = math.min(capacity, level + rate * (now - at))
    set(s, "pl", level)
    set(s, "pt", now)
  end
  return level
end
local function pace_take(s, amount, capacity, rate)
  set(s, "pl", math.min(capacity, pace_level(s, capacity, rate) - amount))
  set(s, "pt", math.max(now, get(s, "pt", now)))
end

local function effective_limit(s, limit)
  local upstream = get(s, "vL", nil)
  if upstream ~= nil and upstream < limit then return upstream end
  return limit
end
local function used_of(s, limit, period)
  local local_used = drain(s, limit, period) + get(s, "f", 0)
  if has_view(s) then return math.max(local_used, limit - view_room(s)) end
  return local_used
end

-- A reservation's record: per part its slot, amount, limit, period, burst, the view epoch
-- it was released under and the slot's `vC` then (`k`); `c` once confirmed.
local function load(id)
  local raw = redis.call("HGET", KEYS[2], id)
  if not raw then return nil end
  return cjson.decode(raw)
end
local function drop(id)
  redis.call("HDEL", KEYS[2], id)
  redis.call("ZREM", KEYS[3], id)
end

-- Every amount of ours upstream has counted on a slot so far (`vC`, never reset): what a
-- report may have missed is told from it (see unseen).
local function count(s, amount)
  set(s, "vC", get(s, "vC", 0) + amount)
end

local function confirm(r)
  if r.c == 1 then return end
  for i, s in ipairs(r.s) do
    local amount, limit, period = r.a[i], r.l[i], r.p[i]
    count(s, amount)
    local used = drain(s, limit, period)
    set(s, "f", get(s, "f", 0) - amount)
    set(s, "u", used + amount)
    set(s, "A", get(s, "A", 0) + amount)
    if r.m == nil then r.m = {} end
    r.m[i] = get(s, "A", 0)
    if has_view(s) then
      view_charge(s, amount)
      -- in flight at the view's report, which may have counted it already
      if r.e[i] < get(s, "ve", 0) then set(s, "vT", get(s, "vT", 0) + amount) end
    end
  end
  r.c = 1
end

local function op_confirm(id)
  local r = load(id)
  if r == nil or r.c == 1 then return end
  confirm(r)
  redis.call("HSET", KEYS[2], id, cjson.encode(r))
end

local function pace_of(r, i)
  if r.b[i] >= 1 then return nil end
  return math.max(r.b[i] * r.l[i], 1), r.l[i] / r.p[i]
end

local function op_settle(id, actual, refund, total, total_refund)
  local r = load(id)
  if r == nil then return end
  confirm(r)
  for i, s in ipairs(r.s) do
    local unit = string.match(s, "^[^:]+")
    local used, given = nil, nil
    if unit == "tokens" then
      used, given = actual, refund
    elseif unit == "total_tokens" and total ~= nil then
      used, given = total, total_refund
    end
    if used ~= nil then
      local amount = r.a[i]
      bucket_correct(s, amount, used, r.l[i], r.p[i], r.m and r.m[i], given)
      if has_view(s) then
        if used > amount then
          view_charge(s, used - amount)
          count(s, used - amount)
        else
          local unused = amount - used
          if given ~= nil then unused = math.max(math.min(given, unused), 0) end
          view_refund(s, unused)
        end
      end
      local capacity, rate = pace_of(r, i)
      if capacity then pace_take(s, used - amount, capacity, rate) end
    end
  end
  drop(id)
end

local function release(id, r)
  for i, s in ipairs(r.s) do
    local amount = r.a[i]
    if r.c == 1 then
      bucket_correct(s, amount, 0, r.l[i], r.p[i], r.m and r.m[i], nil)
    else
      set(s, "f", get(s, "f", 0) - amount)
    end
    local capacity, rate = pace_of(r, i)
    if capacity then pace_take(s, -amount, capacity, rate) end
  end
  drop(id)
end

local function op_release(id)
  local r = load(id)
  if r ~= nil then release(id, r) end
end

-- Leases: a reservation nobody settled in time (its proxy died) leaves. In flight, it gives
-- its amounts back (upstream never answered it); confirmed, its charge stands.
local function expire_leases()
  local due = redis.call("ZRANGEBYSCORE", KEYS[3], "-inf", fmt(now), "LIMIT", 0, 50)
  for _, id in ipairs(due) do
    local r = load(id)
    if r ~= nil and r.c == 0 then release(id, r) else drop(id) end
  end
end

-- The best head another proxy published that is still fresh, or nil.
local function rival_head()
  local heads = redis.call("ZRANGE", KEYS[4], 0, 7, "WITHSCORES")
  for i = 1, #heads, 2 do
    local who = heads[i]
    if who ~= me then
      local info = redis.call("HGET", KEYS[5], who)
      local head = info and cjson.decode(info)
      if head and head.x > now then return tonumber(heads[i + 1]), head.a end
      redis.call("ZREM", KEYS[4], who)
      redis.call("HDEL", KEYS[5], who)
    end
  end
  return nil
end

local function op_acquire(args)
  local id, tokens, total = args[1], tonumber(args[2]), tonumber(args[3])
  local waited, class, n = tonumber(args[4]), tonumber(args[5]), tonumber(args[6])
  local plan, worst, binding = {}, 0, 0
  for i = 1, n do
    local base = 6 + (i - 1) * 5
    local s, unit = args[base + 1], args[base + 2]
    local limit = effective_limit(s, tonumber(args[base + 3]))
    local period, burst = tonumber(args[base + 4]), tonumber(args[base + 5])
    local amount
    if unit == "requests" then
      amount = 1
    elseif unit == "tokens" or total == nil then
      amount = math.min(tokens, limit)
    else
      amount = math.min(total, limit)
    end
    local wait = bucket_wait(s, amount, limit, period)
    if has_view(s) then wait = math.max(wait, view_wait(s, amount)) end
    if burst < 1 then
      local capacity, rate = math.max(burst * limit, 1), limit / period
      local level, need = pace_level(s, capacity, rate), math.min(amount, capacity)
      if level < need then wait = math.max(wait, (need - level) / rate) end
    end
    if wait > worst then worst, binding = wait, i end
    plan[i] = {s = s, amount = amount, limit = limit, period = period, burst = burst}
  end
  -- Some proxy drew an upstream 429: nobody sends until its pause is over.
  local paused = get("pause", "until", 0)
  if paused > now and paused - now > worst then worst, binding = paused - now, -2 end
  -- Another proxy's head that came first and would not fit beside this one goes first.
  local rank = now - waited - class * CLASS_SECONDS
  if binding == 0 then
    local rival_rank, rival = rival_head()
    if rival_rank ~= nil and rival_rank < rank then
      for _, p in ipairs(plan) do
        local theirs = rival[p.s] or 0
        if theirs > 0 then
          local wait = bucket_wait(p.s, p.amount + theirs, p.limit, p.period)
          if has_view(p.s) then wait = math.max(wait, view_wait(p.s, p.amount + theirs)) end
          if wait > 0 then -- no room for both: the earlier one goes first
            wait = math.min(wait, HEAD_RECHECK)
            if wait > worst then worst, binding = wait, -1 end
          end
        end
      end
    end
  end
  if binding ~= 0 then
    local amounts = {}
    for _, p in ipairs(plan) do amounts[p.s] = p.amount end
    redis.call("ZADD", KEYS[4], fmt(rank), me)
    local ttl = math.min(worst, HEAD_TTL) + HEAD_TTL
    redis.call("HSET", KEYS[5], me, cjson.encode({x = now + ttl, a = amounts}))
  else
    local r = {s = {}, a = {}, l = {}, p = {}, b = {}, e = {}, k = {}, c = 0}
    for i, p in ipairs(plan) do
      local s = p.s
      set(s, "f", get(s, "f", 0) + p.amount)
      if p.burst < 1 then
        pace_take(s, p.amount, math.max(p.burst * p.limit, 1), p.limit / p.period)
      end
      r.s[i], r.a[i], r.l[i], r.p[i], r.b[i] = s, p.amount, p.limit, p.period, p.burst
      r.e[i] = get(s, "ve", 0)
      r.k[i] = get(s, "vC", 0)
    end
    redis.call("HSET", KEYS[2], id, cjson.encode(r))
    redis.call("ZADD", KEYS[3], fmt(now + lease), id)
    redis.call("ZREM", KEYS[4], me)
    redis.call("HDEL", KEYS[5], me)
  end
  emit(binding == 0 and "1" or "0")
  emit(worst)
  emit(tostring(binding))
  for _, p in ipairs(plan) do
    emit(used_of(p.s, p.limit, p.period))
    emit(p.limit)
  end
end

-- Whether a report must re-base the view now (see UpstreamViews._is_news).
local function is_news(s, limit, left, interval)
  if not has_view(s) or get(s, "vL", 0) ~= limit or get(s, "f", 0) <= 0 then return true end
  if now - get(s, "vs", 0) >= interval then return true end
  return left < view_level(s) - get(s, "f", 0)
end

-- What of ours a report on slot `s` carried by the answer to reservation `r` may not count
-- (see UpstreamViews.unseen): what was counted since `r` was released, `r` aside. Nothing
-- without a reporter (`r` false: written just now); everything for a reporter no longer
-- held (nil: a 429's, released before its report is read) or without a mark on `s`.
local function unseen(s, r)
  if r == false then return 0 end
  if r == nil or r.k == nil then return math.huge end
  for i, slot in ipairs(r.s) do
    if slot == s then
      local own = 0
      if r.c == 1 then own = r.a[i] end
      return math.max(get(s, "vC", 0) - r.k[i] - own, 0)
    end
  end
  return math.huge
end

-- Re-base the views of one answer's reports. The caller passes what it estimates of others'
-- usage of each limit (rate, lump to keep back, refund share): that estimator lives in the
-- proxy (limiter.UpstreamDrift), fed with the gap each re-sync returns. A report that says
-- more than the view believed may have missed what was counted since its reservation was
-- released: beyond what the view may count twice (`vT`), that much is held back until the
-- next report, and all of it (the rest as `vM`) makes this report and the next unsure
-- (see UpstreamViews.resync).
local function op_observe(args)
  local margin, interval, n = tonumber(args[1]), tonumber(args[2]), tonumber(args[4])
  local reporter = false
  if args[3] ~= "" then reporter = load(args[3]) end
  local reports, news = {}, false
  for i = 1, n do
    local base = 4 + (i - 1) * 8
    local rep = {
      s = args[base + 1], limit = tonumber(args[base + 2]),
      remaining = tonumber(args[base + 3]), reset = tonumber(args[base + 4]),
      period = tonumber(args[base + 5]), others = tonumber(args[base + 6]),
      lump = tonumber(args[base + 7]), share = tonumber(args[base + 8]),
    }
    rep.left = math.min(math.max(rep.remaining, 0), rep.limit)
    -- A report older than the view (it waited, and another proxy's newer one came first)
    -- says nothing the view does not know better: applying it would put the view back.
    rep.stale = has_view(rep.s) and now < get(rep.s, "vs", 0)
    reports[i] = rep
    if not news and not rep.stale and is_news(rep.s, rep.limit, rep.left, interval) then
      news = true
    end
  end
  emit(news and "1" or "0")
  if not news then return end
  for _, rep in ipairs(reports) do
    local s, limit = rep.s, rep.limit
    local flying = get(s, "f", 0)
    local kept, missed = 0, 0
    if has_view(s) and get(s, "vL", 0) == limit then
      local surplus = rep.left - math.min(limit, view_level(s) + credit(s))
      local may_miss = unseen(s, reporter)
      missed = math.min(may_miss, math.max(surplus, 0))
      kept = math.min(may_miss, math.max(surplus - get(s, "vT", 0), 0))
    end
    if rep.stale then
      emit("0")
    elseif has_view(s) and get(s, "vL", 0) == limit then
      -- what upstream would have left had nobody else used it and had it refunded nothing
      local expected = math.min(limit, view_level(s) + get(s, "vo", 0) * (now - get(s, "vs", now)))
      emit("1")
      emit(rep.left - expected)
      emit(get(s, "vT", 0) + get(s, "vM", 0) + flying + missed)
      emit(now - get(s, "vs", now))
      emit(get(s, "vP", 0))
    else
      emit("0")
    end
    local refill = limit / rep.period
    local used = limit - rep.left
    if used > 0 and rep.reset > 0 and rep.reset < rep.period then
      refill = math.min(refill, used / rep.reset)
    end
    local others = math.min(rep.others, refill)
    local reserve = math.min(math.max(rep.lump, others, limit * margin), limit / 2)
    set(s, "vL", limit)
    set(s, "vl", rep.left - kept)
    set(s, "va", now)
    set(s, "vs", now)
    set(s, "vr", refill - others)
    set(s, "vo", others)
    set(s, "vR", reserve)
    set(s, "vS", rep.share)
    set(s, "vp", rep.period)
    set(s, "vP", 0)
    set(s, "vT", kept)
    set(s, "vM", missed - kept)
    set(s, "vm", 0)
    set(s, "n1", 0)
    set(s, "n2", 0)
    set(s, "ve", get(s, "ve", 0) + 1)
  end
end

-- Upstream refused a request on this limit (a 429 naming it): count it as used up now.
local function op_exhaust(s, limit, period)
  limit = effective_limit(s, limit)
  local used = drain(s, limit, period)
  set(s, "A", get(s, "A", 0) + math.max(0, limit - used))
  set(s, "u", math.max(used, limit))
end

-- What a proxy counted alone while the shared limits were out of reach, charged once.
local function op_charge(s, limit, period, amount)
  set(s, "u", drain(s, effective_limit(s, limit), period) + amount)
  set(s, "A", get(s, "A", 0) + amount)
end

local function op_query(args)
  for i = 1, tonumber(args[1]) do
    local base = 1 + (i - 1) * 3
    local s = args[base + 1]
    local limit = effective_limit(s, tonumber(args[base + 2]))
    emit(used_of(s, limit, tonumber(args[base + 3])))
    emit(limit)
    emit(get(s, "vL", 0))
  end
end

expire_leases()
local call_time = now
local i = 4
while i <= #ARGV do
  local code, count = ARGV[i], tonumber(ARGV[i + 1])
  local args = {}
  for j = 1, count do args[j] = ARGV[i + 1 + j] end
  i = i + 2 + count
  now = call_time
  if code == "C" or code == "S" or code == "R" or code == "O" or code == "W" then
    now = call_time - tonumber(table.remove(args, 1))
  end
  if code == "A" then
    op_acquire(args)
  elseif code == "C" then
    op_confirm(args[1])
  elseif code == "S" then
    op_settle(args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[4]), tonumber(args[5]))
  elseif code == "R" then
    op_release(args[1])
  elseif code == "O" then
    op_observe(args)
  elseif code == "X" then
    op_exhaust(args[1], tonumber(args[2]), tonumber(args[3]))
  elseif code == "K" then
    op_charge(args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[4]))
  elseif code == "Q" then
    op_query(args)
  elseif code == "P" then -- an upstream 429: every proxy pauses this model
    set("pause", "until", math.max(get("pause", "until", 0), now + tonumber(args[1])))
  elseif code == "L" then -- this proxy is alive and still waits for these answers
    for _, id in ipairs(args) do
      redis.call("ZADD", KEYS[3], "XX", fmt(now + lease), id)
    end
  elseif code == "W" then -- nothing of this model waits at this proxy any more
    redis.call("ZREM", KEYS[4], me)
    redis.call("HDEL", KEYS[5], me)
  else
    return redis.error_reply("cooldown: unknown operation " .. tostring(code))
  end
end

local changed = {}
for field in pairs(dirty) do
  changed[#changed + 1] = field
  changed[#changed + 1] = fmt(state[field])
end
if #changed > 0 then redis.call("HSET", KEYS[1], unpack(changed)) end
return out
