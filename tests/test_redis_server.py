"""tools/redis_server.py: the throwaway Redis the shared-limits tests run against."""

from __future__ import annotations

from pathlib import Path

import redis

from tools.redis_server import RedisServer, ping


def test_answers_ping_on_its_own_loopback_port(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.port != 6379
    assert redis_server.ping()
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("bind")["bind"] == "127.0.0.1"
    finally:
        client.close()


def test_kill_then_start_again_on_the_same_port_empty(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    try:
        client.set("cooldown-test", "1")
        port, pid = redis_server.port, redis_server.pid
        assert redis_server.kill()
        assert not ping(port)
        assert not redis_server.kill()  # already gone
        redis_server.start()
        assert (redis_server.port, redis_server.starts) == (port, 2)
        assert redis_server.pid != pid
        assert client.get("cooldown-test") is None  # a fresh server: nothing was kept
    finally:
        client.close()


def test_stop_leaves_nothing_but_its_log(tmp_path: Path, redis_server: RedisServer) -> None:
    assert redis_server.stop() is None
    assert not redis_server.ping()
    assert redis_server.stop() is None  # twice is fine
    files = {p.name for p in redis_server.workdir.iterdir()}
    assert files == {redis_server.log_path.name}
