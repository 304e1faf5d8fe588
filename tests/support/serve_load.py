"""Load on ``gpunet serve`` from outside: many clients posting pictures at once, and many idle
connections.

Standard library only, so that docker/test-image.sh runs it with any host Python >= 3.8 against the
server in the container, and tests/system/test_serve.py against a server in its own process:

    python3 tests/support/serve_load.py --url http://127.0.0.1:8000 --data /path/to/mnist --clients
    64 --pictures 20 python3 tests/support/serve_load.py --url http://127.0.0.1:8000 --slowloris
3000  # until Enter

Every picture goes on a fresh connection, all clients released at the same instant: the burst of
connections that overflowed the standard library's listen backlog of 5 (88 of 1,280 requests reset,
measured 2026-11-30). Exit status 0 when every request was answered 200 with a digit, 1 otherwise
(the failures are printed).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import http.client
import json
import selectors
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit


def png(rows: list) -> bytes:
    """A greyscale 8-bit PNG of ``rows`` (lists of ints 0..255, all of one length), encoded by
    hand."""
    height, width = len(rows), len(rows[0])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\x00" + bytes(row) for row in rows)  # filter type 0 on every scanline
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def mnist_pictures(data_dir, count: int) -> list:
    """The first ``count`` MNIST test digits as PNG bytes, drawn as a person would: dark ink on
    white paper."""
    folder = Path(data_dir)
    path = next(
        (
            p
            for p in (folder / "t10k-images-idx3-ubyte", folder / "t10k-images-idx3-ubyte.gz")
            if p.exists()
        ),
        None,
    )
    if path is None:
        raise FileNotFoundError(f"no t10k-images-idx3-ubyte[.gz] in {folder}")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051:
            raise ValueError(f"{path}: not an IDX image file (magic {magic})")
        data = f.read(min(count, n) * rows * cols)
    size = rows * cols
    return [
        png(
            [
                [255 - v for v in data[i * size + r * cols : i * size + (r + 1) * cols]]
                for r in range(rows)
            ]
        )
        for i in range(len(data) // size)
    ]


def post(host: str, port: int, body: bytes, timeout: float = 60) -> tuple:
    """(status, decoded JSON) of one POST /predict of a PNG on a fresh connection."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
        res = conn.getresponse()
        return res.status, json.loads(res.read())
    finally:
        conn.close()


def hammer(
    host: str, port: int, bodies: list, clients: int = 64, per_client: int = 20, timeout: float = 60
) -> dict:
    """``clients`` threads released together, each posting ``per_client`` pictures (body i %
    len(bodies)). Returns {"requests", "ok", "failures": [first 10 "client/picture: reason"],
    "answers": {i: doc}, "seconds"}."""
    gate = threading.Barrier(clients)
    lock = threading.Lock()
    ok, failures, answers = [0], [], {}

    def client(c):
        gate.wait()
        for k in range(per_client):
            i = (c * per_client + k) % len(bodies)
            try:
                status, doc = post(host, port, bodies[i], timeout)
                good = status == 200 and doc.get("digit") in range(10)
                reason = "" if good else f"status {status}: {doc}"
            except (
                Exception
            ) as exc:  # a reset, a refused or timed-out connection: the failures counted
                good, doc, reason = False, None, f"{type(exc).__name__}: {exc}"
            with lock:
                if good:
                    ok[0] += 1
                    answers.setdefault(i, doc)
                else:
                    failures.append(f"client {c} picture {k}: {reason}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "requests": clients * per_client,
        "ok": ok[0],
        "failures": failures[:10],
        "failed": len(failures),
        "answers": answers,
        "seconds": time.perf_counter() - started,
    }


