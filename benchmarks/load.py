"""A bounded load test of `captioner serve` on loopback.

    python benchmarks/load.py                          # 8 clients, 500 requests, the shipped model
    python benchmarks/load.py --clients 8 --requests 500 --model runs/NAME/best --json
    python benchmarks/load.py --batch-wait-ms 0 5 10         # request batching off, then on (wait 5, 10 ms)
    python benchmarks/load.py --batch-wait-ms 5 --requests 400 --rounds 10   # a soak: does memory level off?
    python benchmarks/load.py --photo examples/*.jpg ...     # several photos (sizes), in turn

Starts the server in a child process, warms it up, then has CLIENTS threads send REQUESTS
requests in all: most upload a real photo to POST /api/caption (expecting 200 and a caption),
one in ten uploads a file that is not an image (expecting a 415 JSON error), and one in ten asks
GET /health. A request fails when the status or the body is not the expected one, or the
connection breaks. The server's resident memory is read from /proc every 25 requests, so a leak
shows as growth from the first reading to the last. Prints a table (and appends it to
benchmarks/RESULTS.md unless --no-record); --json prints one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def one_request(url: str, k: int, photos: list[bytes]) -> tuple[bool, float, str]:
    """Request number k -> (as expected, seconds, what went wrong). Photo requests take the photos
    in turn."""
    kind = "health" if k % 10 == 5 else "bad" if k % 10 == 9 else "photo"
    photo = photos[k % len(photos)]
    if kind == "health":
        req = urllib.request.Request(url + "/health")
        expect = 200
    else:
        body, ctype = multipart("photo.jpg" if kind == "photo" else "notes.jpg",
                                photo if kind == "photo" else b"these are my notes, not a photo")
        req = urllib.request.Request(url + "/api/caption", data=body, headers={"Content-Type": ctype})
        expect = 200 if kind == "photo" else 415
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, payload = r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        status, payload = e.code, json.loads(e.read() or b"{}")
    except OSError as e:
        return False, time.perf_counter() - t0, f"{kind}: {e}"
    seconds = time.perf_counter() - t0
    if status != expect:
        return False, seconds, f"{kind}: status {status}, expected {expect}"
    if kind == "photo" and not payload.get("results", [{}])[0].get("caption"):
        return False, seconds, f"{kind}: no caption in {payload}"
    if kind == "bad" and "detail" not in payload:
        return False, seconds, f"{kind}: no JSON error in {payload}"
    return True, seconds, ""


def run(model: str | None, clients: int, requests: int, photos: list[Path], batch_wait_ms: float = 5.0,
        extra: list[str] = (), log: Path | None = None, rounds: int = 1) -> dict:
    """One server (`captioner serve ... *extra`, its output kept in `log` when given) under load,
    `rounds` times over (the same server: memory that levels off shows as the same RSS after each
    round) -> the row's figures, the last round's timings."""
    from captioner.server.background import serve_in_background

    data = [p.read_bytes() for p in photos]
    args = (["--model", model] if model else []) + ["--batch-wait-ms", str(batch_wait_ms), *extra]
    with serve_in_background(*args, log=log) as server:
        for _ in range(5):  # warm-up: the first requests load lazily initialised parts
            one_request(server.url, 0, data)
        rss = [rss_mb(server.pid)]
        lock, done, results = threading.Lock(), [0], []

        def task(k: int) -> tuple[bool, float, str]:
            out = one_request(server.url, k, data)
            with lock:
                done[0] += 1
                if done[0] % 25 == 0:
                    rss.append(rss_mb(server.pid))
            return out

        after = []  # RSS at the end of each round
        for _ in range(rounds):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(task, range(requests)))
            wall = time.perf_counter() - t0
            rss.append(rss_mb(server.pid))
            after.append(round(rss[-1], 1))
    lat = sorted(s for _, s, _ in results)
    failures = [why for ok, _, why in results if not ok]
    return {"batch_wait_ms": batch_wait_ms, "clients": clients, "requests": requests, "failed": len(failures),
            "first_failures": failures[:5],
            "seconds": round(wall, 2), "requests_per_s": round(requests / wall, 1),
            "p50_ms": round(statistics.median(lat) * 1000, 1),
            "p95_ms": round(lat[int(0.95 * (len(lat) - 1))] * 1000, 1),
            "rss_first_mb": round(rss[0], 1), "rss_max_mb": round(max(rss), 1), "rss_last_mb": round(rss[-1], 1),
            "rss_after_rounds_mb": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the shipped model)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--photo", type=Path, nargs="+", default=[ROOT / "examples" / "coffee.jpg"],
                    help="photos to upload, in turn (default: examples/coffee.jpg)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="send the requests this many times to the same server (a soak: RSS after each round)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--batch-wait-ms", type=float, nargs="+", default=[0.0, 5.0],
                    help="server settings to compare in this run (0: each request its own model call; default 0 5)")
    a = ap.parse_args()
    runs = [run(a.model, a.clients, a.requests, a.photo, w, rounds=a.rounds) for w in a.batch_wait_ms]
    soak = f", {a.rounds} rounds to the same server (timings: the last round)" if a.rounds > 1 else ""
    shown = ", ".join(p.name for p in a.photo)
    lines = [f"Model: {a.model or 'shipped'}; {a.clients} concurrent clients, {a.requests} requests{soak} (8 in 10 "
             f"upload a photo ({shown}, in turn), 1 in 10 a non-image expecting 415, 1 in 10 GET /health), loopback; "
             "one server per row, started fresh, rows measured one after the other in this run.", "",
             "| request batching | failed | requests/s | p50 | p95 | server RSS after warm-up -> peak -> end |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        batching = f"on, wait <= {r['batch_wait_ms']:g} ms" if r["batch_wait_ms"] else "off"
        lines.append(f"| {batching} | **{r['failed']}** | {r['requests_per_s']} | {r['p50_ms']} ms | "
                     f"{r['p95_ms']} ms | {r['rss_first_mb']:,.0f} -> {r['rss_max_mb']:,.0f} -> "
                     f"{r['rss_last_mb']:,.0f} MB |")
    if a.rounds > 1:
        lines += ["", "Server RSS after each round: " + "; ".join(
            f"{'batching on' if r['batch_wait_ms'] else 'batching off'}: "
            + " -> ".join(f"{x:,.0f}" for x in r["rss_after_rounds_mb"]) + " MB" for r in runs)]
    if len(runs) > 1:
        ratio = runs[-1]["requests_per_s"] / runs[0]["requests_per_s"]
        lines += ["", f"Requests/s, last row against the first: **{ratio:.2f}x**; p95 {runs[0]['p95_ms']} -> "
                  f"{runs[-1]['p95_ms']} ms."]
    for r in runs:
        if r["first_failures"]:
            lines += ["", "First failures: " + "; ".join(r["first_failures"])]
    if not a.no_record:
        import torch
        from bench import report

        report("Server under load", lines, torch.device("cpu"))
    else:
        print("\n".join(lines))
    if a.json:
        print(json.dumps(runs if len(runs) > 1 else runs[0]))
    sys.exit(1 if any(r["failed"] for r in runs) else 0)


if __name__ == "__main__":
    main()
