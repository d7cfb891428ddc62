-- A proxy says it is alive. KEYS[1]: zset proxy -> last heartbeat (Redis's clock); KEYS[2]:
-- this Redis's epoch, a token the first heartbeat after its data was lost writes (a restart,
-- nothing on disk). ARGV[1]: this proxy, ARGV[2]: seconds a proxy counts as alive, ARGV[3]:
-- "1" when it is leaving, ARGV[4]: a fresh token, written if there is none.
-- Returns {proxies alive, the epoch}: a proxy that sees the epoch change knows that every
-- bucket and view it shared was forgotten.
local t = redis.call("TIME")
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if ARGV[3] == "1" then
  redis.call("ZREM", KEYS[1], ARGV[1])
else
  redis.call("ZADD", KEYS[1], string.format("%.17g", now), ARGV[1])
end
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", string.format("%.17g", now - tonumber(ARGV[2])))
local epoch = redis.call("GET", KEYS[2])
if not epoch then
  epoch = ARGV[4]
  redis.call("SET", KEYS[2], epoch)
end
return {redis.call("ZCARD", KEYS[1]), epoch}
