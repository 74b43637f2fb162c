"""The browser tests' shared parts: where screenshots go, and a headless chromium (Debian's, via Playwright)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


ROOT = Path(__file__).resolve().parents[2]
# The first render of the app (Gradio's bundle, the config, the tabs) after a goto or a reload: seconds on an idle
# machine, much more on CI's two cores shared by two test workers, a training process and chromium.
RENDER_MS = 120_000


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


def open_app(page: Any, url: str, marker: str = "Your chat data", *, reload: bool = False) -> None:
    """Go to (or reload) the app and wait until it has rendered: `marker`, a text of the first tab's layout, shows
    (Playwright's 30 s default is short for a first render on a loaded CI machine)."""
    if reload:
        page.reload()
    else:
        page.goto(url)
    page.get_by_text(marker).first.wait_for(timeout=RENDER_MS)


def stored_draft(page: Any, runs_dir: Path) -> dict[str, Any]:
    """The draft the page has saved in this browser (phi3_lora.ui.drafts: a gr.BrowserState in localStorage), read
    back in plain: {} before the first save. Gradio encrypts it with crypto-js, AES-256-CBC under a key and iv that
    OpenSSL's EVP_BytesToKey (MD5) derives from the hex SHA-256 of the app's secret and a salt, stored as
    "<unused iv>:<base64 of 'Salted__' + salt + ciphertext>"."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from phi3_lora.ui import drafts

    stored = page.evaluate("(key) => localStorage.getItem(key)", drafts.STORAGE_KEY)
    if not stored:
        return {}
    raw = base64.b64decode(stored.split(":", 1)[1])
    assert raw[:8] == b"Salted__", stored[:40]
    salt, body = raw[8:16], raw[16:]
    passphrase = hashlib.sha256(drafts.browser_secret(runs_dir).encode()).hexdigest().encode()
    derived = block = b""
    while len(derived) < 48:
        block = hashlib.md5(block + passphrase + salt).digest()
        derived += block
    decryptor = Cipher(algorithms.AES(derived[:32]), modes.CBC(derived[32:48])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(decryptor.update(body) + decryptor.finalize()) + unpadder.finalize()
    return json.loads(plain)
