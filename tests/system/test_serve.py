"""gpunet serve (gpunet/serve.py): the JSON API over real sockets, every error path, concurrency,
and the command that starts it. The server runs in a thread of this process, on a free loopback
port."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import optional

Image = optional("PIL.Image", "cli")

import pictures  # noqa: E402  (tests/support/pictures.py)
import serve_load  # noqa: E402  (tests/support/serve_load.py)

import gpunet as gn  # noqa: E402
from gpunet import serve  # noqa: E402
from gpunet.data import pictures as images  # noqa: E402
from gpunet.data.pictures import mnist_style  # noqa: E402
from gpunet.training import predict, predict_proba  # noqa: E402


class Running:
    """A server on 127.0.0.1:<free port> in a background thread; `request` speaks HTTP to it."""

    def __init__(self, net, **kwargs):
        self.server = serve.make_server(net, "127.0.0.1", 0, quiet=True, **kwargs)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None):
        """(status, headers, decoded JSON or text) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            res = conn.getresponse()
            raw = res.read()
            kind = res.getheader("Content-Type", "")
            return res.status, res, json.loads(raw) if kind == "application/json" else raw.decode()
        finally:
            conn.close()

    def raw(self, data: bytes) -> bytes:
        """Send raw bytes, return all the server answers before it closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(data)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tiny():
    """A server for an untrained 784-16-10 net: the API's behaviour needs no real data."""
    running = Running(gn.mlp([784, 16, 10], seed=0, device="cpu"))
    yield running
    running.close()


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def drawn_one() -> Image.Image:
    img = Image.new("RGB", (120, 160), "white")
    img.paste((0, 0, 0), (55, 20, 67, 140))
    return img


def expected(net, pixels):
    return gn.to_numpy(predict_proba(net, pixels.reshape(1, -1)))[0]


# ------------------------------------------------------------------------------------------ answers
def test_health_and_page(tiny):
    status, _, doc = tiny.request("GET", "/health")
    assert status == 200
    assert doc == {
        "status": "ok",
        "model": "model",
        "inputs": 784,
        "classes": 10,
        "image_size": [28, 28],
    }
    status, res, page = tiny.request("GET", "/")
    assert status == 200 and res.getheader("Content-Type").startswith("text/html")
    for part in (
        '<canvas id="pad"',
        'id="clear"',
        'id="digit"',
        'id="bars"',
        'id="seen"',
        "pointerdown",
    ):
        assert part in page, part
    # self-contained: nothing is fetched from elsewhere
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//|@import|url\(", page)


def test_predict_a_picture(tiny):
    status, _, doc = tiny.request(
        "POST", "/predict", png(drawn_one()), {"Content-Type": "image/png"}
    )
    assert status == 200, doc
    pixels, _ = mnist_style(drawn_one())
    want = expected(tiny.server.predictor.net, pixels)
    assert doc["digit"] == int(want.argmax()) and doc["warnings"] == []
    np.testing.assert_allclose(doc["probabilities"], want, atol=1e-6)
    np.testing.assert_allclose(doc["input"], pixels, atol=5e-4)
    # JPEG with a phone's EXIF orientation, no Content-Type at all: sniffed as a picture
    jpeg = pictures.encode(drawn_one(), "jpeg-exif")
    status, _, doc = tiny.request("POST", "/predict", jpeg)
    assert status == 200 and np.abs(np.array(doc["input"]) - pixels).mean() < 0.05


def test_predict_json_pixels_are_used_as_they_are(tiny):
    pixels = np.zeros((28, 28), np.float32)
    pixels[4:24, 12:16] = 1.0
    want = expected(tiny.server.predictor.net, pixels)
    for body in (
        {"pixels": pixels.tolist()},
        {"pixels": (pixels * 255).astype(int).tolist()},
        {"pixels": pixels.reshape(-1).tolist()},
    ):
        status, _, doc = tiny.request(
            "POST", "/predict", json.dumps(body), {"Content-Type": "application/json"}
        )
        assert status == 200, doc
        np.testing.assert_allclose(doc["probabilities"], want, atol=1e-6)
        assert doc["input"] == pixels.tolist()


def test_keep_alive(tiny):
    conn = http.client.HTTPConnection("127.0.0.1", tiny.port, timeout=30)
    for _ in range(3):  # one connection, several requests: what the page does while drawing
        conn.request("POST", "/predict", png(drawn_one()), {"Content-Type": "image/png"})
        res = conn.getresponse()
        assert res.status == 200 and json.loads(res.read())["digit"] in range(10)
    conn.close()


