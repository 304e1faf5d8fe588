"""The elementwise steps of the fast path, each picked by where its arrays live: the CUDA kernel for
CuPy arrays, the numba kernel for NumPy arrays when numba is installed, else in-place NumPy.

All work in place on arrays the fast step owns (C-contiguous, one float dtype). Their formulas are
the core's: ``max(x @ W + b, 0)``, ``dy * (x > 0)``, ``(softmax(z) - onehot) / N`` (tests compare
them).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from ..backend import get_array_module
from . import cuda, rules

_numba_why = []  # why the compiled CPU kernels are off, once known


@functools.lru_cache(maxsize=None)
def numba_kernels():
    """The module of compiled CPU kernels (:mod:`gpunet.fast.numba_kernels`), or None."""
    if os.environ.get("GPUNET_NUMBA", "1") == "0":
        _numba_why.append("GPUNET_NUMBA=0")
        return None
    try:
        from . import numba_kernels as compiled
    except ImportError as exc:  # numba missing: in-place NumPy serves
        _numba_why.append(
            f"{type(exc).__name__}: {exc}; pip install 'gpunet[numba]' for compiled ones"
        )
        return None
    except Exception as exc:  # numba unusable here, e.g. no writable folder for its on-disk cache
        hint = "; set NUMBA_CACHE_DIR to a writable folder" if "cannot cache" in str(exc) else ""
        _numba_why.append(f"{type(exc).__name__}: {exc}{hint}")
        return None
    return compiled


def numba_status() -> str:
    """Which kernels the CPU's elementwise steps run, in words."""
    if numba_kernels() is None:
        return f"in-place NumPy ({_numba_why[-1]})"
    import numba

    return f"compiled with numba {numba.__version__}"


def _cpu_kernels(*arrays):
    """The numba kernels if every array is a C-contiguous NumPy array of the first one's dtype."""
    dtype = arrays[0].dtype
    if all(type(a) is np.ndarray and a.flags.c_contiguous and a.dtype == dtype for a in arrays):
        return numba_kernels()
    return None


def bias_relu(y, b):
    """``y = max(y + b, 0)`` in place; y (N, C), b (C,); returns y."""
    if get_array_module(y) is not np:
        return cuda.bias_relu(y, b)
    if (compiled := _cpu_kernels(y, b)) is not None:
        compiled.bias_relu(y, b)
        return y
    y += b
    # against a zero row rather than the scalar 0: NumPy's loop with a scalar operand is not
    # vectorised
    return np.maximum(y, np.zeros(y.shape[-1:], y.dtype), out=y)


def relu_mask_backward(dy, y, mask):
    """``dy = (dy * mask) * (y > 0)`` in place (Dropout's backward, then ReLU's); returns dy."""
    if get_array_module(dy) is not np:
        return cuda.relu_mask_backward(dy, y, mask)
    if (compiled := _cpu_kernels(dy, y, mask)) is not None:
        compiled.relu_mask_backward(dy, y, mask)
        return dy
    dy *= mask
    return relu_backward(dy, y)


def relu_backward(dy, y):
    """``dy = dy * (y > 0)`` in place, ``y`` the ReLU output; returns dy."""
    if get_array_module(dy) is not np:
        return cuda.relu_backward(dy, y)
    if (compiled := _cpu_kernels(dy, y)) is not None:
        compiled.relu_backward(dy, y)
        return dy
    return np.multiply(dy, y > 0, out=dy)


def update(opt, i: int, k: dict) -> None:
    """``opt.params[i]`` stepped by the optimizer's own rule, ``k`` its step's numbers
    (``opt.begin_step()``), through the kernel generated from that rule (:mod:`gpunet.fast.rules`):
    CUDA for CuPy arrays, numba for C-contiguous NumPy arrays of one dtype, else the core's rule
    itself. The optimizer hands its arrays to the kernel (``Optimizer.update``): nothing here
    touches its state."""
    p = opt.params[i]
    if get_array_module(p.data) is not np:
        opt.update(i, k, cuda.rule(opt))
        return
    compiled = _cpu_kernels(p.data, p.grad, *opt.buffers(i))
    if compiled is None:
        opt.update(i, k)
        return
    opt.update(i, k, _flat_rule(opt))


_FLAT_RULES: dict = {}  # (optimizer class, variant) -> its kernel on the parameter's own arrays


def _flat_rule(opt):
    """``run(w, g, *state, *scalars)``: the rule's numba kernel on flat views of the arrays,
    compiled once per process for each optimizer class and variant (a rule's text follows from
    them alone), not looked up at every parameter's step: generating the text took about as long
    as stepping a bias."""
    key = (type(opt), rules.variant(opt))
    run = _FLAT_RULES.get(key)
    if run is None:
        kernel = numba_kernels().rule(rules.numba_source(opt))
        arrays = 2 + len(opt.slots)  # w, g, the state; then the scalars
        run = _FLAT_RULES[key] = lambda *args: kernel(*_flat(args, arrays))
    return run


