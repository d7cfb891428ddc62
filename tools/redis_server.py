"""A throwaway redis-server for tests and benchmarks (shared limits, issue 11).

`RedisServer(workdir).start()` runs the `redis-server` on PATH on a free 127.0.0.1 port, with
nothing on disk (`--save ""`, `--appendonly no`, its working directory in `workdir`), and
returns once it answers PING. `url` is what a `shared_limits.redis_url` takes. `stop()` ends it
(SIGTERM, then SIGKILL), `kill()` ends it at once (SIGKILL: a crash, nothing flushed), and
`start()` again brings a fresh, empty server up on the *same* port, so that a test can kill
Redis under running proxies and bring it back where they reconnect. It is a context manager
(stopped on exit).

Never the machine's own Redis (often on 6379): always a server of its own, on a port the OS
picked. PING is spoken in raw RESP over a socket, so this needs no Redis client library.

    with RedisServer(tmp_path) as redis:
        config = {"shared_limits": {"redis_url": redis.url}}
        ...
        redis.kill()      # Redis gone
        redis.start()     # back, empty, same port
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from typing import Self

from tools.launch import HOST, Process, StartError, free_port

EXECUTABLE = "redis-server"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
PING_TIMEOUT = 0.5
# Restart on the same port: the old listener's socket may linger a moment after a SIGKILL
# (redis sets SO_REUSEADDR, so this is rare); a start that fails to bind is retried this long.
REBIND_TIMEOUT = 5.0


def redis_server_path() -> str | None:
    """The `redis-server` on PATH, or None (the tests then skip and say how to get it)."""
    return shutil.which(EXECUTABLE)


def ping(port: int, host: str = HOST, timeout: float = PING_TIMEOUT) -> bool:
    """Does a Redis on host:port answer PING with PONG right now?"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            answer = b""
            while not answer.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    break
                answer += chunk
            return answer.startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server on 127.0.0.1:`port` (a free port unless given), no persistence."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        executable: str | None = None,
        name: str = "redis",
    ) -> None:
        found = executable or redis_server_path()
        if found is None:
            raise FileNotFoundError(
                f"{EXECUTABLE} is not on PATH (apt install redis-server, brew install redis, "
                "or docker run -p 127.0.0.1:6379:6379 redis)"
            )
        self.executable = found
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.name = name
        self.starts = 0  # how many times start() brought a server up
        self._process: Process | None = None

    @property
    def url(self) -> str:
        """For `shared_limits.redis_url`: database 0 of this server."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-{self.port}.log"

    def command(self) -> list[str]:
        return [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            "",  # stdout, which Process sends to the log file
        ]

    def is_running(self) -> bool:
        return self._process is not None and self._process.process.poll() is None

    def ping(self) -> bool:
        return ping(self.port)

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start the server (again, after stop() or kill(): same port, empty) and wait until it
        answers PING. Raises StartError (with its log) if it does not come up."""
        if self.is_running():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + max(timeout, REBIND_TIMEOUT)
        while True:
            process = Process.spawn(
                self.command(),
                self.log_path,
                name=f"{EXECUTABLE}:{self.port}",
                cwd=self.workdir,
                stop_timeout=STOP_TIMEOUT,
            )
            try:
                process.wait_until_ready(self.ping, timeout)
            except StartError as exc:
                # The port still held by the server just killed: try again for a moment.
                if "Address already in use" in str(exc) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise
            self._process = process
            self.starts += 1
            return self

    def stop(self) -> str | None:
        """SIGTERM (nothing is saved), a bounded wait, then SIGKILL; what went wrong, if
        anything (see `Process.stop`). Safe to call when not running."""
        process, self._process = self._process, None
        if process is None:
            return None
        return process.stop()

    def kill(self) -> bool:
        """SIGKILL now, as a crash would; whether it was running."""
        process, self._process = self._process, None
        if process is None:
            return False
        return process.kill()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-4_000:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def main() -> int:
    """`python -m tools.redis_server`: one on a free port until Ctrl-C (for trying things)."""
    import tempfile

    with (
        tempfile.TemporaryDirectory(prefix="cooldown-redis-") as tmp,
        RedisServer(Path(tmp)) as redis,
    ):
        print(f"redis-server listening at {redis.url} (Ctrl-C stops it)", flush=True)
        try:
            while redis.is_running():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
