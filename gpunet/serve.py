"""``gpunet serve``: a draw-a-digit page and a JSON API for one model (nothing fetched from the
internet, ever). The connections are gpunet.connections' (one reader thread, a fixed pool of
handler threads, a deadline per request, a bound on open connections).

    GET  /          the page (gpunet/page.html: a canvas, the predicted digit, ten bars, the input
    seen) GET  /health    {"status": "ok", "model": NAME, "inputs": 784, "classes": 10,
    "image_size": [28, 28]} POST /predict   body: PNG/JPEG bytes (any picture Pillow reads; made
                    MNIST-style, see gpunet.data.pictures) or JSON {"pixels": [[...], ...]} (rows x
                    cols numbers in [0, 1] or 0..255, used as is) -> {"digit": d, "top3": [{"digit",
                        "probability"} x 3], "probabilities": [C floats], "warnings": [...],
"input": [[rows x cols]]} (gpunet.predictions.prediction + input)

Every error is JSON {"error": "one line"} with its status (400 bad body, 404, 405, 408 request not
whole within the deadline, 411 no length, 413 too large, 431 headers too long, 500 a bug, 503 too
many connections); no traceback reaches a client or the log. Only the command line imports this
module.
"""

from __future__ import annotations

import io
import json
import queue
import signal
import sys
import threading
from http import HTTPStatus
from importlib import resources

import numpy as np

from . import connections
from .backend import to_numpy
from .data import DataError
from .data.pictures import image_size, mnist_style, to_unit_scale
from .predictions import prediction
from .training import predict_proba

MAX_BODY = (
    8 * 2**20
)  # bytes: a phone photo fits; anything bigger is refused (413) before it is read
MAX_ROWS = 256  # rows in one forward pass of the device worker, when that many requests wait
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(ValueError):
    """The request body cannot be used; the message is the one line the client gets (status 400)."""


class Job:
    """One request's rows for the device worker: x (k, features) on the host in the net's dtype;
    the worker sets ``result`` ((k, classes) NumPy) or ``error``, then ``done``."""

    __slots__ = ("done", "error", "result", "x")

    def __init__(self, x: np.ndarray):
        self.x, self.done = x, threading.Event()
        self.result: np.ndarray = x[:0]  # replaced by the worker
        self.error: Exception | None = None


class DeviceWorker:
    """The one thread that runs the network, fed by a queue.

    CuPy keeps a cuBLAS handle per thread: with the forward pass in each request's thread, every
    thread paid ``cublasCreate`` and its end a device-synchronising ``cublasDestroy``; one thread is
    one handle. ``predict_proba`` also switches the network's train/eval mode and layers keep
    per-call buffers, so one thread at a time may run it anyway. When requests pile up, the worker
    takes every waiting one (up to ``max_rows`` rows) into one forward pass and hands each its rows.
    """

    def __init__(self, net, max_rows: int = MAX_ROWS):
        self.net, self.max_rows = net, max_rows
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.batches = 0  # forward passes run
        self._thread = threading.Thread(target=self._run, name="gpunet-serve-device", daemon=True)
        self._thread.start()

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """x (k, features) host array in the net's dtype -> (k, classes) NumPy probabilities."""
        job = Job(x)
        self.queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        waiting: list = []  # a job taken from the queue that did not fit into the last batch
        while True:
            batch = [waiting.pop() if waiting else self.queue.get()]
            if batch[0] is None:
                return
            rows = len(batch[0].x)
            while rows < self.max_rows:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None or rows + len(job.x) > self.max_rows:
                    waiting.append(job)
                    break
                batch.append(job)
                rows += len(job.x)
            self._forward(batch)

    def _forward(self, batch: list) -> None:
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([job.x for job in batch])
            probs = to_numpy(predict_proba(self.net, x))
            self.batches += 1
            start = 0
            for job in batch:
                job.result, start = probs[start : start + len(job.x)], start + len(job.x)
        except Exception as exc:  # the request threads answer it (500, one line)
            for job in batch:
                job.error = exc
        finally:
            for job in batch:
                job.done.set()


