"""Images by address and on standard input (issue 30, item 7): fetched within bounds by the command
line and Python, and by a server from public addresses only."""

from __future__ import annotations

import io
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from captioner.cli import main
from captioner.errors import ImageError, ImageTooLarge


@pytest.fixture(scope="module")
def site(shapes):
    """A web site on 127.0.0.1: /photo.png, /hop/N (N redirects to the photo), /big, /missing, /text."""
    photo = sorted(shapes.parent.glob("*.png"))[0].read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/photo.png":
                self._send(200, photo, "image/png")
            elif self.path.startswith("/hop/"):
                n = int(self.path.rsplit("/", 1)[1])
                self.send_response(302)
                self.send_header("Location", "/photo.png" if n <= 1 else f"/hop/{n - 1}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path.startswith("/elsewhere"):  # a redirect to another address of this machine
                self.send_response(301)
                self.send_header("Location", f"http://127.0.0.2:{self.server.server_port}/photo.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/big":
                self._send(200, b"\xff" * 3_000_000, "image/jpeg")
            elif self.path == "/text":
                self._send(200, b"not a picture", "text/plain")
            else:
                self._send(404, b"", "text/plain")

        def _send(self, status, body, kind):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", photo
    server.shutdown()


def test_fetch_follows_a_few_redirects_within_a_size_and_only_http(site):
    from captioner.data.urls import MAX_REDIRECTS, fetch, is_url

    base, photo = site
    assert fetch(f"{base}/photo.png", 10**6) == photo
    assert fetch(f"{base}/hop/{MAX_REDIRECTS}", 10**6) == photo
    with pytest.raises(ImageError, match=f"more than {MAX_REDIRECTS} redirects"):
        fetch(f"{base}/hop/{MAX_REDIRECTS + 1}", 10**6)
    with pytest.raises(ImageTooLarge, match="3,000,000 bytes, more than 1,000,000"):
        fetch(f"{base}/big", 10**6)
    with pytest.raises(ImageError, match="answered 404"):
        fetch(f"{base}/missing", 10**6)
    for bad in ("file:///etc/passwd", "ftp://example.com/a.jpg", "http://"):
        with pytest.raises(ImageError, match="only http:// and https://|not a valid"):
            fetch(bad, 10**6)
    with pytest.raises(ImageError, match="cannot find the host"):
        fetch("http://no-such-host.invalid/a.jpg", 10**6)
    assert is_url("HTTPS://x/y.jpg") and not is_url("photos/https.jpg") and not is_url(b"http://x")


def test_fetch_for_a_server_refuses_its_own_network_at_every_redirect(site, monkeypatch):
    from captioner.data import urls

    base, photo = site
    for address in (f"{base}/photo.png", base.replace("127.0.0.1", "localhost") + "/photo.png"):
        with pytest.raises(ImageError, match="is a loopback address .* public addresses only"):
            urls.fetch(address, 10**6, public_only=True)
    # 127.0.0.1 taken for a public address: the first hop passes, the redirect to 127.0.0.2 does not
    real = urls._not_public
    monkeypatch.setattr(urls, "_not_public", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    assert urls.fetch(f"{base}/photo.png", 10**6, public_only=True) == photo
    with pytest.raises(ImageError, match="127.0.0.2 is a loopback address"):
        urls.fetch(f"{base}/elsewhere", 10**6, public_only=True)
    for ip in ("10.1.2.3", "192.168.1.1", "169.254.169.254", "::1", "fe80::1", "::ffff:127.0.0.1", "0.0.0.0"):
        assert real(urls.ipaddress.ip_address(ip)), ip
    assert real(urls.ipaddress.ip_address("93.184.216.34")) is None


def test_caption_takes_addresses_and_standard_input(site, trained, monkeypatch, capsys):
    from captioner import Captioner

    base, photo = site
    model = ["--model", str(trained / "best"), "--quiet"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(photo)))
    assert main(["caption", f"{base}/photo.png", "-", f"{base}/text", *model]) == 0
    out, err = capsys.readouterr()
    lines = [line.split("\t") for line in out.splitlines()]
    assert [name for name, _ in lines] == [f"{base}/photo.png", "-"] and lines[0][1] == lines[1][1]
    assert f"skipped {base}/text: not a readable image" in err
    assert main(["caption", f"{base}/photo.png", "--out", "x.csv", *model]) == 2
    assert "captioned to the terminal" in capsys.readouterr().err

    cap = Captioner.load(trained / "best", device="cpu")
    assert cap.caption(f"{base}/photo.png") == cap.caption(photo) == lines[0][1]
    with pytest.raises(ImageError, match="answered 404"):
        cap.caption(f"{base}/missing")


def test_the_server_fetches_addresses_from_public_networks_only(site, trained):
    from fastapi.testclient import TestClient

    from captioner import Captioner
    from captioner.server.app import create_app

    base, photo = site
    cap = Captioner.load(trained / "best", device="cpu")
    client = TestClient(create_app(cap), base_url="http://localhost")
    r = client.post("/api/caption", data={"url": [f"{base}/photo.png"]})
    assert r.status_code == 422 and "loopback address" in r.json()["detail"], r.text
    r = client.post("/api/caption", data={"url": [f"{base}/photo.png"]},
                    files={"file": ("a.png", photo, "image/png")})
    results = r.json()["results"]
    assert r.status_code == 200 and results[0]["caption"] and "loopback" in results[1]["error"]
    assert client.post("/api/caption").status_code == 422

    open_client = TestClient(create_app(cap, allow_private_urls=True, max_upload_mb=1), base_url="http://localhost")
    r = open_client.post("/api/caption", data={"url": [f"{base}/photo.png", f"{base}/big"]})
    results = r.json()["results"]
    assert r.status_code == 200 and results[0]["caption"] == cap.caption(photo)
    assert results[1]["filename"] == f"{base}/big" and "more than" in results[1]["error"]
