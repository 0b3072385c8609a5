"""End to end in a real headless Chromium: open the page, upload a photo, see its caption, search.

Needs Debian's chromium (/usr/bin/chromium) and Playwright for Python (test extras); skipped with
the reason when either is missing. Set CAPTIONER_SCREENSHOTS=DIR to keep screenshots of the page.
"""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from captioner import Captioner
from captioner.library import index_folders
from captioner.server.background import serve_in_background

CHROMIUM = os.environ.get("CAPTIONER_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)", allow_module_level=True)


@pytest.fixture
def server(trained, shapes, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(shapes.parent.glob("*_4.png"))[:12]:
        Image.open(p).save(folder / p.name)
    db = tmp_path / "photos.sqlite"
    index_folders(Captioner.load(trained / "best", device="cpu"), [folder], db, progress=False)
    with serve_in_background("--model", str(trained / "best"), "--db", str(db)) as server:
        yield server.url


def test_upload_caption_and_search_in_chromium(server, shapes, tmp_path):
    shots = os.environ.get("CAPTIONER_SCREENSHOTS")
    photo = sorted(shapes.parent.glob("*_4.png"))[0]
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        except Exception as e:  # a browser that is installed but cannot start here
            pytest.skip(f"Chromium could not start: {str(e).splitlines()[0]}")
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server)
        page.wait_for_selector("#status:has-text('model:')")
        assert page.is_visible("#search-section")

        page.set_input_files("#file-input", str(photo))
        caption = page.wait_for_selector(".card .caption:not(.pending)", timeout=60_000)
        text = caption.inner_text()
        assert "error" not in (caption.get_attribute("class") or "") and len(text.split()) >= 3, text
        assert any(w in text for w in ("circle", "square", "triangle"))
        if shots:
            page.screenshot(path=str(Path(shots) / "caption.png"), full_page=True)

        page.fill("#query", "circle")
        page.click("#search-form button")
        page.wait_for_selector(".hit img", timeout=30_000)
        page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth)")
        hits = page.query_selector_all(".hit figcaption")
        assert hits and all("circle" in h.inner_text() for h in hits)
        if shots:
            page.screenshot(path=str(Path(shots) / "search.png"), full_page=True)
        browser.close()
