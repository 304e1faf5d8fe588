"""The connections of ``gpunet serve``: one thread does all the socket work, a fixed pool answers.

The standard library's ThreadingHTTPServer gives every connection a thread for as long as it is
open, and its 30 s timeout is per read: 3,000 clients that each sent one header byte a second
held 3,003 threads, and nothing stopped 30,000. Here a connection costs a file descriptor and its
buffered bytes, never a thread:

- the reader (the thread that calls ``serve_forever``) accepts, reads and writes every connection
  through one selector; a request goes to the pool only once its headers and its Content-Length body
  are all here, and the reader writes the answer back, so no pool thread ever waits on a client;
- ``threads`` handler threads (a fixed pool, started once) turn a whole request into its answer;
- a request has ``deadline`` seconds as a whole, headers and body together, from the accept (on a
  keep-alive connection, from the end of the previous answer): after it, 408 and the connection is
  closed. One that sent nothing since its last answer is closed without a word (an idle keep-alive);
- at most ``max_connections`` are open at once. One more is answered 503 at once and closed, rather
  than left in the listen queue: slow clients cost no thread here, so the bound is one of file
  descriptors and memory, set far above what good clients open; past it, a client learns at once
  instead of waiting unseen behind connections that may each hold their place for a whole deadline;
- at most ``max_buffered`` bytes of requests not yet whole are held, all connections together: each
  may hold a whole body (8 MiB) and its headers, so 4,096 slow uploads could otherwise hold 59 GB.
  The connection whose bytes would pass the bound is answered 503 and closed; the others go on.

Nothing here knows the routes: ``BufferedHandler`` is a BaseHTTPRequestHandler that reads its
request from the bytes the reader gathered and writes its answer into a buffer.
"""

from __future__ import annotations

import collections
import errno
import http.client
import io
import json
import queue
import selectors
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

DEADLINE = 30.0  # seconds for a whole request; 8 MiB in 30 s needs 2.2 Mbit/s of upload
MAX_CONNECTIONS = 4096  # open at once; each costs a file descriptor (serve raises the soft limit)
MAX_BUFFERED = 512 * 2**20  # bytes of unfinished requests held at once, all connections together
THREADS = 8  # handler threads: pictures are decoded and JSON parsed there
MAX_HEAD = 65536 + 100 * 65536  # bytes of request line and headers, as BaseHTTPRequestHandler
DRAIN_LIMIT = 64 * 2**20  # bytes read and dropped after a connection's last answer (a 413's body)
READ_SIZE = 65536


class Connection:
    """One client: its socket, the bytes read and not yet used, the answer not yet written, and
    its deadline."""

    __slots__ = (
        "address",
        "closing",
        "deadline",
        "drain",
        "heard",
        "inbox",
        "outbox",
        "sock",
        "stamp",
    )

    def __init__(self, sock, address):
        self.sock, self.address = sock, address
        self.inbox, self.outbox = bytearray(), bytearray()
        self.deadline, self.stamp = 0.0, 0  # stamp: which queued deadline is the live one
        # closing: close once the outbox is written, after reading and dropping up to `drain` bytes
        # until the client closes (unread bytes would turn our close into a reset)
        self.closing, self.drain = False, 0
        self.heard = False  # bytes came since the last answer (an expired request then gets 408)


def answer_bytes(status: int, message: str, close: bool = True) -> bytes:
    """A whole HTTP/1.1 response with the JSON body {"error": message}."""
    body = json.dumps({"error": message}).encode()
    phrase = http.client.responses.get(status, "error")
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode("latin-1") + body


def head_end(inbox: bytearray) -> int:
    """The index just past the blank line that ends the headers, or -1 (lines may end in LF alone,
    as BaseHTTPRequestHandler allows; a blank first line is a request of its own)."""
    for blank in (b"\n", b"\r\n"):
        if inbox.startswith(blank):
            return len(blank)
    ends = [i + len(sep) for sep in (b"\n\r\n", b"\n\n") if (i := inbox.find(sep)) >= 0]
    return min(ends) if ends else -1


def body_length(head: bytes):
    """The Content-Length that the headers in ``head`` give, or None (none, or not a number >= 0:
    the handler answers 411 or 400 then, and reads no body)."""
    try:
        headers = http.client.parse_headers(io.BytesIO(head.split(b"\n", 1)[-1]))
        n = int(headers.get("Content-Length", ""))
    except (http.client.HTTPException, ValueError):
        return None
    return n if n >= 0 else None


