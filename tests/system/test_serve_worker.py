"""gpunet serve's device worker (gpunet/serve.py, DeviceWorker): one thread runs the network, fed
by a queue; requests that wait together go through one forward pass, and each gets what predicting
it alone gives. On the CPU with real MNIST test digits, and on the counting fake CuPy (only the
worker thread may touch the "GPU")."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cuda_support  # (tests/support/cuda_support.py)
import numpy as np
import pytest
from test_serve import Running  # the in-process server on a free loopback port

import gpunet as gn
from gpunet import serve
from gpunet.training import predict, predict_proba

# A batch's rows and the same rows alone go through different BLAS kernels (gemm over k rows, or
# one): float32 sums in another order, so a logit z may move by a few ulps of the row's largest |z|.
# For a logit error d, a probability moves by at most d/2 (|dp_j| <= 2d p_j (1 - p_j)). Measured on
# 2,000 MNIST test digits through the 3-epoch 784-128-10 (CI's venv, 2026-12-08): |z| up to 22.7,
# where an ulp is 1.9e-6; d up to 7.6e-6; probabilities up to 1.8e-6 apart (the bound of 7.5e-8
# measured on 200 digits earlier was too tight: CI saw 1.1e-6 after rounding). Allowing d = 8 ulps
# (1.5e-5) gives 7.6e-6, plus the answers' rounding to 6 decimals (5e-7): 1e-5. Another row's answer
# or a wrong batch is off by far more; and the digits must be the same.
ATOL = 1e-5


def alone(net, x):
    """Each row predicted on its own: (k, classes) NumPy."""
    return np.concatenate([gn.to_numpy(predict_proba(net, row[None])) for row in x])


class Gate:
    """``serve.predict_proba`` held at its first call until ``open()``: the requests sent meanwhile
    all wait in the worker's queue. Records the rows of every forward pass."""

    def __init__(self, monkeypatch, fail=False):
        self.first, self.rows, self.fail = threading.Event(), [], fail
        self.started = threading.Event()
        real = serve.predict_proba

        def held(net, x):
            self.rows.append(len(x))
            if len(self.rows) == 1:
                self.started.set()
                self.first.wait(30)
            if self.fail:
                raise RuntimeError("the device is gone")
            return real(net, x)

        monkeypatch.setattr(serve, "predict_proba", held)

    def open(self):
        self.first.set()


def ask_all(worker, rows, threads):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(worker.probabilities, rows))


def queued(worker, count, timeout=30):
    deadline = time.monotonic() + timeout
    while worker.queue.qsize() < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return worker.queue.qsize()


def test_waiting_requests_share_a_forward_pass_and_get_what_alone_gives(mnist_model, monkeypatch):
    """40 one-digit requests while the worker is held on the first: the other 39 wait, then go
    through in batches of at most 16 rows (16, 16, 7), each answered with its own row. Mutations:
    no draining of the queue (40 passes), every request given the batch's first row."""
    net, x = mnist_model.net, mnist_model.x_test[:40]
    gate = Gate(monkeypatch)
    worker = serve.DeviceWorker(net, max_rows=16)
    try:
        with ThreadPoolExecutor(40) as pool:
            first = pool.submit(worker.probabilities, x[:1])
            assert gate.started.wait(30)
            rest = [pool.submit(worker.probabilities, x[i : i + 1]) for i in range(1, 40)]
            assert queued(worker, 39) == 39
            gate.open()
            got = np.concatenate([first.result(30)] + [f.result(30) for f in rest])
    finally:
        worker.close()
    assert gate.rows == [1, 16, 16, 7] and worker.batches == 4, gate.rows
    np.testing.assert_array_equal(got.argmax(1), gn.to_numpy(predict(net, x)))
    np.testing.assert_allclose(got, alone(net, x), rtol=0, atol=ATOL)


def test_the_row_bound_holds_and_a_larger_request_runs_alone(mnist_model, monkeypatch):
    """Queued 10, 10 and 20 rows with a bound of 16: 10 + 10 would pass it, so each runs alone
    (the 20 too: a request is never split). Mutation: the next request's rows unchecked (20, 20)."""
    net, x = mnist_model.net, mnist_model.x_test[:41]
    gate = Gate(monkeypatch)
    worker = serve.DeviceWorker(net, max_rows=16)
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(worker.probabilities, x[:1])]
            assert gate.started.wait(30)
            for n, (start, stop) in enumerate([(1, 11), (11, 21), (21, 41)], 1):
                futures.append(pool.submit(worker.probabilities, x[start:stop]))
                assert queued(worker, n) == n  # in this order
            gate.open()
            got = np.concatenate([f.result(30) for f in futures])
    finally:
        worker.close()
    assert gate.rows == [1, 10, 10, 20], gate.rows
    np.testing.assert_allclose(got, alone(net, x), rtol=0, atol=ATOL)


