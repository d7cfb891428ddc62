-- A proxy says it is alive; the answer is how many proxies were alive within `ARGV[2]`
-- seconds, by Redis's clock. KEYS[1]: zset proxy -> last heartbeat. ARGV[1]: this proxy,
-- ARGV[3]: "1" when it is leaving (it is removed at once).
local t = redis.call("TIME")
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if ARGV[3] == "1" then
  redis.call("ZREM", KEYS[1], ARGV[1])
else
  redis.call("ZADD", KEYS[1], string.format("%.17g", now), ARGV[1])
end
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", string.format("%.17g", now - tonumber(ARGV[2])))
return redis.call("ZCARD", KEYS[1])
