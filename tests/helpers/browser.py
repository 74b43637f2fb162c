"""The browser tests' shared parts: where screenshots go, and a headless chromium (Debian's, via Playwright)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


ROOT = Path(__file__).resolve().parents[2]


def screenshots_dir() -> Path:
    """Where the browser tests' screenshots go: test-output/screenshots/ (or $PHI3_LORA_TEST_OUTPUT/screenshots/),
    and docs/screenshots/, the README's pictures, with PHI3_LORA_DOCS_SCREENSHOTS=1; a plain test run leaves the
    checkout as it was."""
    if os.environ.get("PHI3_LORA_DOCS_SCREENSHOTS") == "1":
        folder = ROOT / "docs" / "screenshots"
    else:
        folder = Path(os.environ.get("PHI3_LORA_TEST_OUTPUT") or ROOT / "test-output") / "screenshots"
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