class Predictor:
    """One loaded network, shared by every request thread.

    Pictures are prepared in the calling thread (in parallel); the forward pass runs on the
    network's one DeviceWorker.
    """

    def __init__(self, net, name: str = "model", max_rows: int = MAX_ROWS):
        self.net, self.name = net, name
        self.size = image_size(net.in_features)
        self.classes = net.out_features
        self.worker = DeviceWorker(net, max_rows)

    def info(self) -> dict:
        return {
            "status": "ok",
            "model": self.name,
            "inputs": int(self.net.in_features),
            "classes": self.classes,
            "image_size": list(self.size),
        }

    def from_picture(self, body: bytes) -> dict:
        """PNG/JPEG (or any Pillow-readable) bytes -> the prediction dict (see the module
        docstring)."""
        if min(self.size) < 4:
            raise BadRequest(
                f"this model takes {self.net.in_features} inputs, not a square image: "
                f"send JSON pixels instead of a picture"
            )
        from PIL import Image  # Pillow is needed for pictures only

        try:
            img = Image.open(io.BytesIO(body))
        except Exception as exc:  # Pillow raises many types for bytes that are no picture
            raise BadRequest(
                f"the body is not a picture Pillow can read ({type(exc).__name__}); send PNG or "
                f'JPEG bytes, or JSON {{"pixels": [[...]]}} with Content-Type: application/json'
            ) from exc
        try:
            with img:
                pixels, warnings = mnist_style(img, self.size)
        except DataError as exc:
            raise BadRequest(str(exc)) from exc
        except Exception as exc:  # a truncated or corrupt picture fails while decoding
            raise BadRequest(f"cannot decode the picture ({type(exc).__name__}: {exc})") from exc
        return self.predict(pixels, warnings)

    def from_json(self, body: bytes) -> dict:
        """JSON {"pixels": rows x cols numbers} -> the prediction dict; the pixels are used as they
        are."""
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or "pixels" not in doc:
            raise BadRequest(
                f'expected a JSON object {{"pixels": [[...]]}}, got {type(doc).__name__}'
                + (f" with keys {sorted(doc)}" if isinstance(doc, dict) else "")
            )
        rows, cols = self.size
        try:
            arr = np.array(doc["pixels"], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise BadRequest(
                f"pixels: expected {rows} rows of {cols} numbers, got ragged or non-numeric values"
            ) from exc
        if arr.shape not in ((rows, cols), (rows * cols,)):
            raise BadRequest(
                f"pixels: expected {rows} rows of {cols} numbers, got an array of shape {arr.shape}"
            )
        try:
            pixels = to_unit_scale(arr, "pixels")
        except DataError as exc:
            raise BadRequest(str(exc)) from exc
        if (
            np.ptp(pixels) < 0.5 / 255
        ):  # not even half a byte's step between two pixels: a blank field
            raise BadRequest(
                f"no ink found: the pixels are one flat shade ({float(pixels.flat[0]):g}); send "
                f"light ink on black, as MNIST's digits are"
            )
        return self.predict(pixels.reshape(rows, cols), [])

    def predict(self, pixels: np.ndarray, warnings: list) -> dict:
        """pixels float32 (rows, cols) -> the prediction (see the module docstring) with its
        "input"."""
        x = pixels.reshape(1, -1).astype(self.net.dtype, copy=False)
        probs = self.worker.probabilities(x)[0]
        return {**prediction(probs, warnings), "input": np.round(pixels, 3).tolist()}


def page() -> bytes:
    """The self-contained page (HTML, CSS and JavaScript in one file, no external resources)."""
    return resources.files(__package__).joinpath("page.html").read_bytes()


class Handler(connections.BufferedHandler):
    """Routes the three paths; every answer is JSON except the page."""

    server_version = "gpunet-serve"
    sys_version = ""
    protocol_version = "HTTP/1.1"  # keep-alive: the page sends a request per change while drawing
    default_request_version = (
        "HTTP/1.0"  # a malformed request line still gets a status line and JSON
    )

    # -- answers ------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in extra:
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: dict, extra=()):
        self._send(status, json.dumps(doc).encode(), "application/json", extra)

    def send_error(self, code, message=None, explain=None):
        """The base class's own errors (malformed request line, headers too long, ...) as JSON
        too."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._json(code, {"error": message or phrase})

    def log_message(self, format, *args):  # one line per request, unless the server is quiet
        if not getattr(self.server, "quiet", False):
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # -- routes -------------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, page(), "text/html; charset=utf-8")
        elif path == "/health":
            self._json(200, self.server.predictor.info())
        elif path == "/predict":
            self._json(
                405,
                {"error": "/predict takes POST with a picture or JSON pixels"},
                [("Allow", "POST")],
            )
        else:
            self._json(404, {"error": f"no such page: {path} (try /, /health or POST /predict)"})

    def do_POST(self):
        if self.path.split("?", 1)[0] != "/predict":
            self.close_connection = True  # the body is not read: the connection cannot carry on
            self._json(404, {"error": f"no such endpoint: POST {self.path} (POST /predict)"})
            return
        body = self._read_body()
        if body is None:
            return
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        predictor = self.server.predictor
        try:
            if kind == "application/json" or (not kind and body.lstrip()[:1] == b"{"):
                result = predictor.from_json(body)
            else:
                result = predictor.from_picture(body)
        except BadRequest as exc:
            self._json(400, {"error": " ".join(str(exc).split())})
            return
        except Exception as exc:  # a bug: say so in one line, never a traceback
            sys.stderr.write(
                f"gpunet serve: internal error on POST /predict: {type(exc).__name__}: {exc}\n"
            )
            self._json(500, {"error": f"internal error ({type(exc).__name__})"})
            return
        self._json(200, result)

    def _not_allowed(self):
        self.close_connection = True
        self._json(
            405,
            {"error": f"method {self.command} not allowed (GET /, GET /health, POST /predict)"},
            [("Allow", "GET, HEAD, POST")],
        )

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _read_body(self):
        """The request body, or None after answering 411/400/413."""
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            kind = (
                "chunked bodies are not supported: "
                if self.headers.get("Transfer-Encoding")
                else ""
            )
            self._json(411, {"error": f"{kind}send a Content-Length header with the body"})
            return None
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._json(
                400, {"error": f"Content-Length: expected a non-negative integer, got {length!r}"}
            )
            return None
        if n > self.server.max_body:  # the reader passed the headers alone, drops the body after
            self.close_connection = True
            self._json(
                413, {"error": f"body of {n} bytes is too large (at most {self.server.max_body})"}
            )
            return None
        if n == 0:
            self._json(
                400, {"error": 'empty body: send PNG or JPEG bytes, or JSON {"pixels": [[...]]}'}
            )
            return None
        body = self.rfile.read(n)
        if len(body) < n:  # the client hung up mid-body: nobody to answer
            self.close_connection = True
            return None
        return body


class Server(connections.Server):
    """The connections of gpunet.connections, answered by Handler, holding the predictor."""

    def __init__(
        self, address, predictor: Predictor, max_body: int = MAX_BODY, quiet: bool = False, **kwargs
    ):
        self.predictor = predictor
        super().__init__(address, Handler, max_body=max_body, quiet=quiet, **kwargs)

    def server_close(self):
        super().server_close()
        self.predictor.worker.close()

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError)):  # clients hanging up are not news
            sys.stderr.write(
                f"gpunet serve: error with {client_address[0]}: {type(exc).__name__}: {exc}\n"
            )


def make_server(
    net,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    name: str = "model",
    max_body: int = MAX_BODY,
    quiet: bool = False,
    deadline: float = connections.DEADLINE,
    max_connections: int = connections.MAX_CONNECTIONS,
    max_buffered: int = connections.MAX_BUFFERED,
) -> Server:
    """A server for `net`, bound and ready (call ``serve_forever``); port 0 picks a free port.
    `deadline`: seconds a request may take to arrive whole (then 408); `max_connections`: open at
    once (then 503); `max_buffered`: bytes of unfinished requests held, all connections together
    (the one that would pass it: 503)."""
    predictor = Predictor(net, name)
    try:
        return Server(
            (host, port),
            predictor,
            max_body=max_body,
            quiet=quiet,
            deadline=deadline,
            max_connections=max_connections,
            max_buffered=max_buffered,
        )
    except OSError as exc:
        predictor.worker.close()  # no server: its worker thread ends too
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from exc


def raise_file_limit(connections_wanted: int) -> int:
    """Raise this process's soft limit of open files towards what `connections_wanted` needs
    (within the hard limit, as Go's runtime does at start); returns the connections it allows."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return connections_wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections_wanted + 64  # the listener, the wake pipe, the libraries' own files
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return connections_wanted
    return max(1, min(connections_wanted, soft - 64))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(
    net,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    name: str = "model",
    deadline: float = connections.DEADLINE,
    max_connections: int = connections.MAX_CONNECTIONS,
    max_buffered: int = connections.MAX_BUFFERED,
) -> int:
    """Serve until Ctrl+C or SIGTERM; prints the address first. Returns 0. Call from the main
    thread."""
    allowed = raise_file_limit(max_connections)
    server = make_server(
        net,
        host,
        port,
        name=name,
        deadline=deadline,
        max_connections=allowed,
        max_buffered=max_buffered,
    )
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"gpunet serve: {name} on http://{shown}:{bound_port}/ (Ctrl+C to stop)", flush=True)
    if host not in LOOPBACK:
        print(
            f"gpunet serve: note: listening on {host}, so other machines can reach this page",
            flush=True,
        )
    if allowed < max_connections:
        print(
            f"gpunet serve: note: at most {allowed} connections at once (the limit of open "
            f"files, ulimit -n, allows no more)",
            flush=True,
        )
    # SIGTERM (`docker stop`, service managers) stops like Ctrl+C. As a container's PID 1, gpunet
    # would otherwise ignore it: the kernel drops signals PID 1 has no handler for, and the engine
    # kills it later.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("gpunet serve: stopped", flush=True)
    finally:
        server.server_close()
    return 0
