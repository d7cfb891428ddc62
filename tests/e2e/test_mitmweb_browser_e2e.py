"""mitmweb in a real browser: a held flow is shown paused with its comment, then released.

Issue 14: why a flow waited was only in its Comment tab, and after a click on Resume the list
showed a held flow as running. Here mitmweb runs with the addon, Debian's chromium (which
.ci/run installs) is driven headless by Playwright, and the test reads what a user would see
in mitmweb's flow list: the Comment column, the paused row, the resume that does not release
it, the release.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cooldown.estimate import estimate_request
from tools.launch import free_port

from .conftest import CEREBRAS_CHAT, Proxy, chat_body, write_config

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
WEB_URL = re.compile(r"Web server listening at (http://127\.0\.0\.1:\d+/\S*)")
UI_TIMEOUT_MS = 15_000

if shutil.which(CHROMIUM) is None:
    pytest.skip(
        f"no {CHROMIUM}: .ci/run installs Debian's chromium with apt-get "
        "(apt-get install -y chromium); without it the mitmweb browser test cannot run",
        allow_module_level=True,
    )
playwright_api = pytest.importorskip(
    "playwright.async_api", reason="Playwright is in the test extra: scripts/setup test"
)


def estimate(body: dict[str, Any]) -> int:
    return estimate_request("/v1/chat/completions", json.dumps(body).encode(), 131_072).total


@pytest.fixture
def mitmweb(tmp_path: Path, mock_upstream: Any) -> Iterator[tuple[Proxy, str]]:
    """mitmweb with the addon (limits set by the test through the config file) and the URL
    of its UI, token included."""
    config_path = tmp_path / "cooldown.yaml"
    write_config(config_path, {"cerebras_upstream": mock_upstream.url})
    proxy = Proxy.start(
        program="mitmweb",
        confdir=tmp_path / "confdir",
        log_path=tmp_path / "mitmweb.log",
        config_path=config_path,
        options=(f"web_port={free_port()}", "web_open_browser=false"),
        cwd=tmp_path,
    )
    try:
        match = proxy.wait_for_log(WEB_URL, timeout=20.0)
        yield proxy, match.group(1)
    finally:
        problem = proxy.stop()
        assert problem is None, f"{problem}\n{proxy.log_tail()}"


async def test_a_held_flow_is_shown_paused_with_its_comment_then_released(
    mitmweb: tuple[Proxy, str], mock_upstream: Any
) -> None:
    proxy, web_url = mitmweb
    first, second = chat_body(max_completion_tokens=200), chat_body(max_completion_tokens=60)
    # The mock generates all it may, so the first one's tokens stay charged; the second is
    # 40 tokens short at tpm/60 (about 4) a second: held for about 10 s, time to look and click.
    mock_upstream.configure(rpm=600, tpm=60_000, completion_tokens=10_000)
    limits = {
        "rpm_limit": 600,
        "tpm_limit": estimate(first) + estimate(second) - 40,
        "probe_first": False,
        "request_timeout": "60s",
    }
    write_config(
        proxy.config_path, {"cerebras_limits": limits, "cerebras_upstream": mock_upstream.url}
    )
    proxy.wait_for_log(r"Cooldown config from .*tpm_limit=" + str(limits["tpm_limit"]), 10.0)

    async with (
        playwright_api.async_playwright() as playwright,
        proxy.async_client(timeout=40.0) as client,
    ):
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        page = await browser.new_page()
        await page.goto(web_url)

        assert (await client.post(CEREBRAS_CHAT, json=first)).status_code == 200
        # The flow list has a Comment column without anyone setting web_columns.
        await page.locator("th", has_text="Comment").wait_for(timeout=UI_TIMEOUT_MS)
        held = asyncio.ensure_future(client.post(CEREBRAS_CHAT, json=second))

        paused = page.locator("tr.intercepted td.col-comment", has_text="HELD for llama3.1-8b")
        await paused.wait_for(timeout=UI_TIMEOUT_MS)
        assert "waiting for tokens per minute" in await paused.inner_text()

        # Resume by hand: the flow stays held, shown paused, and its comment says so.
        await paused.click()
        await page.keyboard.press("a")  # mitmweb: resume the selected flow
        still = page.locator("tr.intercepted td.col-comment", has_text="resumed by hand")
        await still.wait_for(timeout=UI_TIMEOUT_MS)
        assert not held.done()

        response = await asyncio.wait_for(held, 30.0)
        assert response.status_code == 200
        released = page.locator("tr:not(.intercepted) td.col-comment", has_text="waited")
        await released.wait_for(timeout=UI_TIMEOUT_MS)
        assert re.search(
            r"Cooldown: waited \d+\.\d+s, estimate \d+ tokens", await released.inner_text()
        )
        # The first went at once: its comment is whole, not ", actual ..." alone.
        at_once = page.locator("td.col-comment", has_text="Cooldown: forwarded at once")
        assert "actual" in await at_once.inner_text()
        await browser.close()
    assert float(response.headers["x-cooldown-wait"]) > 2.0
    proxy.assert_clean_log()
