"""The chat and translation page (GET /) in a real headless Chromium, against a real bild-server.

Chromium is Debian's `chromium` package (`.ci/run` installs it where missing), driven by Playwright
without a browser download. The test fails, rather than skips, when the browser is missing.

`python -m tests.test_http_page docs/http-page.png` makes README's screenshot against the default
model pair (SmolLM2-135M-Instruct and its draft).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.server_util import scrape, start_http_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def launch(playwright) -> Browser:
    assert Path(CHROMIUM).is_file(), "no chromium: `apt-get install chromium` (.ci/run installs it where missing)"
    # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page_server(tiny_dirs, free_costs):
    """One KV slot: the translation after a stopped chat runs only once the stop has freed it."""
    server, base = start_http_server(
        "--large", tiny_dirs["large"], "--small", tiny_dirs["draft"], "--max-batch-size", "1",
        "--cost-profile", free_costs, "--context-length", "1024", "--max-new-tokens-limit", "1000",
        "--fallback-threshold", "0.2", "--metrics-port", "0", "--drain-delay", "0",
    )  # fmt: skip
    server.base = base
    yield server
    assert server.stop() == 0


def ignore_eos(route: Route) -> None:
    """Random tiny models may end a reply at once; the reply to stop must go on until stopped."""
    body = json.loads(route.request.post_data)
    route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))


REPLY_LENGTH = "(document.querySelector('.msg.assistant')?.textContent.length || 0)"


def reply_grows(page: Page, than: int = 0) -> int:
    """Wait until the reply is longer than `than` characters; return its length."""
    page.wait_for_function(f"{REPLY_LENGTH} > {than} || document.body.dataset.state === 'idle'")
    length = page.evaluate(REPLY_LENGTH)
    assert length > than, f"the reply stopped growing: {page.text_content('#status')}"
    return length


def test_chat_streams_stop_cancels_and_translate_streams(page_server, browser, tiny_dirs, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 600})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(page_server.base + "/")
    expect(page.locator("#health")).to_have_text("serving")
    expect(page.locator("#model")).to_contain_text(Path(tiny_dirs["draft"]).name)

    # Chat: a long reply streams in, and Stop cancels it.
    page.route("**/v1/chat/completions", ignore_eos)
    page.click("#settings summary")
    page.fill("#max-tokens", "900")
    page.fill("#chat-input", "Hello! Who are you?")
    page.press("#chat-input", "Enter")
    expect(page.locator(".msg.user")).to_have_text(["Hello! Who are you?"])
    reply_grows(page, reply_grows(page))  # text arrives, and more text after it
    expect(page.locator("body")).to_have_attribute("data-state", "streaming")
    expect(page.locator("#stat-tps")).to_have_text(re.compile(r"^[0-9.]+$"))
    expect(page.locator("#chat-stop")).to_be_enabled()
    page.click("#chat-stop")
    expect(page.locator("body")).to_have_attribute("data-state", "idle")
    expect(page.locator("#status")).to_have_text("stopped")
    expect(page.locator(".msg.assistant")).to_have_class([re.compile("stopped")])
    assert 0 < int(page.text_content("#stat-tokens")) < 900
    # The stop closed the connection, and the server cancelled the engine request and freed its slot.
    deadline = time.monotonic() + 20
    while scrape(page_server.base).get('bild_requests_total{mode="bild",outcome="cancelled"}') != 1:
        assert time.monotonic() < deadline, "the stopped request was not cancelled in the engine"
        time.sleep(0.1)
    page.unroute("**/v1/chat/completions")

    # A second turn sends the conversation so far, the stopped reply included.
    page.fill("#max-tokens", "8")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.fill("#chat-input", "And then?")
        page.press("#chat-input", "Enter")
    assert [m["role"] for m in json.loads(sent.value.post_data)["messages"]] == ["user", "assistant", "user"]
    expect(page.locator("#status")).to_have_text(re.compile("^done"))
    expect(page.locator(".msg.assistant")).to_have_count(2)

    # Translate: one sentence streams into the output box.
    page.fill("#max-tokens", "24")
    page.click("#tab-translate")
    expect(page.locator("#translate")).to_be_visible()
    expect(page.locator("#chat")).to_be_hidden()
    page.fill("#source", "Good morning, my friend!")
    page.select_option("#target-lang", "French")
    page.click("#translate-go")
    expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=30_000)
    expect(page.locator("#status")).to_have_text(re.compile("^done"))
    assert page.text_content("#translation")
    expect(page.locator("#stat-small")).to_have_text(re.compile(r"^\d+%$"))
    assert int(page.text_content("#stat-tokens")) >= 1
    page.screenshot(path=str(tmp_path / "page.png"))
    assert not errors, errors


def test_page_and_its_files_are_served_without_a_build_step_or_cdn(page_server):
    for path in ("/", "/static/app.js", "/static/style.css"):
        with urllib.request.urlopen(page_server.base + path, timeout=10) as response:
            body = response.read().decode()
        assert response.status == 200
        assert not re.search(r"(src|href)=\"https?://", body) and "import(" not in body, path


# ---- README's screenshot ---------------------------------------------------------------------


def screenshot(out: str) -> None:
    """The page against the default pair, after one chat turn, 900x600."""
    server, base = start_http_server("--drain-delay", "0", env={})
    try:
        warm_up = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}).encode()
        urllib.request.urlopen(base + "/v1/chat/completions", warm_up, timeout=300).read()  # a cold engine is slow
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(base + "/")
            expect(page.locator("#health")).to_have_text("serving")
            page.click("#settings summary")
            page.fill("#max-tokens", "96")
            page.fill("#chat-input", "Give me three tips for a good night's sleep.")
            page.press("#chat-input", "Enter")
            expect(page.locator("body")).to_have_attribute("data-state", "idle", timeout=120_000)
            page.click("#settings summary")
            page.screenshot(path=out)
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    screenshot(sys.argv[1] if len(sys.argv) > 1 else "docs/http-page.png")
