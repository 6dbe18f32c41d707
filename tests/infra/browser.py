"""A real browser for the console tests: Debian's Chromium (apt, installed by scripts/install
test) driven by Playwright, never a browser Playwright downloads; and where screenshots go
(``test-artifacts/console/``, or ``$OPENLOOPS_TEST_ARTIFACTS/console``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("OPENLOOPS_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@contextmanager
def chromium() -> Iterator[Any]:
    assert CHROMIUM.exists(), "Chromium is missing: scripts/install test installs it (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshots() -> Callable[[Any, str], None]:
    out = ARTIFACTS / "console"
    out.mkdir(parents=True, exist_ok=True)

    def shot(page: Any, name: str) -> None:
        page.screenshot(path=str(out / f"{name}.png"), full_page=True)

    return shot


def sign_in(page: Any, base_url: str, key: str, path: str = "/console") -> None:
    """Open ``path`` (which sends to the sign-in page) and sign in with ``key``."""
    page.goto(f"{base_url}{path}")
    page.wait_for_url("**/console/sign-in**")
    page.fill("#api-key", key)
    page.click("button[type=submit]")
