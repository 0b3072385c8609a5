"""Screenshots of the web page for the README, taken in headless Chromium with the shipped model.

    python docs/screenshots.py          # writes docs/page-caption.png and docs/page-search.png

Indexes examples/ into a temporary library, starts `captioner serve`, uploads two photos and
searches. Needs Chromium (/usr/bin/chromium) and Playwright for Python (the test extras).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from captioner.server.background import serve_in_background

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "photos.sqlite"
        subprocess.run([sys.executable, "-m", "captioner", "index", str(ROOT / "examples"), "--db", str(db),
                        "--quiet"], check=True)
        with serve_in_background("--db", str(db)) as server:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(server.url)
                page.wait_for_selector("#status:has-text('model:')")
                page.set_input_files("#file-input", [str(ROOT / "examples" / n) for n in ("astronaut.jpg",
                                                                                          "grace_hopper.jpg")])
                page.wait_for_function("document.querySelectorAll('.card .caption:not(.pending)').length == 2",
                                       timeout=60_000)
                page.screenshot(path=str(ROOT / "docs" / "page-caption.png"), full_page=True)
                page.fill("#query", sys.argv[1] if len(sys.argv) > 1 else "dog playing")
                page.click("#search-form button")
                page.wait_for_selector(".hit img")
                page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete)")
                page.locator("#search-section").screenshot(path=str(ROOT / "docs" / "page-search.png"))
                browser.close()
    print("wrote docs/page-caption.png and docs/page-search.png")


if __name__ == "__main__":
    main()
