"""`lminf serve`'s chat page (GET /) in a real headless browser: Debian's chromium driven by
playwright, the server on a loopback port with a tiny model. Open the page, set a system prompt,
send two messages and watch each reply stream in, then reset. On failure a screenshot is kept
in $LMINF_TEST_ARTIFACTS (default test-artifacts/)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

import lminf
from lminf.serve.engine import Engine
from lminf.serve.openai_api import create_app
from tests.helpers import free_port, tiny_model

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (Debian: apt-get install chromium)")

KEY = "page-key"


@pytest.fixture(scope="module")
def server(default_tokenizer):
    model = lminf.patch(tiny_model(vocab_size=len(default_tokenizer)), n_global=2, n_local=16)
    app = create_app(Engine(model, default_tokenizer, "tiny", max_sessions=2, default_max_tokens=12), api_key=KEY)
    port = free_port()
    served = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{base}/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield base
    served.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def page(server, request):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        yield page
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            folder = Path(os.environ.get("LMINF_TEST_ARTIFACTS", "test-artifacts"))
            folder.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(folder / f"{request.node.name}.png"), full_page=True)
        browser.close()


def test_a_chat_streams_its_replies_and_resets(server, page):
    page.goto(server)
    assert page.title() == "lminf chat"
    page.fill("#key", KEY)
    page.click("#reset")  # with the key given, the page finds the model
    sync_api.expect(page.locator("#model")).to_have_text("tiny")
    page.fill("#system", "You are a terse assistant.")
    for n, text in enumerate(["Hello there.", "Tell me more."], start=1):
        page.fill("#message", text)
        page.press("#message", "Enter")
        reply = page.locator(".assistant").nth(n - 1)
        sync_api.expect(reply).to_have_attribute("data-done", "true", timeout=30_000)
        assert reply.inner_text().strip() and int(reply.get_attribute("data-pieces")) > 1  # streamed, piece by piece
        assert page.locator(".user").nth(n - 1).inner_text() == text
    tokens = int(page.inner_text("#tokens"))
    assert tokens > 0 and page.inner_text("#speed").endswith("tok/s") and page.inner_text("#cache") != "0 MiB"
    page.click("#reset")
    sync_api.expect(page.locator(".turn")).to_have_count(0)
    assert page.inner_text("#tokens") == "0"


def test_the_page_needs_no_key_but_its_requests_do(server):
    assert httpx.get(server).status_code == 200
    assert httpx.get(f"{server}/stats").status_code == 401
