"""The chat page (rdn/serve/static/index.html) in a real headless Chromium against the real
`rdn serve-chat` server over the tiny calculator model of tests/chat_fixture.py.

Chromium comes from the system package manager (infra/install-chromium.sh), since
Playwright's own browser download needs the network; the tests skip, with the script's
reason, only where it cannot be installed. One server, started with an API key, serves both
tests: the page with the key set chats, the page without it shows the 401 error.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / "infra" / "install-chromium.sh"
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOT = ARTIFACTS / "chat-page.png"
API_KEY = "secret"
KEY_STORAGE = "rdn-chat-api-key"   # the page's localStorage key for the API key field
THROTTLE_BPS = 4000                # download bytes/s while the main test's answer streams


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def chromium_path() -> str:
    """The system Chromium binary, installed by infra/install-chromium.sh if missing."""
    try:
        proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium not available: infra/install-chromium.sh ran past 600 s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        pytest.skip(f"chromium not available: {reason}")
    return lines[-1]


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright  # a declared dev dependency (pyproject.toml)

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=["--no-sandbox"], headless=True)
        try:
            yield b
        finally:
            b.close()


def _tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


@pytest.fixture(scope="module")
def chat_server(chat_project, tmp_path_factory):
    """`rdn serve-chat --api-key secret` on a free loopback port, run in the chat project
    (tests/test_serve.py's ServerProcess): (base_url, conversations, log file)."""
    from tests.test_serve import ServerProcess

    root, conversations = chat_project
    log = tmp_path_factory.mktemp("serve-chat") / "server.log"
    server = ServerProcess(root, log, "--host", "127.0.0.1", "--api-key", API_KEY)
    try:
        yield server.url, conversations, log
    finally:
        server.stop()


# --------------------------------------------------------------------------- helpers
# Records the text of the last assistant bubble at each DOM change, with its done flag.
RECORD_STATES = """() => {
  window.__states = [];
  const messages = document.querySelector('#messages');
  new MutationObserver(() => {
    const bubbles = messages.querySelectorAll('.msg.assistant');
    const b = bubbles[bubbles.length - 1];
    if (!b) return;
    const body = b.querySelector('.body') || b;
    window.__states.push({t: performance.now(), text: body.textContent, done: b.dataset.done === 'true'});
  }).observe(messages, {childList: true, subtree: true, characterData: true, attributes: true,
                       attributeFilter: ['data-done']});
}"""


def _screenshot(page) -> str:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    return str(SCREENSHOT)


def _expected(conversation: list[dict]) -> tuple[str, str, str]:
    """(question, calculator expression, value) of one fixture conversation."""
    parts = conversation[1]["content"]
    return conversation[0]["content"], parts[0]["text"], parts[1]["text"]


# --------------------------------------------------------------------------- tests
def test_chat_page_streams_a_calculator_answer(browser, chat_server):
    from playwright.sync_api import expect

    base, conversations, log = chat_server
    question, expr, value = _expected(conversations[0])
    answer = f"The answer is {value}."
    models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()["data"]
    default = next(m["id"] for m in models if m.get("default"))

    context = browser.new_context(viewport={"width": 1000, "height": 700})
    context.add_init_script(f"localStorage.setItem({KEY_STORAGE!r}, {API_KEY!r})")
    page = context.new_page()
    try:
        page.goto(base + "/")
        stage = page.locator("#stage")
        expect(stage.locator("option[value=rl]")).to_have_count(1)
        expect(stage.locator("option[value=sft]")).to_have_count(1)
        assert stage.input_value() == default, f"the stage selector does not start on the default stage {default!r}"
        stage.select_option("rl")
        page.fill("#temperature", "0")
        assert page.input_value("#temperature") == "0"

        # The tiny model writes a token every ~1 ms, so unthrottled the whole stream reaches the
        # page in one network read. Throttled to THROTTLE_BPS (the body is a few kB of chunk
        # events), it arrives in several reads over about a second, and the page must show the
        # first tokens before the last ones arrive.
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions",
                 {"offline": False, "latency": 0, "downloadThroughput": THROTTLE_BPS, "uploadThroughput": -1})
        page.evaluate(RECORD_STATES)
        page.fill("#prompt", question)
        page.click("#send")
        bubble = page.locator(".msg.assistant").last
        try:
            expect(bubble).to_have_attribute("data-done", "true", timeout=30_000)
        except AssertionError as e:
            raise AssertionError(f"the answer did not finish streaming ({e}); screenshot {_screenshot(page)}; "
                                 f"server log {log}:\n{_tail(log)}") from None
        shot = _screenshot(page)

        text = bubble.inner_text()
        assert answer in text, f"expected {answer!r} in the assistant bubble, got {text!r}; screenshot {shot}"
        chip = bubble.locator(".tool-call")
        assert chip.count() == 1, f"expected one .tool-call chip in {text!r}; screenshot {shot}"
        chip_text = chip.inner_text()
        assert expr in chip_text and value in chip_text, \
            f"the tool-call chip {chip_text!r} lacks {expr!r} = {value!r}; screenshot {shot}"

        states = page.evaluate("window.__states")
        final = bubble.locator(".body").text_content()
        seen = [(round(s["t"]), s["text"]) for s in states]
        partial = {s["text"] for s in states if not s["done"] and s["text"] and s["text"] != final}
        assert partial, (f"no intermediate text was rendered before the final {final!r} (states seen: "
                         f"{seen!r}); screenshot {shot}")
        first = min(s["t"] for s in states if s["text"])
        done = min(s["t"] for s in states if s["done"])
        assert done - first >= 100, (f"the first text showed only {done - first:.0f} ms before the end of a "
                                     f"stream throttled to {THROTTLE_BPS} B/s: not streamed (states seen: "
                                     f"{seen!r}); screenshot {shot}")
        assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled(), f"screenshot {shot}"
    finally:
        context.close()


def test_chat_page_without_api_key_shows_the_401_error(browser, chat_server):
    from playwright.sync_api import expect

    base, conversations, _ = chat_server
    resp = httpx.post(f"{base}/v1/chat/completions", timeout=10,
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert resp.status_code == 401
    message = resp.json()["error"]["message"]

    context = browser.new_context(viewport={"width": 1000, "height": 700})
    page = context.new_page()
    try:
        page.goto(base + "/")
        page.fill("#prompt", _expected(conversations[0])[0])
        page.press("#prompt", "Enter")
        bubble = page.locator(".msg.assistant").last
        expect(bubble).to_have_attribute("data-done", "true", timeout=15_000)
        text = bubble.inner_text()
        if not ("401" in text and message in text):
            shot = ARTIFACTS / "chat-page-401.png"
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            pytest.fail(f"expected the 401 error {message!r} in the conversation, got {text!r}; screenshot {shot}")
        assert "error" in (bubble.get_attribute("class") or "")
    finally:
        context.close()
