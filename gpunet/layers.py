"""Layers in matrix form, batch-first: every array is (batch, features).

Contract: ``forward(x)`` returns the output and caches what ``backward`` needs; ``backward(dy)`` takes
the gradient of the loss with respect to the output and returns the gradient with respect to the input,
writing parameter gradients *in place* into ``param.grad`` (the last batch's gradient: nothing
accumulates). The array module ``xp`` is read off the arrays, so one class serves NumPy and CuPy.

These are the notes' formulas, each written once and plainly; they are what runs when the fast path
(:mod:`gpunet.fast`) is off or does not apply, and the reference that the fast path is tested against.
"""
from __future__ import annotations

import numpy as np

from .backend import device_of, get_array_module, softmax, to_device

# --- weights start small, random and non-zero (course notes, point 6) --------------------------------
# Every draw happens in float64 on the host from a seeded ``numpy.random.Generator`` and is then cast and
# moved, so a CPU network and a GPU network (or a float32 and a float64 one) built from the same seed start
# from the same weights. All-zero weights give all-zero hidden gradients: the network would never learn.

INITIALIZERS = ("he", "xavier", "uniform")


def make_rng(rng=None) -> np.random.Generator:
    """A NumPy Generator from ``None`` (fresh entropy), an int seed, or a Generator (used as is)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng: expected None, an int seed or a numpy.random.Generator, got {type(rng).__name__}")


def initialize(name: str, fan_in: int, fan_out: int, rng=None, dtype=np.float32, scale: float = 0.05):
    """A (fan_in, fan_out) host array for ``Linear.W``.

    - ``"he"``: normal with std ``sqrt(2 / fan_in)``, for ReLU layers (He et al., 2015).
    - ``"xavier"``: uniform on ``±sqrt(6 / (fan_in + fan_out))``, for sigmoid/tanh/output layers
      (Glorot and Bengio, 2010).
    - ``"uniform"``: small uniform on ``±scale`` (the course notes' "small random values").
    """
    gen = make_rng(rng)
    shape = (int(fan_in), int(fan_out))
    if name == "he":
        w = gen.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
    elif name == "xavier":
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        w = gen.uniform(-limit, limit, size=shape)
    elif name == "uniform":
        if not scale > 0:
            raise ValueError(f"scale: expected a positive number, got {scale!r}")
        w = gen.uniform(-scale, scale, size=shape)
    else:
        raise ValueError(f"init: expected one of {', '.join(INITIALIZERS)}, got {name!r}")
    return w.astype(dtype)


class Parameter:
    """A trainable array ``data`` and its gradient ``grad`` (same shape, dtype and device)."""

    __slots__ = ("data", "grad", "name")

    def __init__(self, data, name: str = ""):
        self.data = data
        self.grad = get_array_module(data).zeros_like(data)
        self.name = name

    def __repr__(self):
        return (f"Parameter({self.name!r}, shape={tuple(self.data.shape)}, dtype={self.data.dtype}, "
                f"device={device_of(self.data)})")


class Layer:
    """Base class: no parameters, training mode on."""

    training = True

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def parameters(self) -> list:
        return []

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def config(self) -> dict:
        """What is needed to rebuild the layer (weights excluded); saved in model files."""
        return {"type": type(self).__name__}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


def check_float_input(x, name="x"):
    """Raise a TypeError naming ``name`` unless ``x`` is a NumPy or CuPy floating-point array."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected a NumPy or CuPy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected floating-point data (float32), got {x.dtype}; "
                        f"convert first, e.g. x.astype(np.float32) / 255 for pixels")