def test_a_failed_forward_pass_fails_each_of_its_requests(monkeypatch):
    """Every request of the batch gets the error (its thread answers 500); none waits for ever."""
    gate = Gate(monkeypatch, fail=True)
    worker = serve.DeviceWorker(gn.mlp([784, 16, 10], seed=0, device="cpu"), max_rows=16)
    x = np.zeros((3, 784), np.float32)
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(worker.probabilities, x[:1])]
            assert gate.started.wait(30)
            futures += [pool.submit(worker.probabilities, x[i : i + 1]) for i in (1, 2)]
            assert queued(worker, 2) == 2
            gate.open()
            for f in futures:
                with pytest.raises(RuntimeError, match="the device is gone"):
                    f.result(30)
    finally:
        worker.close()
    assert gate.rows == [1, 2]


def test_answers_over_http_equal_predict_on_mnist(mnist_model):
    """200 MNIST test digits as JSON pixels from 16 threads at once: each answer's digit is
    ``predict``'s and its probabilities what the digit alone gives (the pixels are used as they
    are, so the server's input is the test's)."""
    net, x = mnist_model.net, mnist_model.x_test[:200]
    running = Running(net)
    try:

        def ask(i):
            body = json.dumps({"pixels": x[i].reshape(28, 28).tolist()})
            return running.request("POST", "/predict", body, {"Content-Type": "application/json"})

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(len(x))))
        batches = running.server.predictor.worker.batches
    finally:
        running.close()
    assert all(status == 200 for status, _, _ in answers), [a for a in answers if a[0] != 200][:2]
    docs = [doc for _, _, doc in answers]
    np.testing.assert_array_equal([d["digit"] for d in docs], gn.to_numpy(predict(net, x)))
    np.testing.assert_allclose([d["probabilities"] for d in docs], alone(net, x), rtol=0, atol=ATOL)
    assert batches <= len(x)


def test_only_the_worker_thread_touches_the_device(monkeypatch):
    """On the counting fake CuPy, every launch, upload and download of 24 requests from 8 threads
    (pictures are decoded there) is made by the worker thread. Mutation: the forward pass in the
    request's thread again (predict_proba called in Predictor.predict) fails it."""
    with cuda_support.fake_cupy(monkeypatch) as fake:
        net = gn.mlp([784, 16, 10], seed=0, device="gpu")
        assert isinstance(net.parameters()[0].data, fake.ndarray)  # the "GPU" path is the one run
        where = []

        class Downloads(list):
            def append(self, shape):
                where.append(threading.current_thread().name)
                super().append(shape)

        add = fake.counter.add
        monkeypatch.setattr(
            fake.counter,
            "add",
            lambda what: (where.append(threading.current_thread().name), add(what)),
        )
        monkeypatch.setattr(fake.counter, "downloads", Downloads())
        running = Running(net)
        try:
            pixels = np.zeros((28, 28))
            pixels[4:24, 12:16] = 1.0
            body = json.dumps({"pixels": pixels.tolist()})

            def ask(_):
                return running.request(
                    "POST", "/predict", body, {"Content-Type": "application/json"}
                )[0]

            with ThreadPoolExecutor(8) as pool:
                assert list(pool.map(ask, range(24))) == [200] * 24
        finally:
            running.close()
    assert where and set(where) == {"gpunet-serve-device"}, sorted(set(where))


def test_no_worker_thread_is_left_when_the_port_is_taken():
    """make_server that cannot listen raises and leaves no worker behind. Mutation: the worker not
    closed on that error leaves one thread per failed try."""

    def workers():
        return sum(t.name == "gpunet-serve-device" for t in threading.enumerate())

    net = gn.mlp([784, 16, 10], seed=0, device="cpu")
    running = Running(net)
    try:
        before = workers()
        for _ in range(3):
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{running.port}"):
                serve.make_server(net, "127.0.0.1", running.port)
        assert workers() == before
    finally:
        running.close()