def idle_then_health(host: str, port: int, count: int = 400, timeout: float = 30) -> dict:
    """Open ``count`` connections that send nothing, then ask GET /health on one more while they
    stay open. Returns {"opened", "health": status or the error, "seconds"} (the idle ones are
    closed before returning)."""
    idle = []
    started = time.perf_counter()
    try:
        for _ in range(count):
            idle.append(socket.create_connection((host, port), timeout=timeout))
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            res = conn.getresponse()
            health = (
                res.status
                if json.loads(res.read()).get("status") == "ok"
                else f"{res.status}, not ok"
            )
        except Exception as exc:
            health = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
    finally:
        for s in idle:
            s.close()
    return {"opened": len(idle), "health": health, "seconds": time.perf_counter() - started}


def slowloris(host: str, port: int, count: int, stop: threading.Event, timeout: float = 30) -> dict:
    """``count`` connections that each send one more byte of a header that never ends, once a
    second, until ``stop`` is set; a connection the server answers and closes is opened again at
    once, so that ``count`` trickle all along. Returns {"opened", "statuses": {status: answers},
    "errors": [first 10]}."""
    selector = selectors.DefaultSelector()
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
    statuses, errors, opened = collections.Counter(), [], [0]

    def connect():
        try:
            s = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            errors.append(f"connect: {type(exc).__name__}: {exc}")
            return
        s.setblocking(False)
        try:  # the first byte at once, the next ones with the others' once a second
            s.send(head[:1])
        except OSError:
            pass
        selector.register(s, selectors.EVENT_READ, [1, bytearray()])  # [bytes sent, bytes answered]
        opened[0] += 1

    def answered(key):  # readable: an answer, the server's close, or a reset
        s, got = key.fileobj, key.data[1]
        try:
            data = s.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            got += b"" if got else type(exc).__name__.encode()
        got += data
        if data:
            return
        first = bytes(got).split(b"\r\n", 1)[0].split()
        status = (
            int(first[1]) if len(first) > 1 and first[1].isdigit() else got[:40].decode("latin-1")
        )
        statuses[status or "closed without an answer"] += 1
        selector.unregister(s)
        s.close()
        connect()

    for _ in range(count):
        connect()
    try:
        while not stop.is_set():
            tick = time.monotonic() + 1
            for key in list(selector.get_map().values()):
                sent = key.data[0]
                try:  # one more byte: "GET /health ..." and then 'a' for ever
                    key.fileobj.send(head[sent : sent + 1] if sent < len(head) else b"a")
                    key.data[0] += 1
                except OSError:
                    pass  # answered and closed: read below
            while (left := tick - time.monotonic()) > 0 and not stop.is_set():
                for key, _ in selector.select(min(left, 0.1)):
                    answered(key)
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return {"opened": opened[0], "statuses": dict(statuses), "errors": errors[:10]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--data", help="folder with MNIST's t10k-images-idx3-ubyte[.gz]")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--pictures", type=int, default=20, help="pictures per client")
    p.add_argument(
        "--idle", type=int, default=400, help="idle connections held open during a /health"
    )
    p.add_argument(
        "--slowloris",
        type=int,
        metavar="N",
        help="instead: N trickling connections "
        "until a line (or the end) on stdin, then their outcome as one JSON line",
    )
    args = p.parse_args(argv)
    where = urlsplit(args.url)
    host, port = where.hostname, where.port or 80
    if args.slowloris:
        stop = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
        print(json.dumps(slowloris(host, port, args.slowloris, stop)), flush=True)
        return 0
    if not args.data:
        p.error("--data is needed for the load")
    result = hammer(host, port, mnist_pictures(args.data, 100), args.clients, args.pictures)
    print(
        f"serve_load: {result['ok']} of {result['requests']} requests answered 200 "
        f"({args.clients} clients x {args.pictures} pictures, {result['seconds']:.1f} s)"
    )
    for line in result["failures"]:
        print(f"serve_load: failed: {line}")
    idle = idle_then_health(host, port, args.idle)
    print(
        f"serve_load: {idle['opened']} idle connections open, GET /health -> {idle['health']} "
        f"({idle['seconds']:.1f} s)"
    )
    return 0 if result["failed"] == 0 and idle["health"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