def _flat(args, arrays: int):
    return [a.reshape(-1) for a in args[:arrays]] + list(args[arrays:])


def dropout(layer, y, mask):
    """Layer ``layer``'s next mask applied to y (N, C) in place; returns the mask: ``mask``, a
    buffer shaped like y, which one kernel draws, scales and applies (CUDA, or numba on the CPU:
    the core's bits in one call, where NumPy makes about ten passes); without numba the core's own
    mask."""
    if get_array_module(y) is not np:
        cuda.dropout(y, mask, layer.next_key(), layer.threshold, layer.scale, layer.mask_start(y))
        return mask
    if mask is not None and (compiled := _cpu_kernels(y, mask)) is not None:
        key = np.uint64(layer.next_key())  # drawn first, as new_mask draws it
        start = np.uint64(layer.mask_start(y))
        compiled.dropout(y, mask, key, start, np.uint64(layer.threshold), y.dtype.type(layer.scale))
        return mask
    mask = layer.new_mask(y)
    y *= mask
    return mask


def softmax_xent(z, labels, grad, loss_rows):
    """Per row ``loss_rows = logsumexp(z) - z[label]`` and ``grad = (softmax(z) - onehot) / N``.

    z, grad (N, C) and loss_rows (N,) C-contiguous of one float dtype; labels (N,) integers in [0,
    C).
    """
    if get_array_module(z) is not np:
        return cuda.softmax_xent(z, labels, grad, loss_rows)
    n = z.shape[0]
    if (compiled := _cpu_kernels(z, grad, loss_rows)) is not None:
        compiled.softmax_xent(
            z, np.ascontiguousarray(labels), grad, loss_rows, z.dtype.type(1.0 / n)
        )
        return grad, loss_rows
    rows = np.arange(n)
    m = z.max(axis=1, keepdims=True)
    np.subtract(z, m, out=grad)
    np.exp(grad, out=grad)
    s = grad.sum(axis=1, keepdims=True)
    np.log(s[:, 0], out=loss_rows)
    loss_rows += m[:, 0]
    loss_rows -= z[rows, labels]
    inv_n = grad.dtype.type(1.0 / n)
    grad *= np.reciprocal(s, out=s) * inv_n
    grad[rows, labels] -= inv_n
    return grad, loss_rows


def gather_scaled(src, idx, out, divisor):
    """``out[:K] = src[idx] / divisor`` in ``out``'s dtype; src (N, F) uint8, idx (K,) integers, out
    (>= K, F) float; returns ``out[:K]``. One pass: a CUDA kernel on the GPU, compiled on the CPU
    where numba is installed."""
    dst = out[: idx.shape[0]]
    xp = get_array_module(src)
    if xp is not np and src.dtype == np.uint8 and src.flags.c_contiguous and dst.flags.c_contiguous:
        return cuda.gather_scaled(src, xp.ascontiguousarray(idx, dtype=np.int64), dst, divisor)
    if (
        type(src) is np.ndarray
        and type(idx) is np.ndarray
        and type(out) is np.ndarray
        and src.dtype == np.uint8
        and idx.dtype.kind in "iu"
        and src.flags.c_contiguous
        and out.flags.c_contiguous
        and out.dtype.char in "fd"
        and (compiled := numba_kernels()) is not None
    ):
        compiled.gather_scaled(src, idx, out, out.dtype.type(divisor))
        return dst
    return xp.divide(xp.take(src, idx, axis=0), out.dtype.type(divisor), out=dst, dtype=out.dtype)


@functools.lru_cache(maxsize=None)
def _numba_resample():
    """The compiled resampling kernel (:mod:`gpunet.fast.numba_resample`), or None where the CPU
    kernels are off."""
    if numba_kernels() is None:
        return None
    from . import numba_resample

    return numba_resample.affine_elastic_bilinear


def resample(images, maps, fields, shape):
    """The augmentation's resampling (:func:`gpunet.augment.bilinear` at
    :func:`gpunet.augment.source_points`) in one pass: one CUDA kernel for CuPy arrays of one dtype,
    numba's for C-contiguous NumPy arrays of one dtype; None elsewhere (the core's runs)."""
    arrays = (images, maps) if fields is None else (images, maps, fields)
    xp = get_array_module(images)
    if xp is not np and all(
        a.dtype == images.dtype for a in arrays
    ):  # the GPU: one RawKernel launch
        return cuda.resample(
            xp.ascontiguousarray(images),
            xp.ascontiguousarray(maps),
            None if fields is None else xp.ascontiguousarray(fields),
            shape,
        )
    if xp is not np or (kernel := _numba_resample()) is None or _cpu_kernels(*arrays) is None:
        return None
    out = np.empty_like(images)
    kernel(
        images,
        maps,
        np.zeros((1, 2, 1, 1), images.dtype) if fields is None else fields,
        fields is not None,
        shape[0],
        shape[1],
        out,
    )
    return out
