"""The REST API through an in-process client: caption uploads, bad uploads, search, thumbnails."""

import io
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from captioner import Captioner
from captioner.library import index_folders
from captioner.server.app import create_app


def png_bytes(colour=(220, 30, 30), size=(96, 96)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def library(trained, shapes, tmp_path_factory):
    cap = Captioner.load(trained / "best", device="cpu")
    folder = tmp_path_factory.mktemp("served")
    for p in sorted(shapes.parent.glob("*_4.png"))[:9]:
        Image.open(p).save(folder / p.name)
    db = folder.parent / "served.sqlite"
    index_folders(cap, [folder], db, progress=False)
    return cap, db


@pytest.fixture(scope="module")
def client(library):
    cap, db = library
    return TestClient(create_app(cap, db, max_upload_mb=0.05, max_pixels=200_000), base_url="http://localhost")


def test_health_and_schema(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["library"]
    schema = client.get("/openapi.json").json()
    assert {"/api/caption", "/api/search", "/health"} <= set(schema["paths"])


def test_schema_types_every_answer_and_error_and_docs_need_no_network(client):
    schema = client.get("/openapi.json").json()
    schemas = schema["components"]["schemas"]
    ok = schema["paths"]["/api/caption"]["post"]["responses"]
    assert ok["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CaptionResponse")
    assert {"413", "415", "422", "503"} <= set(ok)
    assert ok["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    search = schema["paths"]["/api/search"]["get"]["responses"]
    assert search["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SearchResponse")
    assert {"total", "results"} <= set(schemas["SearchResponse"]["properties"])
    assert set(schemas["Alternative"]["properties"]) == {"caption", "logprob", "score", "match", "rarity"}
    assert set(schemas["Tag"]["properties"]) == {"word", "score"} and "tags" in schemas["CaptionResult"]["properties"]
    assert "image/jpeg" in schema["paths"]["/api/thumb/{photo_id}"]["get"]["responses"]["200"]["content"]
    page = client.get("/docs")
    assert page.status_code == 200 and "/static/docs.js" in page.text
    for asset in ("/", "/docs", "/static/app.js", "/static/docs.js", "/static/style.css"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text, asset  # nothing from a CDN


def test_caption_one_and_many(client):
    r = client.post("/api/caption", files={"file": ("red.png", png_bytes(), "image/png")})
    assert r.status_code == 200
    body = r.json()
    assert body["results"][0]["filename"] == "red.png" and body["results"][0]["caption"]
    assert all({"word", "score"} == set(t) for t in body["results"][0]["tags"])  # what the encoder recognises
    assert body["seconds"] >= 0
    files = [("file", (f"{i}.png", png_bytes((30, 60 * i, 200)), "image/png")) for i in range(3)]
    files.append(("file", ("notes.txt", b"hello", "text/plain")))
    r = client.post("/api/caption", files=files)
    results = r.json()["results"]
    assert r.status_code == 200 and [bool(x.get("caption")) for x in results] == [True, True, True, False]
    assert "notes.txt" in results[3]["error"]


def test_caption_takes_the_decoding_controls_of_the_command_line(client, library):
    """Issue 30, item 9: beam size, length normalisation, trigram blocking, tags on/off and how many
    alternatives, checked as the command line checks them; each answer is the Python API's."""
    cap, _ = library
    data = png_bytes((200, 40, 40))
    for params, change in [({}, {}), ({"beam_size": 1}, {"beam_size": 1}),
                           ({"beam_size": 4, "length_norm": 1.5, "block_trigrams": True},
                            {"beam_size": 4, "length_norm": 1.5, "block_trigrams": True}),
                           ({"tags": False}, {"tag_threshold": 0.0}),
                           ({"beam_size": 4, "space_rerank": 2.0}, {"beam_size": 4, "space_rerank": 2.0}),
                           ({"beam_size": 4, "space_rerank": 1.0, "rarity_penalty": 5.0},
                            {"beam_size": 4, "space_rerank": 1.0, "rarity_penalty": 5.0})]:
        r = client.post("/api/caption", params=params, files={"file": ("a.png", data, "image/png")})
        want = cap.caption(data, decoding=cap.decoding.changed(**change), details=True)
        got = r.json()["results"][0]
        assert r.status_code == 200 and got["caption"] == want["caption"], params
        assert [a["caption"] for a in got["alternatives"]] == [a["caption"] for a in want["alternatives"]]
        assert all(("match" in a) == ("space_rerank" in params) for a in got["alternatives"])
        assert all(("rarity" in a) == ("rarity_penalty" in params) for a in got["alternatives"])
    r = client.post("/api/caption", params={"beam_size": 5, "alternatives": 2}, files={"file": ("a.png", data)})
    assert r.status_code == 200 and len(r.json()["results"][0]["alternatives"]) == 2
    for bad in ({"beam_size": 0}, {"beam_size": 101}, {"length_norm": "nan"}, {"length_norm": -1},
                {"alternatives": -1}, {"block_trigrams": "perhaps"}, {"space_rerank": -1}, {"space_rerank": "nan"},
                {"rarity_penalty": -1}, {"rarity_penalty": 11}):
        r = client.post("/api/caption", params=bad, files={"file": ("a.png", data)})
        assert r.status_code == 422 and "detail" in r.json(), bad


@pytest.mark.parametrize("name,data,status,words", [
    ("notes.txt", b"plain text, not a picture", 415, "not a readable image"),
    ("empty.png", b"", 415, "empty"),
    ("huge.png", None, 413, "pixels"),
    ("heavy.bmp", b"BM" + bytes(80_000), 413, "larger than"),
])
def test_bad_uploads_are_clear_4xx_json(client, name, data, status, words):
    if data is None:
        data = png_bytes(size=(600, 600))  # 360,000 pixels, over this app's 200,000
    r = client.post("/api/caption", files={"file": (name, data, "application/octet-stream")})
    assert r.status_code == status
    assert words in r.json()["detail"] and name in r.json()["detail"]


def test_missing_file_field(client):
    r = client.post("/api/caption", data={"other": "x"})
    assert r.status_code == 422 and "detail" in r.json()


def test_search_and_thumbnails(client):
    r = client.get("/api/search", params={"q": "circle", "limit": 2})
    hits = r.json()["results"]
    assert r.status_code == 200 and len(hits) == 2 and all("circle" in h["caption"] for h in hits)
    everything = client.get("/api/search", params={"q": "circle", "limit": 200}).json()
    assert r.json()["total"] == everything["total"] == len(everything["results"]) > 2  # the true count
    t = client.get(hits[0]["thumb"])
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(t.content)).size[0] <= 256


def test_thumbnails_only_for_library_photos(client):
    assert client.get("/api/thumb/999999").status_code == 404
    assert client.get("/api/thumb/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert client.get("/static/../../pyproject.toml").status_code == 404


def test_search_without_a_library(library):
    cap, _ = library
    c = TestClient(create_app(cap, None), base_url="http://localhost")
    assert c.get("/api/search", params={"q": "dog"}).status_code == 404
    assert c.get("/health").json()["library"] is None


def test_page_is_self_contained(client):
    html = client.get("/").text
    assert "<title>captioner</title>" in html
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    page = html + client.get("/static/app.js").text + client.get("/static/style.css").text
    assert "http://" not in page and "https://" not in page  # no CDN, no outside resource


@pytest.mark.parametrize("path", [
    "/static/%2e%2e/%2e%2e/%2e%2e/pyproject.toml", "/static/..%2f..%2f..%2fpyproject.toml", "/static/%2e%2e%2fapp.py",
    "/static/....//....//pyproject.toml", "/api/thumb/%2e%2e", "/api/thumb/-1", "/static//etc/passwd", "/static/%00"])
def test_no_path_traversal(client, path):
    r = client.get(path)
    assert r.status_code in (400, 404, 422), path
    assert b"[project]" not in r.content and b"root:" not in r.content and b"import" not in r.content


def test_a_busy_model_answers_503_with_retry_after(library):
    import threading
    import time

    cap, db = library

    class Slow:  # the real captioner, slowed down: one request holds the model for a while
        def __getattr__(self, name):
            return getattr(cap, name)

        def caption_tensor(self, x, **kw):
            time.sleep(1.0)
            return cap.caption_tensor(x, **kw)

    for batch_wait_ms in (0, 5):  # each request on its own, and batched: one arriving while the model runs waits
        c = TestClient(create_app(Slow(), db, queue_timeout=0.1, batch_wait_ms=batch_wait_ms),
                       base_url="http://localhost")
        statuses = []

        def post(c=c, statuses=statuses):
            r = c.post("/api/caption", files={"file": ("red.png", png_bytes(), "image/png")})
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

        threads = [threading.Thread(target=post) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.3)  # the second arrives while the first is being captioned
        for t in threads:
            t.join()
        codes = sorted(s for s, _, _ in statuses)
        assert codes == [200, 503], batch_wait_ms
        busy = next(x for x in statuses if x[0] == 503)
        assert busy[1] == "5" and "busy" in busy[2]["detail"]


def test_search_modes_and_search_by_photo(client, shapes):
    keyword = client.get("/api/search", params={"q": "red circle", "mode": "keyword", "limit": 50}).json()
    assert keyword["mode"] == "keyword" and all("red" in h["caption"] or "circle" in h["caption"]
                                                 for h in keyword["results"])
    for mode in ("model", "hybrid"):
        r = client.get("/api/search", params={"q": "red circle", "mode": mode, "limit": 50}).json()
        assert r["mode"] == mode and r["total"] == len(r["results"]) == 9  # every photo, ranked
        scores = [h["score"] for h in r["results"]]
        assert scores == sorted(scores, reverse=True)
    assert client.get("/api/search", params={"q": "dog", "mode": "vector"}).status_code == 422
    unknown = client.get("/api/search", params={"q": "zebra", "mode": "model"}).json()
    assert unknown["mode"] == "keyword" and "zebra" in unknown["note"]

    photo = Path(client.get("/api/search", params={"q": "circle", "limit": 1}).json()["results"][0]["path"])
    like = client.post("/api/search/like", files={"file": (photo.name, photo.read_bytes(), "image/png")},
                       params={"limit": 3}).json()
    assert like["mode"] == "like" and len(like["results"]) == 3  # the photo itself left out
    assert not any(h["path"].endswith(photo.name) for h in like["results"])
    own = client.get("/api/search", params={"q": "circle", "limit": 1}).json()["results"][0]["id"]
    same = client.get(f"/api/search/like/{own}", params={"limit": 3}).json()
    assert [h["id"] for h in same["results"]] == [h["id"] for h in like["results"]]
    assert client.get("/api/search/like/999999").status_code == 404
    bad = client.post("/api/search/like", files={"file": ("notes.txt", b"not an image", "text/plain")})
    assert bad.status_code == 415 and "notes.txt" in bad.json()["detail"]


def test_batcher_gathers_concurrent_requests_and_answers_each_its_own():
    import threading

    import torch

    from captioner.server.batcher import Batcher

    sizes = []

    def caption(x):  # each image's "caption" is its own value: a mix-up would show
        sizes.append(len(x))
        return [{"caption": str(int(v))} for v in x.flatten(1)[:, 0]]

    b = Batcher(caption, max_images=6, wait_s=0.2)
    answers = {}
    gate = threading.Barrier(8)

    def client(k):
        with b.arriving():
            gate.wait()
        images = [torch.full((3, 2, 2), float(10 * k + i)) for i in range(1 + k % 2)]  # 1 or 2 images
        answers[k] = [r["caption"] for r in b.submit(images, timeout=10)]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(answers[k] == [str(10 * k + i) for i in range(1 + k % 2)] for k in range(8))
    assert sum(sizes) == 12 and max(sizes) <= 6 and len(sizes) < 8  # gathered, never over the cap

    alone = Batcher(caption, wait_s=5.0)  # nobody else arriving: no wait at all
    t0 = time.perf_counter()
    assert alone.submit([torch.full((3, 2, 2), 7.0)], timeout=10)[0]["caption"] == "7"
    assert time.perf_counter() - t0 < 1.0

    def broken(x):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        Batcher(broken).submit([torch.zeros(3, 2, 2)], timeout=10)


def test_batching_server_answers_concurrent_uploads_each_with_its_own_caption(library, shapes):
    from concurrent.futures import ThreadPoolExecutor

    cap, db = library
    app = create_app(cap, db, batch_wait_ms=50)
    c = TestClient(app, base_url="http://localhost")
    photos = sorted(shapes.parent.glob("*_4.png"))[:6]
    alone = {p.name: cap.caption(p) for p in photos}
    uploads = [(p.name, p.read_bytes(), "image/png") for p in photos] + [("notes.png", b"not an image", "image/png"),
                                                                          ("empty.png", b"", "image/png")]

    def send(up):
        return up[0], c.post("/api/caption", files={"file": up})

    with ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(send, uploads))
    for name, want in alone.items():
        assert got[name].status_code == 200 and got[name].json()["results"][0]["caption"] == want, name
    assert got["notes.png"].status_code == 415 and "notes.png" in got["notes.png"].json()["detail"]
    assert got["empty.png"].status_code == 415


def test_a_photo_id_past_sqlites_integers_is_not_found(client):
    for pid in ("9223372036854775808", "99999999999999999999999"):
        r = client.get(f"/api/search/like/{pid}")
        assert r.status_code == 404 and "no photo" in r.json()["detail"]


@pytest.mark.parametrize("option,value", [("--batch-wait-ms", "inf"), ("--batch-wait-ms", "1e13"),
                                          ("--batch-wait-ms", "-1"), ("--max-upload-mb", "nan"),
                                          ("--max-upload-mb", "inf"), ("--max-upload-mb", "0"),
                                          ("--max-upload-mb", "-1"), ("--header-timeout", "nan"),
                                          ("--header-timeout", "inf"), ("--header-timeout", "-1")])
def test_every_server_option_is_checked_before_anything_starts(option, value, capsys):
    """Issue 32, item 17: an infinite batch wait killed the batcher thread; inf/nan upload sizes were
    tracebacks at start, and 0 or -1 refused every upload."""
    from captioner.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", option, value])
    assert e.value.code == 2 and option in capsys.readouterr().err


@pytest.mark.parametrize("setting", [{"batch_wait_ms": float("inf")}, {"max_upload_mb": float("nan")},
                                     {"max_upload_mb": 0}, {"queue_timeout": -1}, {"max_batch": 0}])
def test_create_app_checks_its_settings(setting):
    from captioner.errors import ConfigError
    from captioner.server.app import create_app

    with pytest.raises(ConfigError, match=next(iter(setting))):
        create_app(None, **setting)