# ------------------------------------------------------------------------------------------- errors
BLANK = png(Image.new("RGB", (60, 60), "white"))
PIXELS_OK = [
    [0.0] * 12 + [1.0] * 4 + [0.0] * 12
] * 28  # a bar: the faintest thing that is not blank


@pytest.mark.parametrize(
    "body, kind, status, message",
    [
        (b"", "image/png", 400, "empty body"),
        (b"not a picture at all", "image/png", 400, "the body is not a picture Pillow can read"),
        (BLANK, "image/png", 400, "no ink found: "),
        (png(drawn_one())[:200], "image/png", 400, "cannot decode the picture"),
        (b"{not json", "application/json", 400, "the body is not valid JSON"),
        (b"\xff\xfe", "application/json", 400, "the body is not valid JSON"),
        (
            b"[1, 2]",
            "application/json",
            400,
            'expected a JSON object {"pixels": [[...]]}, got list',
        ),
        (b'{"pixel": []}', "application/json", 400, "got dict with keys ['pixel']"),
        (
            json.dumps({"pixels": [[0.0] * 27] * 28}).encode(),
            "application/json",
            400,
            "pixels: expected 28 rows of 28 numbers, got an array of shape (28, 27)",
        ),
        (
            json.dumps({"pixels": [[0.0] * 28] * 27 + [[0.0]]}).encode(),
            "application/json",
            400,
            "ragged or non-numeric",
        ),
        (
            json.dumps({"pixels": [["a"] * 28] * 28}).encode(),
            "application/json",
            400,
            "ragged or non-numeric",
        ),
        (
            json.dumps({"pixels": [[float("nan")] * 28] * 28}).encode(),
            "application/json",
            400,
            "NaN or infinity",
        ),
        (
            json.dumps({"pixels": [[-3.0] * 28] * 28}).encode(),
            "application/json",
            400,
            "values in [0, 1] or 0..255",
        ),
        (
            json.dumps({"pixels": [[900] * 28] * 28}).encode(),
            "application/json",
            400,
            "values in [0, 1] or 0..255",
        ),
        # README's blank example: a blank field is refused as a blank picture is, never read as a
        # digit
        (
            json.dumps({"pixels": [[0] * 28] * 28}).encode(),
            "application/json",
            400,
            "no ink found: the pixels are one flat shade (0)",
        ),
        (
            json.dumps({"pixels": [[255] * 28] * 28}).encode(),
            "application/json",
            400,
            "one flat shade (1)",
        ),
        (
            json.dumps({"pixels": [[0.25 / 255] * 28] * 27 + [[0.0] * 28]}).encode(),
            "application/json",
            400,
            "no ink found",
        ),  # a quarter of a byte's step apart: still one shade
    ],
)
def test_bad_bodies(tiny, body, kind, status, message):
    got, _, doc = tiny.request("POST", "/predict", body, {"Content-Type": kind})
    assert got == status and set(doc) == {"error"}, doc
    assert (
        message in doc["error"] and "\n" not in doc["error"] and "Traceback" not in doc["error"]
    ), doc


def test_json_pixels_that_are_fine(tiny):  # the controls for the table above
    faint = [[0.0] * 28] * 27 + [
        [0.0] * 27 + [1 / 255]
    ]  # one pixel one byte step up: ink, if little
    for pixels in (PIXELS_OK, faint):
        body = json.dumps({"pixels": pixels})
        status, _, doc = tiny.request(
            "POST", "/predict", body, {"Content-Type": "application/json"}
        )
        assert status == 200, doc


def test_too_large(tiny, monkeypatch):
    monkeypatch.setattr(tiny.server, "max_body", 5000)
    status, res, doc = tiny.request(
        "POST", "/predict", b"\x00" * 6000, {"Content-Type": "image/png"}
    )
    assert status == 413 and doc == {"error": "body of 6000 bytes is too large (at most 5000)"}
    assert res.getheader("Connection") == "close"
    monkeypatch.setattr(images, "MAX_PIXELS", 100)  # a small file may still claim a huge picture
    status, _, doc = tiny.request(
        "POST", "/predict", png(drawn_one()), {"Content-Type": "image/png"}
    )
    assert status == 400 and "picture of 120x160 pixels is too large" in doc["error"]


