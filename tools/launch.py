"""Start and stop mitmdump (and other helper processes) for the tests and the benchmarks.

The one launcher used everywhere:

* `start_mitmdump(confdir=..., log_path=..., config_path=...)` runs the venv's mitmdump on a
  free 127.0.0.1 port with its own CA directory (`confdir`) and, when `config_path` is given,
  the Cooldown addon (`addon/cerebras.py`) reading that config; with `reverse_to=URL`, also a
  reverse proxy to URL on a second free port (the way in that needs only a base URL). Its
  output (stdout and stderr) goes to `log_path`; it returns a `Mitmdump` once every listener
  listens and its CA certificate exists. A mitmdump that exits or does not come up in time is
  stopped, and `StartError` carries the end of its log.
* `Process.stop()`: SIGTERM, a bounded wait, then SIGKILL; it returns what went wrong (already
  exited, had to be killed) or None. A `Process` is a context manager that stops it on exit,
  so several of them can be held in a `contextlib.ExitStack`.
* `free_port()`, `rss_kib(pid)`: a free local port, a process's resident memory.

Everything binds to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
ADDON_SCRIPT = REPO / "addon" / "cerebras.py"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
LOG_TAIL_CHARS = 60_000
POLL_INTERVAL = 0.05
# "HTTP(S) proxy listening at 127.0.0.1:8080.", "HTTP(S) proxy (upstream mode) listening at ..."
LISTENING = re.compile(r" listening at ")


def mitmdump_executable(program: str = "mitmdump") -> Path:
    """The mitmdump (or `program`: mitmweb) of the running interpreter's environment: the
    venv in use is the one run."""
    return Path(sys.executable).parent / program


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """Resident memory of a process from /proc (VmRSS now, VmHWM the peak), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise LookupError(f"no {field_name} for pid {pid}")


class StartError(RuntimeError):
    """A child process did not come up; the message ends with the tail of its log."""


@dataclass(kw_only=True)
class Process:
    """A child process with its output (stdout and stderr) in a log file."""

    process: subprocess.Popen[bytes]
    log_path: Path
    name: str
    stop_timeout: float = STOP_TIMEOUT

    @classmethod
    def spawn(
        cls,
        command: Sequence[str],
        log_path: Path,
        *,
        name: str | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = STOP_TIMEOUT,
        **fields: Any,
    ) -> Self:
        """Start `command` (stdin closed, unbuffered Python output, `env` added to ours)."""
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log_path, "wb") as log_file:  # the child keeps its own descriptor
            process = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=full_env,
            )
        return cls(
            process=process,
            log_path=log_path,
            name=name or Path(command[0]).name,
            stop_timeout=stop_timeout,
            **fields,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        text = self.log_text()
        return text if len(text) <= chars else "[...]\n" + text[-chars:]

    def wait_until_ready(self, ready: Callable[[], Any], timeout: float = START_TIMEOUT) -> Any:
        """Poll `ready()` until it returns something truthy, and return that. If the process
        exits first or `timeout` passes, stop it and raise `StartError` with its log."""
        deadline = time.monotonic() + timeout
        while True:
            value = ready()
            if value:
                return value
            status = self.process.poll()
            if status is not None:
                problem = f"{self.name} exited with status {status} during start-up"
                break
            if time.monotonic() >= deadline:
                problem = f"{self.name} did not come up within {timeout:g}s"
                break
            time.sleep(POLL_INTERVAL)
        self.stop()
        raise StartError(f"{problem}:\n{self.log_tail()}")

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = START_TIMEOUT
    ) -> re.Match[str]:
        """The first match of `pattern` in the log, once it appears (see `wait_until_ready`)."""
        regex = re.compile(pattern)
        return self.wait_until_ready(lambda: regex.search(self.log_text()), timeout)

    def stop(self) -> str | None:
        """SIGTERM, wait up to `stop_timeout`, then SIGKILL. Returns what went wrong, if
        anything: the process had already exited (with its status), or it had to be killed."""
        if self.process.poll() is not None:
            return f"{self.name} had already exited with status {self.process.returncode}"
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return f"{self.name} did not exit within {self.stop_timeout:g}s of SIGTERM; killed"
        return None

    def kill(self) -> bool:
        """SIGKILL and reap the process if it is still running; whether it was."""
        if self.process.poll() is not None:
            return False
        self.process.kill()
        self.process.wait(timeout=self.stop_timeout)
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def mitmdump_command(
    port: int,
    confdir: Path,
    *,
    config_path: Path | None = None,
    reverse: tuple[str, int] | None = None,
    options: Sequence[str] = (),
    args: Sequence[str] = (),
    program: str = "mitmdump",
) -> list[str]:
    """mitmdump (or `program`, e.g. mitmweb) on 127.0.0.1:`port` with its own CA dir; with
    `config_path`, with the Cooldown addon reading that config; with `reverse` (URL, port),
    also a reverse proxy to URL on that port. `options` are `name=value` pairs for `--set`;
    `args` go last."""
    command = [str(mitmdump_executable(program))]
    if config_path is not None:
        command += ["-s", str(ADDON_SCRIPT)]
    command += ["--listen-host", HOST, "-p", str(port), "--set", f"confdir={confdir}"]
    if reverse is not None:
        target, reverse_port = reverse
        command += ["--mode", "regular", "--mode", f"reverse:{target}@{reverse_port}"]
    if config_path is not None:
        command += ["--set", f"cerebras_config={config_path}"]
    for option in options:
        command += ["--set", option]
    return [*command, *args]