class Linear(Layer):
    """Fully connected layer ``y = x @ W + b`` with W (in_features, out_features), b (out_features,).

    ``init`` is ``"he"`` (ReLU layers), ``"xavier"`` (sigmoid/tanh/output) or ``"uniform"`` (small
    uniform); weights are drawn on the host from ``rng`` (seed or Generator) and moved to ``device``.
    """

    def __init__(self, in_features: int, out_features: int, init: str = "he", rng=None,
                 dtype=np.float32, device: str | None = None):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if init not in INITIALIZERS:
            raise ValueError(f"init: expected one of {', '.join(INITIALIZERS)}, got {init!r}")
        self.in_features, self.out_features, self.init = int(in_features), int(out_features), init
        w = initialize(init, self.in_features, self.out_features, make_rng(rng), dtype)
        self.W = Parameter(to_device(w, device), "W")
        self.b = Parameter(to_device(np.zeros(self.out_features, dtype=dtype), device), "b")
        self._x = None

    def parameters(self):
        return [self.W, self.b]

    def config(self):
        return {"type": "Linear", "in_features": self.in_features, "out_features": self.out_features,
                "init": self.init}

    def check_input(self, x):
        """Raise naming the expected and the actual shape, dtype or device of ``x``."""
        check_float_input(x)
        W = self.W.data
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x: expected shape (batch, {self.in_features}) for Linear({self.in_features}, "
                             f"{self.out_features}), got {tuple(x.shape)}")
        if x.dtype != W.dtype:
            raise TypeError(f"x: expected dtype {W.dtype} (the layer's), got {x.dtype}; cast with x.astype(...)")
        if device_of(x) != device_of(W):
            raise TypeError(f"x: expected an array on the {device_of(W)} (where the layer lives), got one on "
                            f"the {device_of(x)}; move it with gpunet.backend.to_device(x, {device_of(W)!r})")

    def forward(self, x):
        """x (N, in) -> y = x @ W + b (N, out)."""
        self.check_input(x)
        self._x = x
        return x @ self.W.data + self.b.data

    def backward(self, dy):
        """dy (N, out) -> dx = dy @ W.T (N, in); writes dW = x.T @ dy and db = dy.sum(0)."""
        self.W.grad[...] = self._x.T @ dy
        self.b.grad[...] = dy.sum(axis=0)
        return dy @ self.W.data.T


class ReLU(Layer):
    """``y = max(x, 0)``; ``dx = dy * (x > 0)``."""

    def forward(self, x):
        check_float_input(x)
        self._x = x
        return get_array_module(x).maximum(x, x.dtype.type(0))

    def backward(self, dy):
        return dy * (self._x > 0)


class Sigmoid(Layer):
    """``y = 1 / (1 + exp(-x))``; ``dx = dy * y * (1 - y)``."""

    def forward(self, x):
        check_float_input(x)
        half = x.dtype.type(0.5)
        # the same function written as (1 + tanh(x/2)) / 2: exp(-x) would overflow for large negative x
        self._y = half * (1 + get_array_module(x).tanh(half * x))
        return self._y

    def backward(self, dy):
        return dy * self._y * (1 - self._y)


class Tanh(Layer):
    """``y = tanh(x)``; ``dx = dy * (1 - y**2)``."""

    def forward(self, x):
        check_float_input(x)
        self._y = get_array_module(x).tanh(x)
        return self._y

    def backward(self, dy):
        return dy * (1 - self._y * self._y)


class Softmax(Layer):
    """Row-wise ``y = exp(x_j) / sum_k exp(x_k)`` (:func:`gpunet.backend.softmax`);
    ``dx = y * (dy - sum(dy * y, axis=1))``. For probability outputs; train with ``SoftmaxCrossEntropy``
    on logits instead."""

    def forward(self, x):
        check_float_input(x)
        self._y = softmax(x)
        return self._y

    def backward(self, dy):
        return self._y * (dy - (dy * self._y).sum(axis=1, keepdims=True))


