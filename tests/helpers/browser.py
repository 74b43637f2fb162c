"""The browser tests' shared parts: where screenshots go, and a headless chromium (Debian's, via Playwright)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def screenshots_dir() -> Path:
    """docs/screenshots/ (the README's pictures come from this test), or $PHI3_LORA_TEST_OUTPUT/screenshots/."""
    out = os.environ.get("PHI3_LORA_TEST_OUTPUT")
    folder = Path(out) / "screenshots" if out else Path(__file__).resolve().parents[2] / "docs" / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def launch_browser() -> Iterator:
    """A headless chromium for a module's tests; skipped without /usr/bin/chromium unless
    PHI3_LORA_REQUIRE_BROWSER=1."""
    if not CHROMIUM.exists():
        if os.environ.get("PHI3_LORA_REQUIRE_BROWSER") == "1":
            pytest.fail("PHI3_LORA_REQUIRE_BROWSER=1 but /usr/bin/chromium is missing "
                        "(apt-get install -y chromium chromium-driver).")
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium chromium-driver)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()