@dataclass(kw_only=True)
class Mitmdump(Process):
    """A running mitmdump: its port, CA directory, config file (None: no Cooldown), log, and
    the port of its reverse proxy (None: none)."""

    port: int
    confdir: Path
    config_path: Path | None = None
    reverse_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def reverse_url(self) -> str:
        """The reverse proxy's address: a client's base URL is this plus the API's path."""
        if self.reverse_port is None:
            raise LookupError("this mitmdump has no reverse proxy")
        return f"http://{HOST}:{self.reverse_port}"

    @property
    def ca_file(self) -> Path:
        """mitmproxy's CA certificate: what a client trusts to talk TLS through the proxy."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    def is_ready(self) -> bool:
        listeners = 1 if self.reverse_port is None else 2
        listening = len(LISTENING.findall(self.log_text())) >= listeners
        return listening and self.ca_file.is_file()

    @classmethod
    def start(
        cls,
        *,
        confdir: Path,
        log_path: Path,
        config_path: Path | None = None,
        reverse_to: str | None = None,
        options: Sequence[str] = (),
        args: Sequence[str] = (),
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
        program: str = "mitmdump",
        **fields: Any,
    ) -> Self:
        """Start mitmdump (or `program`: mitmweb, whose web UI then needs its own `web_port`
        option) as `mitmdump_command` says (`reverse_to`: the URL a reverse proxy on a second
        port forwards to) and wait until it listens; `fields` are those a subclass adds.
        Raises `StartError` (the process stopped) if it does not."""
        confdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        # mitmproxy refuses two listeners on port 0, so the reverse proxy gets a port too.
        reverse = None if reverse_to is None else (reverse_to, free_port())
        command = mitmdump_command(
            port,
            confdir,
            config_path=config_path,
            reverse=reverse,
            options=options,
            args=args,
            program=program,
        )
        proxy = cls.spawn(
            command,
            log_path,
            name=program,
            cwd=cwd,
            env=env,
            stop_timeout=stop_timeout,
            port=port,
            confdir=confdir,
            config_path=config_path,
            reverse_port=None if reverse is None else reverse[1],
            **fields,
        )
        proxy.wait_until_ready(proxy.is_ready, start_timeout)
        return proxy


# The launcher's entry point: `start_mitmdump(confdir=..., log_path=..., ...)` -> `Mitmdump`.
start_mitmdump = Mitmdump.start
