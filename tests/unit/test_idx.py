"""Tests of gpunet.data.idx: reading and writing the IDX format, raw and gzipped, and its errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from gpunet import files
from gpunet.data import DataError, idx


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    idx.write_idx(path, array)
    back = idx.read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == (3, 4, 5)
    np.testing.assert_array_equal(back, array)
    assert listing(tmp_path) == [path.name]  # no temp file left beside it


@pytest.mark.parametrize("dtype, code", [(np.int32, 0x0C), (np.float32, 0x0D), (np.int16, 0x0B)])
def test_idx_multibyte_is_big_endian_on_disk(tmp_path, dtype, code):
    array = np.array([[1, 2, 3], [4, 5, 258]], dtype=dtype)
    idx.write_idx(tmp_path / "raw", array)
    idx.write_idx(tmp_path / "packed.gz", array)
    raw = (tmp_path / "raw").read_bytes()
    assert raw[:4] == bytes([0, 0, code, 2])
    assert struct.unpack(">2I", raw[4:12]) == (2, 3)
    assert raw[12:] == array.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    assert gzip.decompress((tmp_path / "packed.gz").read_bytes()) == raw
    assert (tmp_path / "packed.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_idx_hand_built_bytes_and_gzip_detected_by_content(tmp_path):
    payload = struct.pack(">4i", -1, 0, 7, 2**31 - 1)
    blob = bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 4) + payload
    (tmp_path / "ints.idx").write_bytes(gzip.compress(blob))  # gzipped although no .gz suffix
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "ints.idx"), [-1, 0, 7, 2**31 - 1])
    (tmp_path / "ints.gz").write_bytes(blob)  # raw although it ends in .gz
    assert idx.read_idx(tmp_path / "ints.gz").tolist() == [-1, 0, 7, 2**31 - 1]


def test_idx_zero_items_allowed(tmp_path):
    idx.write_idx(tmp_path / "empty.gz", np.zeros((0, 28, 28), np.uint8))
    assert idx.read_idx(tmp_path / "empty.gz").shape == (0, 28, 28)
    assert idx.load_idx_images(tmp_path / "empty.gz").shape == (0, 784)


def idx_bytes(code=0x08, dims=(2, 3), payload=None):
    header = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return header + (
        bytes(i % 251 for i in range(int(np.prod(dims)))) if payload is None else payload
    )


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "blob, problem",
    [
        (b"\x08\x03\x00\x00" + bytes(20), "bad magic number"),
        (idx_bytes(code=0x0A), "unknown IDX type code 0x0A"),
        (bytes([0, 0, 8, 5]) + bytes(40), "dimension count 5"),
        (bytes([0, 0, 8, 0]), "dimension count 0"),
        (idx_bytes(dims=(2, 0), payload=b""), "must be > 0"),
        (idx_bytes(payload=bytes(4)), "truncated: expected 6 bytes of data, found 4"),
        (idx_bytes(payload=bytes(9)), "has 3 unexpected trailing bytes"),
        (b"\x00\x00", "truncated"),
        (bytes([0, 0, 8, 3, 0, 0]), "truncated"),
    ],
)
def test_idx_errors_name_file_and_problem(tmp_path, blob, problem, gz):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(DataError, match=problem) as info:
        idx.read_idx(path)
    assert path.name in str(info.value)


def test_truncated_and_corrupt_gzip_stream(tmp_path):
    good = gzip.compress(idx_bytes(dims=(50, 8, 5)))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(good[: len(good) - 12])
    with pytest.raises(DataError, match="gzip") as info:
        idx.read_idx(cut)
    assert "cut.gz" in str(info.value)
    with pytest.raises(DataError, match="gzip"):
        idx.load_idx_images(tmp_path / "cut.gz")

    bad_crc = bytearray(good)
    bad_crc[-8] ^= 0xFF  # the CRC32 field of the trailer
    (tmp_path / "crc.gz").write_bytes(bytes(bad_crc))
    with pytest.raises(DataError, match="crc.gz.*gzip"):
        idx.read_idx(tmp_path / "crc.gz")


def test_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="nothere"):
        idx.read_idx(tmp_path / "nothere")


def test_absurd_header_sizes(tmp_path):
    huge = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1) + bytes(10)
    (tmp_path / "huge").write_bytes(huge)  # raw: the file size gives it away before any allocation
    with pytest.raises(DataError, match="huge: truncated: expected .* found 10"):
        idx.read_idx(tmp_path / "huge")
    (tmp_path / "huge.gz").write_bytes(gzip.compress(huge))
    for reader in (idx.read_idx, idx.load_idx_images):
        with pytest.raises(DataError, match="huge.gz"):
            reader(tmp_path / "huge.gz")


def test_write_idx_is_atomic(tmp_path, monkeypatch):
    calls, real_replace = [], files.os.replace

    def spy(src, dst):
        calls.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", spy)
    idx.write_idx(tmp_path / "a.gz", np.zeros(3, np.uint8))
    [(src, dst)] = calls
    assert Path(src).parent == tmp_path and Path(dst) == tmp_path / "a.gz"

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(DataError, match="b.gz.*No space left"):
        idx.write_idx(tmp_path / "b.gz", np.zeros(3, np.uint8))
    assert listing(tmp_path) == ["a.gz"]


def test_load_idx_images_and_labels(tmp_path):
    images = np.arange(5 * 3 * 2, dtype=np.uint8).reshape(5, 3, 2) * 8
    idx.write_idx(tmp_path / "img.gz", images)
    x = idx.load_idx_images(tmp_path / "img.gz")
    assert x.shape == (5, 6) and x.dtype == np.float32
    np.testing.assert_allclose(x, images.reshape(5, 6) / 255.0, rtol=1e-6)
    assert idx.load_idx_images(tmp_path / "img.gz", dtype=np.float64).dtype == np.float64

    idx.write_idx(tmp_path / "lab", np.array([3, 0, 9], np.uint8))
    y = idx.load_idx_labels(tmp_path / "lab")
    assert y.dtype == np.int64 and y.tolist() == [3, 0, 9]
    idx.write_idx(tmp_path / "neg", np.array([1, -2], np.int8))
    with pytest.raises(DataError, match="neg.*non-negative"):
        idx.load_idx_labels(tmp_path / "neg")


@pytest.mark.parametrize(
    "dtype", [np.float32, np.uint8]
)  # uint8: the bytes stream straight into the output
def test_load_idx_images_chunked_truncation(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(idx, "_CHUNK_ROWS", 3)  # several chunks, truncation inside the second
    blob = idx_bytes(dims=(7, 2, 2), payload=bytes(range(20)))
    (tmp_path / "img.gz").write_bytes(gzip.compress(blob))
    with pytest.raises(DataError, match="img.gz: truncated: expected 28 bytes of data, found 20"):
        idx.load_idx_images(tmp_path / "img.gz", dtype=dtype)
    (tmp_path / "ok.gz").write_bytes(
        gzip.compress(idx_bytes(dims=(7, 2, 2), payload=bytes(range(28))))
    )
    x = idx.load_idx_images(tmp_path / "ok.gz", dtype=dtype)
    assert x.shape == (7, 4) and x.dtype == dtype
    if dtype == np.uint8:
        assert np.array_equal(x.ravel(), np.arange(28))
    else:
        np.testing.assert_allclose(x.ravel() * 255, range(28), atol=1e-4)


@pytest.mark.parametrize("array", [np.zeros((4, 784), np.uint8), np.zeros((2, 3, 3), np.float32)])
def test_images_must_be_3d_uint8(tmp_path, array):
    idx.write_idx(tmp_path / "flat-images", array)
    with pytest.raises(DataError, match="flat-images.*3-D uint8 images"):
        idx.load_idx_images(tmp_path / "flat-images")


def test_write_idx_rejects_unstorable(tmp_path):
    with pytest.raises(DataError, match="x: IDX stores.*not int64"):
        idx.write_idx(tmp_path / "x", np.zeros(3, np.int64))
    with pytest.raises(DataError, match="1 to 4.*shape \\(1, 1, 1, 1, 1\\)"):
        idx.write_idx(tmp_path / "x", np.zeros((1,) * 5, np.uint8))
    assert listing(tmp_path) == []
