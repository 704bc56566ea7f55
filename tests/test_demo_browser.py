"""The page in a real browser: headless Chromium (Debian's `chromium` package) driven by playwright.

Playwright's own browser download does not work here, so the test launches /usr/bin/chromium. In CI
(CI=true) a missing browser or playwright is a failure; elsewhere the test is skipped with the reason.
Set DEMO_SCREENSHOT=/some/file.png to keep a screenshot of the answered page.
"""

import os
import shutil
from pathlib import Path

import pytest
from helpers.optional import skip_or_fail
from helpers.ports import free_port
from helpers.tiny_trained import TRAINED_ANSWERS

from alpaca.inference.decoding import DecodingSettings
from alpaca.inference.loading import load_generators

# browser tests: a Gradio server and Chromium (make test-fast skips them)
pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


def require(condition: bool, reason: str) -> None:
    if not condition:
        skip_or_fail(reason, "required in CI: apt-get install chromium; pip install -r requirements-dev.txt")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require(sync_playwright is not None, "the playwright Python package is not installed")
    require(os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not found: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page_url(tiny_llama, trained_adapter):
    from alpaca.inference.page import build_demo, launch_demo

    generators = load_generators(tiny_llama, lora_weights=trained_adapter)
    # Greedy page defaults (what --temperature=0 --num_beams=1 gives), so the answer is known.
    demo = build_demo(generators, DecodingSettings(temperature=0, num_beams=1, max_new_tokens=32))
    launch_demo(demo, server_name="127.0.0.1", server_port=free_port(), block=False)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture
def page(browser, page_url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(page_url)
    try:
        yield page
    finally:
        page.close()


def test_type_an_instruction_and_read_the_answer(page, tmp_path):
    from playwright.sync_api import expect

    instruction, _, answer = TRAINED_ANSWERS[0]
    page.get_by_role("textbox", name="Instruction").fill(instruction)
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_role("textbox", name="Output")).to_have_value(answer, timeout=TIMEOUT_MS)
    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("DEMO_SCREENSHOT"):
        shutil.copy(screenshot, Path(os.environ["DEMO_SCREENSHOT"]))


def test_streamed_answer_with_input(page):
    from playwright.sync_api import expect

    instruction, input, answer = TRAINED_ANSWERS[2]
    page.get_by_role("textbox", name="Instruction").fill(instruction)
    page.get_by_role("textbox", name="Input").fill(input)
    page.get_by_role("checkbox", name="Stream output").check()
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_role("textbox", name="Output")).to_have_value(answer, timeout=TIMEOUT_MS)


def test_empty_instruction_shows_a_message_not_a_trace(page):
    from playwright.sync_api import expect

    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_text("the instruction is empty")).to_be_visible(timeout=TIMEOUT_MS)
    assert "Traceback" not in page.content()