@pytest.mark.parametrize(
    "request_bytes, status, message",
    [
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\r\n",
            411,
            "send a Content-Length header",
        ),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            411,
            "chunked bodies are not supported",
        ),
        (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n",
            400,
            "Content-Length: expected a non-negative integer, got 'lots'",
        ),
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -4\r\n\r\n", 400, "got '-4'"),
        (b"GARBAGE\r\n\r\n", 400, "Bad request"),
        (b"GET /health HTTP/9.9\r\n\r\n", 505, "Invalid HTTP version"),
    ],
)
def test_malformed_requests_get_json_errors(tiny, request_bytes, status, message):
    answer = tiny.raw(request_bytes).decode("latin-1")
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ") or head.startswith(f"HTTP/1.0 {status} "), head
    assert message in json.loads(body)["error"], body


@pytest.mark.parametrize(
    "method, path, status, message",
    [
        ("GET", "/nope", 404, "no such page: /nope"),
        ("POST", "/nope", 404, "no such endpoint: POST /nope"),
        ("GET", "/predict", 405, "/predict takes POST"),
        ("PUT", "/predict", 405, "method PUT not allowed"),
        ("DELETE", "/", 405, "method DELETE not allowed"),
    ],
)
def test_wrong_paths_and_methods(tiny, method, path, status, message):
    got, _, doc = tiny.request(method, path, b"x" if method in ("POST", "PUT") else None)
    assert got == status and message in doc["error"], doc


def test_a_bug_is_500_and_one_line(tiny, monkeypatch, capfd):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny.server.predictor, "predict", broken)
    status, _, doc = tiny.request(
        "POST", "/predict", png(drawn_one()), {"Content-Type": "image/png"}
    )
    assert status == 500 and doc == {"error": "internal error (RuntimeError)"}
    err = capfd.readouterr().err
    assert (
        "gpunet serve: internal error on POST /predict: RuntimeError: boom" in err
        and "Traceback" not in err
    )


# -------------------------------------------------------------------------------------- concurrency
def test_a_slow_client_does_not_block_the_others(tiny):
    with socket.create_connection(("127.0.0.1", tiny.port), timeout=30) as slow:
        slow.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789"
        )  # stalls
        started = time.perf_counter()
        status, _, _ = tiny.request("GET", "/health")
        assert status == 200 and time.perf_counter() - started < 5


