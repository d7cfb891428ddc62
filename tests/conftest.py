"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tools import mock_cerebras
from tools.redis_server import RedisServer, redis_server_path

NO_REDIS = (
    "redis-server is not on PATH: these tests start their own (apt install redis-server, "
    "brew install redis, or see the README's 'Several proxies, one Redis')"
)


@pytest.fixture(scope="session")
def mock_cerebras_module() -> ModuleType:
    """The mock upstream (``tools/mock_cerebras.py``)."""
    return mock_cerebras


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free 127.0.0.1 port, nothing on disk (never the
    machine's Redis on 6379); `kill()` and `start()` again restart it on the same port.
    Skips the test when `redis-server` is not installed."""
    if redis_server_path() is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(tmp_path / "redis")
    with server:
        yield server


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for a whole run, for tests that keep apart by key prefix (cheaper
    than a server per test). Skips when `redis-server` is not installed."""
    if redis_server_path() is None:
        pytest.skip(NO_REDIS)
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
