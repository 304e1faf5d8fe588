"""Tests of gpunet.data.datasets: the MNIST loader and downloader, splits, image files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import socket
import struct
import threading
import tracemalloc

import numpy as np
import pytest

from gpunet.data import DataError, datasets as data, idx

NAMES = list(data.MNIST_FILES.values())


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------- load_mnist
def make_fake_mnist(folder, n_train=20, n_test=5, gz=(True, True, True, True), seed=0):
    """Write tiny MNIST-compatible files; return the decompressed bytes of each by name."""
    rng = np.random.default_rng(seed)
    arrays = []
    for n in (n_train, n_test):
        arrays += [
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8),
        ]
    folder.mkdir(parents=True, exist_ok=True)
    raw = {}
    for name, array, zipped in zip(NAMES, arrays, gz):
        idx.write_idx(folder / (name + ".gz" if zipped else name), array)
        raw[name] = idx.read_idx(folder / (name + ".gz" if zipped else name))
    return raw


def check_fake(result, raw):
    (x_train, y_train), (x_test, y_test) = result
    assert x_train.shape == (20, 784) and x_test.shape == (5, 784)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    np.testing.assert_allclose(x_train * 255, raw[NAMES[0]].reshape(20, 784), atol=1e-3)
    np.testing.assert_array_equal(y_test, raw[NAMES[3]])


def test_load_mnist_from_argument(tmp_path):
    raw = make_fake_mnist(tmp_path / "fake")
    check_fake(data.load_mnist(tmp_path / "fake", download=False), raw)
    check_fake(data.load_mnist(str(tmp_path / "fake"), download=True), raw)  # nothing to download


def test_load_mnist_from_env(tmp_path, monkeypatch):
    raw = make_fake_mnist(tmp_path / "env")
    monkeypatch.setenv("GPUNET_DATA", str(tmp_path / "env"))
    assert data.default_data_dir() == tmp_path / "env"
    check_fake(data.load_mnist(download=False), raw)


def test_load_mnist_mixed_raw_and_gz(tmp_path):
    raw = make_fake_mnist(tmp_path, gz=(False, True, True, False))
    found = data.find_mnist_files(tmp_path)
    assert found["train_images"].name == NAMES[0] and found["train_labels"].name == NAMES[1] + ".gz"
    check_fake(data.load_mnist(tmp_path, download=False), raw)
    # with both present the raw file wins
    idx.write_idx(tmp_path / (NAMES[0] + ".gz"), np.zeros((1, 28, 28), np.uint8))
    assert data.find_mnist_files(tmp_path)["train_images"].name == NAMES[0]


def test_load_mnist_count_mismatch(tmp_path):
    make_fake_mnist(tmp_path)
    idx.write_idx(tmp_path / (NAMES[1] + ".gz"), np.zeros(19, np.uint8))
    with pytest.raises(DataError) as info:
        data.load_mnist(tmp_path, download=False)
    msg = str(info.value)
    assert NAMES[0] in msg and NAMES[1] in msg and "20" in msg and "19" in msg


def test_load_mnist_missing_without_download(tmp_path):
    make_fake_mnist(tmp_path)
    (tmp_path / (NAMES[2] + ".gz")).unlink()
    (tmp_path / (NAMES[3] + ".gz")).unlink()
    with pytest.raises(DataError) as info:
        data.load_mnist(tmp_path, download=False)
    msg = str(info.value)
    assert f"{tmp_path}: {NAMES[2]}, {NAMES[3]}." in msg  # the folder and exactly the missing names
    assert "GPUNET_DATA" in msg and "--data-dir" in msg
    with pytest.raises(DataError, match="missing"):
        data.find_mnist_files(tmp_path)


def test_load_mnist_downloads_missing(tmp_path, monkeypatch):
    calls = []

    def fake_download(folder, splits=("train", "test")):
        calls.append(folder)
        make_fake_mnist(folder)
        return folder

    monkeypatch.setattr(data, "download_mnist", fake_download)
    (x_train, _), _ = data.load_mnist(tmp_path / "new")
    assert calls == [tmp_path / "new"] and x_train.shape == (20, 784)


def test_verify(tmp_path, monkeypatch):
    raw = make_fake_mnist(tmp_path, gz=(True, False, True, False))
    with pytest.raises(
        DataError, match=f"{NAMES[0]}.gz: MD5 .* expected {data.MNIST_MD5[NAMES[0]]}"
    ):
        data.load_mnist(tmp_path, download=False, verify=True)
    fake_md5 = {name: hashlib.md5(idx_file_bytes(raw[name])).hexdigest() for name in NAMES}
    monkeypatch.setattr(data, "MNIST_MD5", fake_md5)
    check_fake(data.load_mnist(tmp_path, download=False, verify=True), raw)
    fake_md5[NAMES[3]] = "0" * 32
    with pytest.raises(DataError, match=f"{NAMES[3]}: MD5"):
        data.load_mnist(tmp_path, download=False, verify=True)


def idx_file_bytes(array):
    """The decompressed bytes of `array` as an IDX file, built by hand."""
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    return (
        bytes([0, 0, code, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("GPUNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.default_data_dir() == tmp_path / "gpunet" / "mnist"
    monkeypatch.setenv("GPUNET_DATA", "")
    assert data.default_data_dir() == tmp_path / "gpunet" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_data_dir().parts[-3:] == (".cache", "gpunet", "mnist")
    assert data.resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    assert data.resolve_data_dir() == data.default_data_dir()


def test_constants():
    assert set(data.MNIST_FILES) == {"train_images", "train_labels", "test_images", "test_labels"}
    assert set(data.MNIST_MD5) == set(NAMES)
    assert (
        data.MNIST_MIRRORS[0].startswith("https://ossci-datasets") and len(data.MNIST_MIRRORS) == 3
    )


# ----------------------------------------------------------------------------------- download_mnist
class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirrors(tmp_path_factory, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving good/ (fake MNIST .gz), bad/ (corrupt payloads),
    empty/."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path_factory.mktemp("srv")
    raw = make_fake_mnist(root / "good")
    (root / "bad").mkdir()
    (root / "empty").mkdir()
    for name in NAMES:
        corrupt = bytearray(raw[name].tobytes())
        corrupt[-1] ^= 1
        (root / "bad" / (name + ".gz")).write_bytes(gzip.compress(bytes(corrupt)))
    md5 = {}
    for name in NAMES:
        payload = gzip.decompress((root / "good" / (name + ".gz")).read_bytes())
        md5[name] = hashlib.md5(payload).hexdigest()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    yield {
        "good": base + "good/",
        "bad": base + "bad/",
        "404": base + "empty/",
        "closed": f"http://127.0.0.1:{closed}/",
        "md5": md5,
        "raw": raw,
    }
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_download_skips_404_and_closed_port(tmp_path, mirrors):
    dest = tmp_path / "a" / "b"  # created on demand
    out = data.download_mnist(
        dest,
        mirrors=(mirrors["404"], mirrors["closed"], mirrors["good"]),
        timeout=5,
        md5=mirrors["md5"],
    )
    assert out == dest
    assert listing(dest) == sorted(n + ".gz" for n in NAMES)
    (x_train, y_train), (x_test, _) = data.load_mnist(dest, download=False)
    assert x_train.shape == (20, 784) and x_test.shape == (5, 784)
    np.testing.assert_array_equal(y_train, mirrors["raw"][NAMES[1]])


def test_download_skips_corrupt_mirror_and_keeps_present_files(tmp_path, mirrors):
    idx.write_idx(
        tmp_path / NAMES[0], np.zeros((20, 28, 28), np.uint8)
    )  # present: not fetched again
    data.download_mnist(
        tmp_path, mirrors=(mirrors["bad"], mirrors["good"]), timeout=5, md5=mirrors["md5"]
    )
    assert listing(tmp_path) == sorted([NAMES[0]] + [n + ".gz" for n in NAMES[1:]])
    assert idx.read_idx(tmp_path / NAMES[0]).max() == 0
    for name in NAMES[1:]:
        np.testing.assert_array_equal(idx.read_idx(tmp_path / (name + ".gz")), mirrors["raw"][name])


def test_download_all_mirrors_fail(tmp_path, mirrors):
    with pytest.raises(DataError) as info:
        data.download_mnist(
            tmp_path,
            mirrors=(mirrors["404"], mirrors["bad"], mirrors["closed"]),
            timeout=5,
            md5=mirrors["md5"],
        )
    msg = str(info.value)
    assert "failed" in msg and NAMES[0] in msg and "404" in msg and "MD5 mismatch" in msg
    assert str(tmp_path) in msg and all(n in msg for n in NAMES)
    assert "GPUNET_DATA" in msg and "--data-dir" in msg
    assert listing(tmp_path) == []  # no temp or partial files


def test_download_write_failure_leaves_nothing(tmp_path, mirrors, monkeypatch):
    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.os, "replace", crash)
    with pytest.raises(DataError, match="No space left"):
        data.download_mnist(tmp_path, mirrors=(mirrors["good"],), timeout=5, md5=mirrors["md5"])
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------- split_validation
def test_split_tail_views():
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    (xt, yt), (xv, yv) = data.split_validation(x, y, 3)
    assert xt.shape == (7, 2) and xv.shape == (3, 2) and yv.tolist() == [7, 8, 9]
    assert np.shares_memory(xt, x) and np.shares_memory(xv, x) and np.shares_memory(yv, y)
    (xt, _), (xv, yv) = data.split_validation(x, y, 0.2)
    assert len(xt) == 8 and len(xv) == 2
    (xt, _), (xv, yv) = data.split_validation(x, y, 0)
    assert len(xt) == 10 and xv.shape == (0, 2) and yv.shape == (0,)
    (xt, _), (xv, _) = data.split_validation(x, y, np.int64(9))
    assert len(xt) == 1


def test_split_seeded_deterministic_disjoint():
    x, y = np.arange(200).reshape(100, 2), np.arange(100)
    (xt, yt), (xv, yv) = data.split_validation(x, y, 0.25, seed=7)
    (_, yt2), (_, yv2) = data.split_validation(x, y, 0.25, seed=7)
    (_, _), (_, yv3) = data.split_validation(x, y, 0.25, seed=8)
    assert len(yv) == 25 and len(yt) == 75
    np.testing.assert_array_equal(yv, yv2)
    np.testing.assert_array_equal(yt, yt2)
    assert not np.array_equal(yv, yv3)
    assert not set(yt) & set(yv) and sorted(set(yt) | set(yv)) == list(range(100))
    assert yv.tolist() != list(range(75, 100))  # random, not the tail
    np.testing.assert_array_equal(xv[:, 0], yv * 2)  # rows stay paired with their labels


@pytest.mark.parametrize("bad", [-1, 10, 11, 1.0, -0.1, 1.5, True, "3", None])
def test_split_bad_val_size(bad):
    with pytest.raises(ValueError, match=r"val_size.*\[0, 10\).*\[0, 1\)") as info:
        data.split_validation(np.zeros((10, 2)), np.zeros(10), bad)
    assert repr(bad) in str(info.value)


# --------------------------------------------------------------------------------------- real MNIST
@pytest.mark.slow
def test_real_mnist(mnist_dir):
    (x_train, y_train), (x_test, y_test) = data.load_mnist(mnist_dir, download=False, verify=True)
    assert x_train.shape == (60000, 784) and x_test.shape == (10000, 784)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert np.unique(y_train).tolist() == list(range(10)) and np.unique(y_test).tolist() == list(
        range(10)
    )
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    total = total_sq = 0.0
    for chunk in np.array_split(x_train, 10):  # float64 sums without a float64 copy of the set
        total += chunk.sum(dtype=np.float64)
        total_sq += np.square(chunk, dtype=np.float64).sum()
    mean = total / x_train.size
    std = np.sqrt(total_sq / x_train.size - mean**2)
    assert abs(mean - 0.1307) < 5e-4 and abs(std - 0.3081) < 5e-4


@pytest.mark.slow
def test_real_mnist_images_memory(mnist_dir):
    path = data.find_mnist_files(mnist_dir)["train_images"]
    output_bytes = 60000 * 784 * 4  # 188,160,000
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        x = idx.load_idx_images(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert x.nbytes == output_bytes
    assert peak < 1.25 * output_bytes, (
        f"peak {peak / 1e6:.1f} MB for a {output_bytes / 1e6:.1f} MB output"
    )


# --- data sets of one's own: .npz and CSV files (gpunet train --data) -----------------------------
def test_load_arrays_reads_npz_and_csv(tmp_path):
    from gpunet.data import load_arrays

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 17, size=(20, 3)), rng.integers(0, 4, size=20)
    np.savez(tmp_path / "d.npz", x_train=x[:15], y_train=y[:15], x_test=x[15:], y_test=y[15:])
    (xa, ya), (xt, yt) = load_arrays(tmp_path / "d.npz")
    assert xa.dtype == np.float64 and ya.dtype == np.int64
    np.testing.assert_array_equal(xa, x[:15])
    np.testing.assert_array_equal(yt, y[15:])
    np.savez(tmp_path / "train-only.npz", x_train=x, y_train=y)
    assert load_arrays(tmp_path / "train-only.npz")[1] is None
    lines = ["a,kind,b,c"] + [
        f"{r[0]},{k}.0,{r[1]},{r[2]}" for r, k in zip(x, y)
    ]  # label in the middle, as floats
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    (xc, yc), test = load_arrays(tmp_path / "d.csv", label_column="kind")
    assert test is None
    np.testing.assert_array_equal(xc, x)
    np.testing.assert_array_equal(yc, y)


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "a.npz",
            {"x_train": np.ones((3, 2))},
            r"expected arrays x_train, y_train and optionally x_test with "
            r"y_test, got \['x_train'\]",
        ),
        (
            "b.npz",
            {"x_train": np.ones((3, 2)), "y_train": np.arange(3), "x_test": np.ones((2, 2))},
            "optionally x_test with y_test",
        ),
        (
            "c.npz",
            {"x_train": np.ones((3, 2)), "y_train": np.array([0.5, 1, 2])},
            "expected integer class labels",
        ),
        (
            "d.npz",
            {"x_train": np.ones((3, 2)), "y_train": np.arange(4)},
            r"shaped \(N, features\) and \(N,\)",
        ),
        (
            "e.csv",
            "a,b\n1,2\n",
            "no column named 'label' for the labels \\(--label-column\\); the columns are",
        ),
        ("f.csv", "a,label\n1,0\nx,1\n", "line 3, column 'a': expected a number, got 'x'"),
        ("g.csv", "a,label\n1,0\n1\n", "line 3: expected 2 values like the header, got 1"),
        ("h.txt", "1,2", "expected a .npz or .csv file, got .txt"),
    ],
)
def test_load_arrays_names_what_is_wrong(tmp_path, name, content, message):
    from gpunet.data import load_arrays

    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    else:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_arrays(path)