def test_64_clients_posting_20_pictures_each_all_answered(tiny):
    """64 clients released at once, each posting 20 MNIST-like pictures on fresh connections: no
    request may fail. socketserver's listen backlog of 5 reset 157 of these 1,280 (measured
    2026-12-01)."""
    # dark strokes on white paper, encoded by serve_load's own PNG writer (what docker/test-image.sh
    # sends)
    strokes = [
        [
            [0 if (6 <= r < 22 and abs(c - 14 - k * (r - 14) // 4) < 2) else 255 for c in range(28)]
            for r in range(28)
        ]
        for k in range(-2, 3)
    ]
    bodies = [serve_load.png(rows) for rows in strokes]
    for rows, body in zip(strokes, bodies):  # the hand-written PNG is the picture it was given
        assert np.asarray(Image.open(io.BytesIO(body))).tolist() == rows
    want = {}
    for i, body in enumerate(bodies):
        pixels, _ = mnist_style(Image.open(io.BytesIO(body)))
        want[i] = int(expected(tiny.server.predictor.net, pixels).argmax())
    result = serve_load.hammer(
        "127.0.0.1", tiny.port, bodies, clients=64, per_client=20, timeout=60
    )
    assert result["failed"] == 0 and result["ok"] == 1280, result["failures"]
    assert {i: doc["digit"] for i, doc in result["answers"].items()} == want
    assert result["seconds"] < 240, result[
        "seconds"
    ]  # the bound keeps a stalled server from hanging the run


def test_400_idle_connections_do_not_lock_others_out(tiny):
    """400 connections that send nothing stay open while /health is answered at once. With a backlog
    of 5 the 400 connects alone took 62 s (refused SYNs are retried after 1, 3, 7, ... s); with
    1024, 0.3 s."""
    result = serve_load.idle_then_health("127.0.0.1", tiny.port, count=400, timeout=30)
    assert result["opened"] == 400 and result["health"] == 200, result
    assert result["seconds"] < 20, result  # 60x the 0.3 s measured, a third of the backlog-5 stall


def read_all(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "start, trickle",
    [
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a"),  # headers that never end
        # a body that never ends
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n", b"0"),
    ],
)
def test_a_trickling_request_is_cut_off_at_its_deadline_with_408(start, trickle):
    """The deadline is for the request as a whole: a byte every 0.1 s never times a read out, but
    the request is answered 408 once its 0.5 s are over, while other clients are served."""
    running = Running(gn.mlp([784, 16, 10], seed=0, device="cpu"), deadline=0.5)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as slow:
            started = time.perf_counter()
            slow.sendall(start)
            for _ in range(40):  # 4 s of trickling at most
                time.sleep(0.1)
                try:
                    slow.sendall(trickle)
                except OSError:
                    break
                if running.request("GET", "/health")[0] != 200:
                    break
                if select.select([slow], [], [], 0)[0]:
                    break
            answer = read_all(slow).decode("latin-1")
            took = time.perf_counter() - started
        head, _, body = answer.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 408 ") and "Connection: close" in head, answer
        late = "the request (headers and body) took longer than 0.5 s"
        assert json.loads(body) == {"error": late}
        assert 0.5 <= took < 3, took
    finally:
        running.close()


def test_an_idle_keep_alive_connection_is_closed_without_a_word():
    running = Running(gn.mlp([784, 16, 10], seed=0, device="cpu"), deadline=0.5)
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            first = s.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 "), first
            started = time.perf_counter()
            assert read_all(s) == b""  # closed after the deadline, without a word: it asked nothing
            assert 0.4 <= time.perf_counter() - started < 3
    finally:
        running.close()


def test_connections_beyond_the_bound_get_503_at_once():
    running = Running(gn.mlp([784, 16, 10], seed=0, device="cpu"), max_connections=3)
    try:
        idle = [socket.create_connection(("127.0.0.1", running.port), timeout=30) for _ in range(3)]
        time.sleep(0.2)  # the server has accepted the three
        status, _, doc = running.request("GET", "/health")
        assert status == 503 and doc == {"error": "busy: 3 connections are open; try again"}, doc
        idle.pop().close()
        time.sleep(0.2)
        assert running.request("GET", "/health")[0] == 200  # a place is free again
        for s in idle:
            s.close()
    finally:
        running.close()


def test_bytes_beyond_the_buffered_bound_get_503_and_the_count_returns_to_zero():
    """With at most 1 MiB of unfinished requests held: one upload holds 500 kB of its 600 kB body;
    a second upload's bytes would pass the bound, so it is answered 503 and closed, while the first,
    once whole, is answered as usual; a third hangs up halfway; after they close, nothing is held.
    Mutations: no bound (the second is answered 400 after its body), the count not taken off when a
    connection closes."""
    running = Running(gn.mlp([784, 16, 10], seed=0, device="cpu"), max_buffered=2**20)
    server = running.server

    def held(at_least=None, exactly=None, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = server.buffered
            if (at_least is not None and n >= at_least) or (exactly is not None and n == exactly):
                return n
            time.sleep(0.01)
        return server.buffered

    head = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 600000\r\n\r\n"
    )
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as first:
            first.sendall(head + b" " * 500_000)
            assert held(at_least=500_000) >= 500_000
            with socket.create_connection(("127.0.0.1", running.port), timeout=30) as second:
                second.sendall(head + b" " * 600_000)
                answer = read_all(second).decode("latin-1")
            status, _, body = answer.partition("\r\n\r\n")
            assert status.startswith("HTTP/1.1 503 ") and "Connection: close" in status, answer
            busy = "busy: too many bytes of requests are arriving at once; try again"
            assert json.loads(body) == {"error": busy}
            first.sendall(b" " * 100_000)  # whole now: an empty JSON document, 400
            reply = first.recv(65536).decode("latin-1")
            assert reply.startswith("HTTP/1.1 400 "), reply
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as third:
            third.sendall(head + b" " * 1000)  # then it hangs up with its request unfinished
            assert held(at_least=1000) >= 1000
        assert held(exactly=0) == 0
    finally:
        running.close()


def test_headers_too_long_get_431(tiny, monkeypatch):
    monkeypatch.setattr(serve.connections, "MAX_HEAD", 1000)
    answer = tiny.raw(b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 2000).decode("latin-1")
    assert answer.startswith("HTTP/1.1 431 "), answer
    assert "request headers longer than 1000 bytes" in answer, answer


def test_pipelined_requests_are_answered_in_order(tiny):
    with socket.create_connection(("127.0.0.1", tiny.port), timeout=30) as s:
        s.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n\r\n"
        )
        answer = read_all(s).decode("latin-1")
    assert answer.startswith("HTTP/1.1 200 ") and answer.count("HTTP/1.1 ") == 2, answer
    assert "HTTP/1.1 404 " in answer.split("\r\n\r\n", 1)[1], answer


@pytest.mark.slow
def test_many_requests_at_once_all_answered_correctly(mnist_model):
    """64 requests from 16 threads (pictures and JSON pixels of MNIST test digits) against the real
    model: every answer equals the prediction made directly, and the digits are read as well as the
    model can."""
    running = Running(mnist_model.net)
    try:
        digits, labels = mnist_model.x_test[:64].reshape(-1, 28, 28), mnist_model.y_test[:64]
        photos = pictures.photographed(digits[:32], labels[:32], seed=3)
        bodies = [
            (pictures.encode(img, "png" if form == "rgba" else form, i), "image/png")
            for i, (img, _, form) in enumerate(photos)
        ]
        bodies += [
            (json.dumps({"pixels": d.tolist()}).encode(), "application/json") for d in digits[32:]
        ]

        def ask(i):
            return running.request("POST", "/predict", bodies[i][0], {"Content-Type": bodies[i][1]})

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(64)))
        assert all(status == 200 for status, _, _ in answers), [
            doc for s, _, doc in answers if s != 200
        ][:3]
        for _, _, doc in answers:
            want = expected(mnist_model.net, np.array(doc["input"], np.float32))
            assert doc["digit"] == int(want.argmax())
            np.testing.assert_allclose(
                doc["probabilities"], want, atol=1e-3
            )  # the input was rounded
        read = np.mean([doc["digit"] == label for (_, _, doc), label in zip(answers, labels)])
        direct = np.mean(gn.to_numpy(predict(mnist_model.net, mnist_model.x_test[:64])) == labels)
        assert read >= direct - 2 / 64, (read, direct)
    finally:
        running.close()