class BufferedHandler(BaseHTTPRequestHandler):
    """A BaseHTTPRequestHandler for one request the reader has read whole: ``request`` is the
    pair (Connection, request bytes); the answer goes into ``wfile``, a buffer the reader writes."""

    def setup(self):
        self.connection, data = self.request
        self.rfile, self.wfile = io.BytesIO(data), io.BytesIO()

    def handle(self):
        self.close_connection = True
        self.handle_one_request()  # one request: the next one on the connection is the reader's

    def finish(self):
        pass


class Server:
    """An HTTP server on ``address`` whose requests ``handler`` (a BufferedHandler subclass)
    answers. ``serve_forever`` runs the reader in the calling thread; ``shutdown`` (from another
    thread) stops it; ``server_close`` closes every socket and stops the pool. ``deadline``,
    ``max_body``, ``max_connections`` and ``max_buffered`` may be changed while it runs;
    ``buffered`` is the bytes held now.
    """

    # the listen backlog: 64 clients connecting at once overflowed socketserver's 5
    request_queue_size = 1024

    def __init__(
        self,
        address,
        handler,
        *,
        deadline: float = DEADLINE,
        max_body: int,
        max_connections: int = MAX_CONNECTIONS,
        max_buffered: int = MAX_BUFFERED,
        threads: int = THREADS,
        quiet: bool = False,
    ):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(self.request_queue_size)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.handler, self.deadline, self.max_body = handler, deadline, max_body
        self.max_connections, self.quiet = max_connections, quiet
        self.max_buffered, self.buffered = max_buffered, 0
        self.open: set = set()
        # (deadline, stamp, conn), oldest first: every deadline is `deadline` after its start
        self._deadlines: collections.deque = collections.deque()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # connections the pool hands back
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listening, self._stop = True, False
        self._stopped = threading.Event()
        self._stopped.set()
        self._pool = [
            threading.Thread(target=self._answer_loop, name=f"gpunet-serve-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._pool:
            t.start()

    # -- the reader -------------------------------------------------------------------------------
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        try:
            while not self._stop:
                now = time.monotonic()
                wait = poll_interval if not self._deadlines else self._deadlines[0][0] - now
                for key, events in self._selector.select(max(0.0, min(wait, poll_interval))):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._take_back()
                    elif events & selectors.EVENT_WRITE:
                        self._write(key.data)
                    else:
                        self._read(key.data)
                self._expire(time.monotonic())
        finally:
            self._stop = False
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (called from another thread) and wait until it has returned."""
        self._stop = True
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        for conn in list(self.open):
            self._close(conn)
        for _ in self._pool:
            self._jobs.put(None)
        self._selector.close()
        for s in (self.socket, self._wake_r, self._wake_w):
            s.close()

    def _accept(self) -> None:
        for _ in range(64):  # a burst at a time, then the open connections get their turn
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause()  # out of file descriptors: the rest wait in the listen queue
                return
            sock.setblocking(False)
            if len(self.open) >= self.max_connections:
                self._refuse(sock, address)
                continue
            conn = Connection(sock, address)
            self.open.add(conn)
            self._listen_to(conn)

    def _refuse(self, sock, address) -> None:
        """503 at once to a connection beyond the bound (best effort: one send, fresh socket)."""
        self.log(address, f"503 more than {self.max_connections} connections open")
        try:
            sock.recv(READ_SIZE)  # what it sent: left unread, it turns the close into a reset
        except OSError:
            pass
        try:
            busy = f"busy: {self.max_connections} connections are open; try again"
            sock.send(answer_bytes(503, busy))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    def _pause(self) -> None:
        if self._listening:
            self._selector.unregister(self.socket)
            self._listening = False

    def _listen_to(self, conn: Connection) -> None:
        """Wait for the next request on `conn`, with a fresh deadline."""
        conn.stamp += 1
        conn.deadline = time.monotonic() + self.deadline
        conn.heard = bool(conn.inbox)
        self._deadlines.append((conn.deadline, conn.stamp, conn))
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        if conn.inbox:
            self._parse(conn)  # a pipelined request may be here already

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client hung up
            self._close(conn)
        elif conn.closing:  # after our last answer: dropped, so that closing does not reset it
            conn.drain -= len(data)
            if conn.drain <= 0:
                self._close(conn)
        elif self.buffered + len(data) > self.max_buffered:
            self._overfull(conn)
        else:
            conn.heard = True
            conn.inbox += data
            self.buffered += len(data)
            self._parse(conn)

    def _overfull(self, conn: Connection) -> None:
        """503 and close: this connection's bytes would pass ``max_buffered``."""
        self.log(conn.address, f"503 more than {self.max_buffered} bytes of requests held")
        self._forget_inbox(conn)
        busy = "busy: too many bytes of requests are arriving at once; try again"
        self._send(conn, answer_bytes(503, busy), close=True)

    def _forget_inbox(self, conn: Connection, upto: int | None = None) -> None:
        """Drop the first ``upto`` bytes of ``conn``'s inbox (all of them by default), and count
        them off ``buffered``."""
        upto = len(conn.inbox) if upto is None else upto
        del conn.inbox[:upto]
        self.buffered -= upto

    def _parse(self, conn: Connection) -> None:
        """Hand the request to the pool once its headers and body are all here."""
        end = head_end(conn.inbox)
        if end < 0:
            if len(conn.inbox) > MAX_HEAD:
                too_long = answer_bytes(431, f"request headers longer than {MAX_HEAD} bytes")
                self._send(conn, too_long, close=True)
            return
        n = body_length(bytes(conn.inbox[:end])) or 0
        if n > self.max_body:  # answered 413 from the headers alone; the rest is dropped after it
            n = len(conn.inbox) - end
        elif len(conn.inbox) < end + n:
            return
        request = bytes(conn.inbox[: end + n])
        self._forget_inbox(conn, end + n)
        conn.stamp += 1  # its deadline is over: the pool has it
        self._selector.unregister(conn.sock)
        self._jobs.put((conn, request))

    def _send(self, conn: Connection, data: bytes, close: bool) -> None:
        """Write `data` to `conn` (what the socket takes now, the rest when it is writable)."""
        conn.outbox += data
        conn.closing = conn.closing or close
        conn.stamp += 1
        conn.deadline = time.monotonic() + self.deadline  # one that does not read is dropped too
        self._deadlines.append((conn.deadline, conn.stamp, conn))
        try:
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        except KeyError:
            self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        del conn.outbox[:sent]
        if conn.outbox:
            return
        self._selector.unregister(conn.sock)
        if not conn.closing:
            self._listen_to(conn)
            return
        try:  # our side is done: FIN, then read and drop what the client sends until it closes
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.drain = DRAIN_LIMIT
        self._forget_inbox(conn)
        conn.stamp += 1
        conn.deadline = time.monotonic() + self.deadline
        self._deadlines.append((conn.deadline, conn.stamp, conn))
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, stamp, conn = self._deadlines.popleft()
            if stamp != conn.stamp or conn not in self.open:
                continue  # that deadline was replaced, or the connection is gone
            if conn.heard and not conn.closing and not conn.outbox:
                self.log(conn.address, f"408 request not complete within {self.deadline:g} s")
                late = f"the request (headers and body) took longer than {self.deadline:g} s"
                self._send(conn, answer_bytes(408, late), close=True)
            else:  # idle keep-alive, an answer not read, or the drain after a last answer
                self._close(conn)

    def _close(self, conn: Connection) -> None:
        if conn not in self.open:
            return
        self.open.discard(conn)
        self._forget_inbox(conn)
        conn.stamp += 1
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if not self._listening and not self._stop:
            self._selector.register(self.socket, selectors.EVENT_READ, "accept")
            self._listening = True

    # -- the pool ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # the pipe is full: the reader is waking already
            pass

    def _take_back(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        while True:
            try:
                conn, answer, close = self._done.get_nowait()
            except queue.Empty:
                return
            if conn in self.open:
                self._send(conn, answer, close)

    def _answer_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            conn = job[0]
            try:
                handler = self.handler(job, conn.address, self)
                answer, close = handler.wfile.getvalue(), handler.close_connection
            except Exception:
                self.handle_error(job, conn.address)
                answer, close = answer_bytes(500, "internal error"), True
            self._done.put((conn, answer, close))
            self._wake()

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        sys.stderr.write(
            f"gpunet serve: error with {client_address[0]}: {type(exc).__name__}: {exc}\n"
        )

    def log(self, address, message: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"{address[0]} - {message}\n")
