"""Layers in matrix form, batch-first: every array is (batch, features).

Contract: ``forward(x)`` returns the output and caches what ``backward`` needs; ``backward(dy)`` takes
the gradient of the loss with respect to the output and returns the gradient with respect to the input,
storing parameter gradients *in place* in ``param.grad`` (the gradient of the last batch: nothing is
accumulated). The array module ``xp`` is read off the arrays, so one layer class serves NumPy and CuPy.

Formulas (course notes, "Layers"):

- Linear: ``y = x @ W + b``; ``dW = x.T @ dy``, ``db = dy.sum(0)``, ``dx = dy @ W.T``
- ReLU: ``y = max(0, x)``; ``dx = dy * (x > 0)``
- Sigmoid: ``y = 1 / (1 + exp(-x))``; ``dx = dy * y * (1 - y)``
- Tanh: ``y = tanh(x)``; ``dx = dy * (1 - y**2)``
- Softmax: ``y = exp(x - max) / sum``; ``dx = y * (dy - sum(dy * y, axis=1))``
"""
from __future__ import annotations

import numpy as np

from . import kernels
from .backend import device_of, get_array_module, to_device


# --- weight initialisers ------------------------------------------------------------------------
# Weight initialisers, drawn on the host with NumPy.
#
# Every draw happens in float64 on the host from a seeded ``numpy.random.Generator`` and is then cast and
# moved, so a CPU network and a GPU network (or a float32 and a float64 one) built from the same seed start
# from the same weights. Weights are small, random and non-zero: all-zero weights give all-zero hidden
# gradients and the network never learns (course notes, point 6).

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
        return f"Parameter({self.name!r}, shape={tuple(self.data.shape)}, dtype={self.data.dtype}, device={device_of(self.data)})"


class Layer:
    """Base class: no parameters, identity config, training mode on."""

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


def _check_float_input(x, name="x"):
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected a NumPy or CuPy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(
            f"{name}: expected floating-point data (float32), got {x.dtype}; "
            f"convert first, e.g. x.astype(np.float32) / 255 for pixels"
        )


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

    def _check(self, x):
        _check_float_input(x)
        W = self.W.data
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"x: expected shape (batch, {self.in_features}) for Linear({self.in_features}, "
                f"{self.out_features}), got {tuple(x.shape)}"
            )
        if x.dtype != W.dtype:
            raise TypeError(f"x: expected dtype {W.dtype} (the layer's), got {x.dtype}; cast with x.astype(...)")
        if device_of(x) != device_of(W):
            raise TypeError(
                f"x: expected an array on the {device_of(W)} (where the layer lives), got one on the "
                f"{device_of(x)}; move it with gpunet.backend.to_device(x, {device_of(W)!r})"
            )

    def forward(self, x, fuse_relu: bool = False, out=None, check: bool = True):
        """x (N, in) -> y (N, out). ``fuse_relu`` returns ``max(x @ W + b, 0)`` in one fused step.

        ``out`` (N, out) receives the result (a network passes its own reusable buffers); ``check=False``
        skips the input checks when the caller has already made them.
        """
        if check:
            self._check(x)
        self._x = x
        y = get_array_module(x).matmul(x, self.W.data, out=out)
        if fuse_relu:
            return kernels.bias_relu(y, self.b.data)
        y += self.b.data
        return y

    def backward(self, dy, need_dx: bool = True, out=None, update=None):
        """dy (N, out) -> dx (N, in); writes W.grad and b.grad. ``need_dx=False`` skips the dx matmul.

        ``update(layer, x, dy)``, if given, replaces writing the gradients: an optimizer applies its
        step right here (see ``Momentum.fused_update``); dx is computed first, from the old W.
        """
        xp = get_array_module(dy)
        dx = xp.matmul(dy, self.W.data.T, out=out) if need_dx else None
        if update is not None:
            update(self, self._x, dy)
        else:
            xp.matmul(self._x.T, dy, out=self.W.grad)
            dy.sum(axis=0, out=self.b.grad)
        return dx