# ------------------------------------------------------------------------------------- the command
def gpunet(*args, **kwargs):
    env = dict(os.environ)
    env.pop("GPUNET_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "gpunet", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl+C, and `docker stop`
def test_serve_command_starts_answers_and_stops(tmp_path, stop):
    gn.mlp([784, 16, 10], seed=0, device="cpu").save(tmp_path / "m.npz")
    proc = gpunet("serve", tmp_path / "m.npz", "--port", "0")
    try:
        line = proc.stdout.readline()
        match = re.match(
            r"gpunet serve: m\.npz on http://127\.0\.0\.1:(\d+)/ \(Ctrl\+C to stop\)", line
        )
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=30)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["model"] == "m.npz"
        conn.close()
        # the port is taken now: a second server says so in one line
        again = gpunet("serve", tmp_path / "m.npz", "--port", match.group(1))
        _, err = again.communicate(timeout=60)
        assert again.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"cannot listen on 127.0.0.1:{match.group(1)}" in err
    finally:
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "gpunet serve: stopped" in out and "Traceback" not in err, err


def test_serve_command_mistakes(tmp_path):
    res = gpunet("serve", tmp_path / "missing.npz")
    _, err = res.communicate(timeout=60)
    assert res.returncode == 2 and err.count("\n") == 1 and "missing.npz" in err, err
    res = gpunet("serve", tmp_path / "m.npz", "--port", "http")
    _, err = res.communicate(timeout=60)
    assert (
        res.returncode == 2
        and "argument --port: expected a non-negative integer, got 'http'" in err
    ), err
    res = gpunet("serve", tmp_path / "m.npz", "--max-buffered", "8")
    _, err = res.communicate(timeout=60)
    assert res.returncode == 2 and err.count("\n") == 1, err
    assert "argument --max-buffered: expected a whole number of MiB >= 16, got '8'" in err, err


def test_serve_command_holds_at_most_max_buffered_mib(tmp_path):
    """``gpunet serve --max-buffered 16``: three unfinished 7 MB uploads would hold 21 MB, so the
    one whose bytes pass 16 MiB is answered 503 (whichever the server reads last) and the other
    two wait for the rest of their bodies. Mutation: the flag not passed on (512 MiB: all three
    wait, none is answered)."""
    gn.mlp([784, 16, 10], seed=0, device="cpu").save(tmp_path / "m.npz")
    proc = gpunet("serve", tmp_path / "m.npz", "--port", "0", "--max-buffered", "16")
    uploads = []
    try:
        port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 7500000\r\n\r\n"
        for _ in range(3):
            uploads.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            uploads[-1].sendall(head + b" " * 7_000_000)
        answered, _, _ = select.select(uploads, [], [], 10)
        assert len(answered) == 1, f"{len(answered)} of 3 uploads answered, expected 1"
        answer = read_all(answered[0]).decode("latin-1")
        assert answer.startswith("HTTP/1.1 503 ") and "too many bytes" in answer, answer
        assert select.select(uploads, [], [], 0.5)[0] == answered  # the other two still wait
    finally:
        for s in uploads:
            s.close()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