class Dropout(Layer):
    """Inverted dropout: in training mode ``y = x * mask``, where the mask zeroes each unit with
    probability ``p`` and scales the rest by ``1 / (1 - p)``; ``dx = dy * mask``. The identity in eval
    mode. Masks are drawn on the array's own device from a generator seeded with ``seed``."""

    def __init__(self, p: float = 0.5, seed: int | None = None):
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise ValueError(f"p: expected a dropout probability in [0, 1), got {p!r}")
        self.p = float(p)
        self.seed = seed
        self.generators = {}  # one per array module ("numpy", "cupy"), made on first use
        self.gpu_draws = []   # [shape, count] of every CuPy mask drawn since seeding: how to replay them
        self._mask = None

    def config(self):
        return {"type": "Dropout", "p": self.p}

    def generator(self, xp):
        """This layer's random generator for the array module ``xp``: NumPy's default (PCG64), or on
        CuPy a Philox4x32-10 one. CuPy's default (XORWOW) sets up one state per GPU thread at creation
        through a slow skip-ahead, queued asynchronously, so it would land in the first epoch's timing;
        Philox's per-thread setup is a counter offset, cheap."""
        if xp.__name__ not in self.generators:
            if xp is np:
                self.generators[xp.__name__] = np.random.default_rng(self.seed)
            else:
                self.generators[xp.__name__] = xp.random.default_rng(xp.random.Philox4x3210(self.seed))
        return self.generators[xp.__name__]

    def new_mask(self, x):
        """A fresh scaled keep-mask shaped and typed like ``x`` (entries 0 or 1/(1-p)), or None when
        dropout is off (eval mode, p = 0)."""
        if not self.training or self.p == 0.0:
            return None
        xp, keep = get_array_module(x), 1.0 - self.p
        if xp is np:
            # 16 random bits per unit rather than a float draw: faster with NumPy (BENCHMARKS.md); the keep
            # probability is rounded to a multiple of 2**-16
            kept = self.generator(xp).integers(0, 1 << 16, size=x.shape, dtype=np.uint16) < min(round(keep * 65536), 65535)
        else:  # CuPy's Generator draws integers only as int32/int64: a float draw costs the same there
            kept = self.generator(xp).random(x.shape, dtype=x.dtype) < keep
            self._count_gpu_draw(list(x.shape), x.dtype.name)
        return kept * x.dtype.type(1.0 / keep)

    def _count_gpu_draw(self, shape, dtype):
        if self.gpu_draws and self.gpu_draws[-1][:2] == [shape, dtype]:
            self.gpu_draws[-1][2] += 1
        else:
            self.gpu_draws.append([shape, dtype, 1])

    def random_state(self) -> dict:
        """Where this layer's random draws stand, as plain JSON data: NumPy's generator state exactly;
        for CuPy, whose generator state stays on the device, the draws made since seeding."""
        gen = self.generators.get("numpy")
        return {"seed": self.seed, "numpy": None if gen is None else gen.bit_generator.state,
                "gpu_draws": [list(d) for d in self.gpu_draws]}

    def set_random_state(self, state: dict) -> None:
        """Continue exactly where :meth:`random_state` was taken (the CuPy draws are replayed)."""
        if state.get("seed") != self.seed:
            raise ValueError(f"state: expected a dropout state for seed {self.seed}, got seed {state.get('seed')}")
        self.generators = {}
        if state.get("numpy") is not None:
            self.generator(np).bit_generator.state = state["numpy"]
        self.gpu_draws = []
        if state.get("gpu_draws"):
            import cupy  # only a GPU run leaves CuPy draws to replay

            gen = self.generator(cupy)
            for shape, dtype, count in state["gpu_draws"]:
                for _ in range(count):
                    gen.random(tuple(shape), dtype=dtype)
            self.gpu_draws = [list(d) for d in state["gpu_draws"]]

    def forward(self, x):
        check_float_input(x)
        self._mask = self.new_mask(x)
        return x if self._mask is None else x * self._mask

    def backward(self, dy):
        return dy if self._mask is None else dy * self._mask


LAYERS = {cls.__name__: cls for cls in (Linear, ReLU, Sigmoid, Tanh, Softmax, Dropout)}
ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}
