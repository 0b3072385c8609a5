"""Images by address: `captioner caption https://...`, `Captioner.caption("https://...")` and the
server's `url` field fetch the bytes here, then read them as any uploaded file (images.open_rgb).

Only http and https; at most `max_bytes`, `MAX_REDIRECTS` redirects and `timeout` seconds in all.
The command line and Python fetch whatever address their user gives. A server fetches for
strangers, so it passes `public_only`: every address a name resolves to must be a public one
(not loopback, private, link-local, multicast or reserved), checked again at each redirect, and the
connection goes to the address that was checked (a name that resolves differently a moment later
cannot turn the server against its own network). Proxies from the environment are not used.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from urllib.parse import urljoin, urlsplit

from captioner.errors import ImageError, ImageTooLarge

MAX_REDIRECTS = 5
TIMEOUT = 20.0  # seconds for the whole fetch, redirects included
SCHEMES = ("http", "https")


def is_url(text: object) -> bool:
    """Whether `text` is an address to fetch rather than a file's path."""
    return isinstance(text, str) and text[:8].lower().startswith(("http://", "https://"))


def fetch(url: str, max_bytes: int, *, timeout: float = TIMEOUT, public_only: bool = False) -> bytes:
    """The bytes at `url`, or an ImageError naming it (ImageTooLarge past `max_bytes`)."""
    deadline = time.monotonic() + timeout
    address = url
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(address)
        if parts.scheme.lower() not in SCHEMES or not parts.hostname:
            raise ImageError(f"{url}: only http:// and https:// addresses are fetched")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise ImageError(f"{url}: not a valid address") from None
        ip = _resolve(url, parts.hostname, port, public_only)
        conn = _connection(parts.scheme.lower(), parts.hostname, port, ip, max(0.1, deadline - time.monotonic()))
        try:
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                         headers={"User-Agent": "captioner", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                address = urljoin(address, resp.getheader("Location"))
                continue
            if resp.status != 200:
                raise ImageError(f"{url}: the server answered {resp.status} {resp.reason}")
            return _read(url, resp, max_bytes, deadline)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, TLS ...
            raise ImageError(f"{url}: cannot be fetched ({_why(e)})") from None
        finally:
            conn.close()
    raise ImageError(f"{url}: more than {MAX_REDIRECTS} redirects")


def _resolve(url: str, host: str, port: int, public_only: bool) -> str:
    """The address to connect to: the first `host` resolves to, all of them public if asked."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise ImageError(f"{url}: cannot find the host {host!r}") from None
    ips = [info[4][0] for info in infos]
    if public_only:
        for ip in ips:
            kind = _not_public(ipaddress.ip_address(ip.split("%")[0]))
            if kind:
                raise ImageError(f"{url}: {host} is a {kind} address ({ip}); this server fetches public addresses "
                                 "only (its operator can allow others: captioner serve --allow-private-urls)")
    return ips[0]


def _not_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None


def _connection(scheme: str, host: str, port: int, ip: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to `ip` that speaks to `host` (its Host header, and its certificate for https)."""
    if scheme == "https":
        return _PinnedHTTPS(host, port, ip, timeout)
    return _PinnedHTTP(host, port, ip, timeout)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float):
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def _read(url: str, resp: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    """The body, a piece at a time: never more than `max_bytes`, never past `deadline`."""
    declared = resp.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(f"{url}: {int(declared):,} bytes, more than {max_bytes:,}")
    parts, size = [], 0
    while chunk := resp.read(65_536):
        size += len(chunk)
        if size > max_bytes:
            raise ImageTooLarge(f"{url}: more than {max_bytes:,} bytes")
        if time.monotonic() > deadline:
            raise ImageError(f"{url}: cannot be fetched (not complete within the time-out)")
        parts.append(chunk)
    return b"".join(parts)


def _why(e: BaseException) -> str:
    if isinstance(e, TimeoutError | socket.timeout):
        return "timed out"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0][:200]
