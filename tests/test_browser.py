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

pytestmark = pytest.mark.slow

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

        # what the encoder recognises is shown under the caption (issue 28): chelsea.jpg is a cat
        cat = Path(__file__).resolve().parents[1] / "examples" / "chelsea.jpg"
        page.set_input_files("#file-input", str(cat))
        page.wait_for_selector(".card:has-text('chelsea.jpg') .tags .tag", timeout=60_000)
        shown = [s.inner_text() for s in page.query_selector_all(".card:has-text('chelsea.jpg') .tags .tag")]
        word, score = shown[0].rsplit(" ", 1)
        assert word == "cat" and 0.5 <= float(score) <= 1, shown

        page.fill("#query", "circle")
        page.click("#search-form button")
        page.wait_for_selector(".hit img", timeout=30_000)
        page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth)")
        hits = page.query_selector_all(".hit figcaption")  # hybrid (the default): every photo, ranked
        assert hits and "circle" in hits[0].inner_text()
        if shots:
            page.screenshot(path=str(Path(shots) / "search.png"), full_page=True)
        page.select_option("#mode", "keyword")
        page.click("#search-form button")
        page.wait_for_selector("#search-info:has-text('match')")
        page.wait_for_selector(".hit img", timeout=30_000)
        hits = page.query_selector_all(".hit figcaption")  # keywords: only photos whose captions say it
        assert hits and all("circle" in h.inner_text() for h in hits)
        first = page.get_attribute(".hit a", "href")
        page.click(".hit .more")  # more like this: the photo itself left out
        page.wait_for_selector("#search-info:has-text('compared')")
        page.wait_for_selector(".hit img", timeout=30_000)
        assert first not in [a.get_attribute("href") for a in page.query_selector_all(".hit a")]

        # the API's docs (issue 30, item 9): uploads typed as files, `code` shown as code, never as backticks
        page.goto(server + "/docs")
        page.wait_for_selector(".endpoint")
        text = page.inner_text("body")
        assert "`" not in text and "POST /api/caption" in text
        assert "file\tlist of file | null\tone or more images" in text  # (FastAPI's schema: a string with a media type)
        assert page.query_selector_all(".endpoint p code"), "no `code` in any description became <code>"
        browser.close()


def test_keyboard_only_user_captions_photos_and_opens_a_result(server, shapes, tmp_path):
    photos = sorted(shapes.parent.glob("*_4.png"))[:2]
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        except Exception as e:
            pytest.skip(f"Chromium could not start: {str(e).splitlines()[0]}")
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        uploads, choosers = [], []
        page.on("request", lambda r: uploads.append(r) if r.url.endswith("/api/caption") else None)
        # file choosers are intercepted from the start: expect_file_chooser() turns interception on
        # only as the key is pressed, and a chooser opened before that is lost (a flaky test)
        page.on("filechooser", lambda fc: choosers.append(fc))
        page.goto(server)
        page.wait_for_selector("#status:has-text('model:')")
        page.bring_to_front()  # keyboard events and the file chooser go to the focused page

        # search comes first (words, ranking, button, search by example photo), then the upload
        # control; every stop shows where the focus is (for a file input, on the label that stands for it)
        stops = []
        for _ in range(5):
            page.keyboard.press("Tab")
            stops.append(page.evaluate("""() => { const e = document.activeElement;
                const shown = e.type === "file" ? document.querySelector(`label[for=${e.id}]`) : e;
                const s = getComputedStyle(shown);
                return [e.id || e.textContent.trim(), s.outlineStyle, parseFloat(s.outlineWidth)]; }"""))
        assert [s[0] for s in stops] == ["query", "mode", "Search", "like-input", "file-input"], stops
        assert all(style != "none" and width >= 2 for _, style, width in stops), stops

        # Space on the upload control opens the file chooser; the chosen order is kept; a non-image
        # is refused on the page, never uploaded
        page.keyboard.press("Space")
        for _ in range(300):
            if choosers:
                break
            page.wait_for_timeout(100)
        assert choosers, "Space on the focused upload control opened no file chooser"
        choosers[0].set_files([str(photos[0]), str(notes), str(photos[1])])
        page.wait_for_function("document.querySelectorAll('.card .caption:not(.pending)').length === 3",
                               timeout=60_000)
        metas = [m.inner_text() for m in page.query_selector_all(".card .meta")]
        assert [m.split(" ·")[0] for m in metas] == [photos[0].name, "notes.txt", photos[1].name]
        captions = page.query_selector_all(".card .caption")
        assert "not an image; not uploaded" in captions[1].inner_text()
        assert "error" not in captions[0].get_attribute("class") and captions[0].inner_text()
        assert len(uploads) == 2
        assert page.evaluate("[...document.images].every(i => i.alt)")

        # search from the keyboard; the count is the true number of photos ranked; a result opens its photo
        page.focus("#query")
        page.keyboard.type("circle")
        page.keyboard.press("Enter")
        page.wait_for_selector(".hit a img", timeout=30_000)
        info = page.inner_text("#search-info")
        hits = page.query_selector_all(".hit")
        assert info == f"{len(hits)} photo{'s' if len(hits) > 1 else ''} ranked by the model", info
        href = hits[0].query_selector("a").get_attribute("href")
        photo = page.request.get(server.rstrip("/") + href)
        assert photo.ok and photo.headers["content-type"] == "image/jpeg"
        browser.close()