class _Activation(Layer):
    """Elementwise activation that caches its *output* (enough for all derivatives used here)."""

    def __init__(self):
        self._y = None

    def forward(self, x):
        _check_float_input(x)
        return self.forward_(x.copy())

    def forward_(self, x):
        """Forward in place on ``x`` (an array the caller owns); returns it."""
        raise NotImplementedError

    def backward(self, dy):
        return self.backward_(dy.copy())

    def backward_(self, dy):
        """Backward in place on ``dy``; returns it."""
        raise NotImplementedError


class ReLU(_Activation):
    def forward_(self, x):
        self._y = kernels.relu_xp(x)
        return x

    def adopt(self, y):
        """Cache ``y``, already computed by a fused ``Linear.forward(..., fuse_relu=True)``."""
        self._y = y
        return y

    def backward_(self, dy):
        # y > 0 exactly where x > 0, so the cached output serves as the mask of the notes' dy * (x > 0)
        return kernels.relu_backward(dy, self._y)


class Sigmoid(_Activation):
    def forward_(self, x):
        xp = get_array_module(x)
        # sigmoid(x) = (1 + tanh(x/2)) / 2: no overflow of exp(-x) for large negative x
        x *= x.dtype.type(0.5)
        xp.tanh(x, out=x)
        x += 1
        x *= x.dtype.type(0.5)
        self._y = x
        return x

    def backward_(self, dy):
        y = self._y
        dy *= y
        dy *= 1 - y
        return dy


class Tanh(_Activation):
    def forward_(self, x):
        get_array_module(x).tanh(x, out=x)
        self._y = x
        return x

    def backward_(self, dy):
        y = self._y
        dy *= 1 - y * y
        return dy


class Softmax(_Activation):
    """Row-wise softmax, for probability outputs (use SoftmaxCrossEntropy on logits for training)."""

    def forward_(self, x):
        xp = get_array_module(x)
        x -= x.max(axis=1, keepdims=True)
        xp.exp(x, out=x)
        x /= x.sum(axis=1, keepdims=True)
        self._y = x
        return x

    def backward_(self, dy):
        y = self._y
        dy -= (dy * y).sum(axis=1, keepdims=True)
        dy *= y
        return dy


class Dropout(_Activation):
    """Inverted dropout: in training mode zero each unit with probability ``p`` and scale the rest by
    ``1 / (1 - p)``; in eval mode the identity. Masks are drawn on the array's own device."""

    def __init__(self, p: float = 0.5, seed: int | None = None):
        super().__init__()
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise ValueError(f"p: expected a dropout probability in [0, 1), got {p!r}")
        self.p = float(p)
        self.seed = seed
        self._rngs = {}
        self._mask = None

    def config(self):
        return {"type": "Dropout", "p": self.p}

    def _rng(self, xp):
        if xp.__name__ not in self._rngs:
            self._rngs[xp.__name__] = xp.random.default_rng(self.seed)
        return self._rngs[xp.__name__]

    def forward_(self, x):
        if not self.training or self.p == 0.0:
            self._mask = None
            return x
        xp = get_array_module(x)
        keep = 1.0 - self.p
        rng = self._rng(xp)
        if xp is np:
            # 16 random bits per unit rather than a float draw: 3x faster with NumPy (96 us instead of 310 us
            # for 128 x 512); the keep probability is rounded to a multiple of 2**-16
            mask = rng.integers(0, 1 << 16, size=x.shape, dtype=np.uint16) < min(round(keep * 65536), 65535)
        else:  # CuPy's Generator draws integers only as int32/int64: a float draw costs the same there
            mask = rng.random(x.shape, dtype=x.dtype) < keep
        scale = x.dtype.type(1.0 / keep)
        self._mask = mask * scale  # float mask, already scaled: backward is one multiply
        x *= self._mask
        return x

    def backward_(self, dy):
        if self._mask is not None:
            dy *= self._mask
        return dy


LAYERS = {cls.__name__: cls for cls in (Linear, ReLU, Sigmoid, Tanh, Softmax, Dropout)}
ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}
