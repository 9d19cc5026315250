"""What the console's browser tests share: headless Chromium, logging in, pages, screenshots.

The system Chromium (``/usr/bin/chromium``, installed by ``scripts/services.sh``) runs headless
under Playwright. Waits use Playwright's own waiting with generous timeouts (the machines are
noisy); screenshots go to ``$EDGEFLEET_CONSOLE_ARTIFACTS`` (default ``test-artifacts/console/``).
A test module makes its browser fixture from :func:`chromium`::

    @pytest.fixture(scope="module")
    def browser() -> Iterator[Browser]:
        with chromium() as browser:
            yield browser
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

__all__ = [
    "ARTIFACTS",
    "CHROMIUM",
    "WAIT_MS",
    "chromium",
    "log_in",
    "new_page",
    "shoot",
    "show",
]

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 60_000  # Playwright's waits: generous, the machines are noisy
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("EDGEFLEET_CONSOLE_ARTIFACTS", REPO / "test-artifacts" / "console"))
expect.set_options(timeout=WAIT_MS)


@contextmanager
def chromium() -> Iterator[Browser]:
    """The system Chromium, headless, until the block ends."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/services.sh (installs chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def new_page(browser: Browser, width: int = 1280) -> Page:
    context = browser.new_context(viewport={"width": width, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.on("pageerror", lambda error: pytest.fail(f"uncaught error in the page: {error}"))
    return page


def log_in(page: Page, url: str, secret: str) -> None:
    page.goto(url + "/")
    page.get_by_label("API token").fill(secret)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#overview[data-loaded]")).to_be_visible()


def shoot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def show(page: Page, url: str, route: str) -> None:
    page.goto(f"{url}/#{route}")
    expect(page.locator("main h1")).to_be_visible()
    expect(page.locator("main .view")).not_to_have_attribute("aria-busy", "true")
