"""The settings addon: the `cerebras_config` option, its YAML file, and reloading it on change.

A bad file at start-up is one line on stderr and exit status 1, before any listener opens; a bad
file later keeps the running config, as mitmproxy does with a script that fails to reload (a
reloaded script that finds a bad file logs the error and starts on the built-in defaults).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.utils import asyncio_utils

from .config import ConfigError, load_config, resolve_config_path
from .runtime import Runtime

log = logging.getLogger(__name__)

CONFIG_POLL_SECONDS = 1.0
TICK_SECONDS = 1.0  # the limiter's housekeeping (gate.tick)


def file_stamp(path: Path | None) -> tuple[float, int] | None:
    """What identifies a version of the config file: its mtime and size (None: no file)."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime, stat.st_size)


def proxy_listening() -> bool:
    """Whether mitmproxy's listeners are up: not yet while it starts (it loads scripts before
    its servers listen), already when a script is reloaded in a running proxy."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver is not None and bool(proxyserver.listen_addrs())


class Settings:
    name = "cooldown-settings"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._stamp: tuple[float, int] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "cerebras_config",
            str | None,
            None,
            "Path of Cooldown's YAML config. Without it, ./config.yaml is used if present, "
            "else built-in defaults (see config.yaml.example).",
        )

    def configure(self, updated: set[str]) -> None:
        if "termlog_verbosity" in updated:
            # mitmproxy formats and dispatches every record its root logger sees, shown or
            # not; per-request debug lines are only worth that when someone will read them.
            self.runtime.debug = ctx.options.termlog_verbosity == "debug"
        if "cerebras_config" in updated:
            self._load()
        if "connection_strategy" in updated and ctx.options.connection_strategy == "eager":
            # Eager opens the upstream connection at CONNECT time; for a request held for
            # minutes that connection sits idle and upstream closes it. Lazy connects when
            # the request is released, which is what holding needs (docs: Architecture).
            log.info("Cooldown sets connection_strategy=lazy: upstream connections open on release")
            ctx.options.update(connection_strategy="lazy")

    def running(self) -> None:
        self.runtime.running = True
        self._watch_task = asyncio_utils.create_task(
            self._watch(), name="cooldown config watcher", keep_ref=True
        )
        self._tick_task = asyncio_utils.create_task(
            self._tick(), name="cooldown limiter ticks", keep_ref=True
        )

    def done(self) -> None:
        for task in (self._watch_task, self._tick_task):
            if task is not None:
                task.cancel()
        self._watch_task = self._tick_task = None
        self.runtime.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.runtime.gate.tick()
            except Exception:
                log.exception("limiter housekeeping failed; trying again in %gs", TICK_SECONDS)

    def _load(self) -> None:
        path = resolve_config_path(ctx.options.cerebras_config)
        self._stamp = file_stamp(path)
        try:
            config = load_config(path)
        except ConfigError as e:
            if self.runtime.running:
                # mitmproxy rolls the option back and reports this; the running config stays.
                raise exceptions.OptionsError(
                    f"cerebras_config not applied, keeping the running config: {e}"
                ) from e
            message = f"Cooldown cannot start: cerebras_config: {e}"
            if not proxy_listening():
                # At start-up an exception here would print a script traceback, and an ERROR
                # log stops mitmdump only after its listeners say they listen (mitmproxy checks
                # for start-up errors once the servers are up). mitmproxy loads the script
                # while the servers are still being set up, so exiting here comes first: one
                # line on stderr (also under the console UI, whose log would never be seen),
                # status 1, nothing that looks like a running proxy; as for a bad option.
                raise SystemExit(message) from None
            # The script was reloaded in a running proxy: exiting would drop every flow.
            log.error(message)
            return
        self.runtime.apply(config)

    async def _watch(self) -> None:
        """Reload the config when its file changes, as mitmproxy reloads scripts."""
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """Apply the config file if it changed on disk; a bad file keeps the running config."""
        path = resolve_config_path(ctx.options.cerebras_config)
        stamp = file_stamp(path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            config = load_config(path)
        except ConfigError as e:
            log.error("config change not applied, keeping the running config: %s", e)
            return False
        log.info("config file changed: reloading")
        self.runtime.apply(config)
        return True
