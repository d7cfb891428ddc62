"""This proxy among the others sharing one Redis: its heartbeat, and Redis coming back.

The heartbeat (`heartbeat.lua`, once a second) says the proxy is alive and learns how many are
(the N of `on_error: local`) and Redis's epoch: a token the first heartbeat after Redis lost
its data writes, so a proxy notices a Redis that restarted empty even between two calls. While
Redis is away, a thread asks it once a second (PING, short timeouts), off the event loop.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from importlib import resources

import redis

from .redis import SharedStateError

HEARTBEAT = resources.files(__package__).joinpath("heartbeat.lua").read_text(encoding="utf-8")
# A proxy that has not said it is alive for this long no longer counts among the N.
ALIVE_SECONDS = 5.0
RETRY_SECONDS = 1.0  # how often a proxy without Redis asks it again
# Redis on the proxy's path must answer fast or not at all: a decision waits for it.
SOCKET_TIMEOUT = 0.25


def instance_id() -> str:
    """This proxy among the others: host, process and a random part (a restart is new)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
    )


class Presence:
    def __init__(self, client: redis.Redis, url: str, prefix: str, instance: str) -> None:
        self._client = client
        self._url = url
        self._tag = f"{prefix}{{proxies}}"  # one hash tag: one Cluster slot
        self.instance = instance
        self.instances = 1  # proxies alive, this one included, as the last heartbeat said
        self._epoch: str | None = None  # Redis's, as the last heartbeat said
        # EVALSHA, and the script loaded again after NOSCRIPT (Redis restarted)
        self._heartbeat = client.register_script(HEARTBEAT)
        self.answering = threading.Event()  # set by the watcher once Redis answers again
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    def beat(self, leaving: bool = False) -> bool:
        """Say this proxy is alive (or leaving); True when Redis has lost its data since the
        last heartbeat (its epoch changed: restarted with nothing on disk)."""
        keys = [f"{self._tag}:alive", f"{self._tag}:epoch"]
        args = (self.instance, repr(ALIVE_SECONDS), "1" if leaving else "0", secrets.token_hex(8))
        try:
            alive, epoch = self._heartbeat(keys=keys, args=args)
        except redis.RedisError as e:
            raise SharedStateError(f"{type(e).__name__}: {e}") from e
        self.instances = max(int(alive), 1)
        epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        lost = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        return lost

    def watch(self) -> None:
        """Redis went away: ask it once a second until it answers (`answering`)."""
        self.answering.clear()
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, name="cooldown redis watcher", daemon=True
            )
            self._watcher.start()

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        probe = connect(self._url)
        try:
            while not self._closed.wait(RETRY_SECONDS):
                if self.answering.is_set():
                    continue
                try:
                    probe.ping()
                except redis.RedisError:
                    continue
                self.answering.set()
        finally:
            probe.close()
