"""Layers in matrix form, batch-first: every array is (batch, features).

Contract: ``forward(x)`` returns the output and caches what ``backward`` needs; ``backward(dy)``
takes the gradient of the loss with respect to the output and returns the gradient with respect to
the input, writing parameter gradients *in place* into ``param.grad`` (the last batch's gradient:
nothing accumulates). The array module ``xp`` is read off the arrays, so one class serves NumPy and
CuPy.

These are the notes' formulas, each written once and plainly; they are what runs when the fast path
(:mod:`gpunet.fast`) is off or does not apply, and the reference that the fast path is tested
against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .backend import Array, ArrayLike, DTypeLike, device_of, get_array_module, softmax, to_device

if TYPE_CHECKING:
    from typing_extensions import Self

# --- weights start small, random and non-zero (course notes, point 6) -----------------------------
# Every draw happens in float64 on the host from a seeded ``numpy.random.Generator`` and is then
# cast and moved, so a CPU network and a GPU network (or a float32 and a float64 one) built from the
# same seed start from the same weights. All-zero weights give all-zero hidden gradients: the
# network would never learn.

L = TypeVar("L", bound="Layer")

INITIALIZERS = ("he", "xavier", "uniform")


def make_rng(rng: int | np.random.Generator | None = None) -> np.random.Generator:
    """A NumPy Generator from ``None`` (fresh entropy), an int seed, or a Generator (used as is)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise TypeError(
        f"rng: expected None, an int seed or a numpy.random.Generator, got {type(rng).__name__}"
    )


def initialize(
    name: str,
    fan_in: int,
    fan_out: int,
    rng: int | np.random.Generator | None = None,
    dtype: DTypeLike = np.float32,
    scale: float = 0.05,
) -> np.ndarray:
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

    def __init__(self, data: Array, name: str = "") -> None:
        self.data = data
        self.grad = get_array_module(data).zeros_like(data)
        self.name = name

    def __repr__(self) -> str:
        return (
            f"Parameter({self.name!r}, shape={tuple(self.data.shape)}, dtype={self.data.dtype}, "
            f"device={device_of(self.data)})"
        )


class Layer:
    """Base class: no parameters, no buffers, training mode on."""

    training = True
    # arrays that are state but not trained (saved with the weights, moved with them)
    buffer_names: tuple = ()

    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def backward(self, dy: Array) -> Array:
        raise NotImplementedError

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def parameters(self) -> list[Parameter]:
        return []

    def train(self, mode: bool = True) -> Self:
        self.training = bool(mode)
        return self

    def eval(self) -> Self:
        return self.train(False)

    def config(self) -> dict:
        """What is needed to rebuild the layer (weights excluded); saved in model files: ``"type"``
        (the class name) and the constructor's arguments, as JSON data."""
        return {"type": type(self).__name__}

    @classmethod
    def from_config(cls, config: dict) -> Self:
        """The layer that ``config`` describes: the constructor called with every entry but
        ``"type"``."""
        return cls(**{k: v for k, v in config.items() if k != "type"})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


def check_float_input(x: Any, name: str = "x") -> None:
    """Raise a TypeError naming ``name`` unless ``x`` is a NumPy or CuPy floating-point array."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name}: expected a NumPy or CuPy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(
            f"{name}: expected floating-point data (float32), got {x.dtype}; "
            f"convert first, e.g. x.astype(np.float32) / 255 for pixels"
        )


class Linear(Layer):
    """Fully connected layer ``y = x @ W + b`` with W (in_features, out_features), b
    (out_features,).

    ``init`` is ``"he"`` (ReLU layers), ``"xavier"`` (sigmoid/tanh/output) or ``"uniform"`` (small
    uniform); weights are drawn on the host from ``rng`` (seed or Generator) and moved to
    ``device``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init: str = "he",
        rng: int | np.random.Generator | None = None,
        dtype: DTypeLike = np.float32,
        device: str | None = None,
    ) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if init not in INITIALIZERS:
            raise ValueError(f"init: expected one of {', '.join(INITIALIZERS)}, got {init!r}")
        self.in_features, self.out_features, self.init = int(in_features), int(out_features), init
        w = initialize(init, self.in_features, self.out_features, make_rng(rng), dtype)
        self.W = Parameter(to_device(w, device), "W")
        self.b = Parameter(to_device(np.zeros(self.out_features, dtype=dtype), device), "b")
        self._x: Any = None  # the last forward's input (an array), for backward

    def parameters(self) -> list[Parameter]:
        return [self.W, self.b]

    def config(self) -> dict:
        return {
            "type": "Linear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "init": self.init,
        }

    def check_input(self, x: Array) -> None:
        """Raise naming the expected and the actual shape, dtype or device of ``x``."""
        check_float_input(x)
        W = self.W.data
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"x: expected shape (batch, {self.in_features}) for Linear({self.in_features}, "
                f"{self.out_features}), got {tuple(x.shape)}"
            )
        if x.dtype != W.dtype:
            raise TypeError(
                f"x: expected dtype {W.dtype} (the layer's), got {x.dtype}; cast with x.astype(...)"
            )
        if device_of(x) != device_of(W):
            raise TypeError(
                f"x: expected an array on the {device_of(W)} (where the layer lives), got one on "
                f"the {device_of(x)}; move it with gpunet.backend.to_device(x, {device_of(W)!r})"
            )

    def forward(self, x: Array) -> Array:
        """x (N, in) -> y = x @ W + b (N, out)."""
        self.check_input(x)
        self._x = x
        return x @ self.W.data + self.b.data

    def backward(self, dy: Array) -> Array:
        """dy (N, out) -> dx = dy @ W.T (N, in); writes dW = x.T @ dy and db = dy.sum(0)."""
        self.W.grad[...] = self._x.T @ dy
        self.b.grad[...] = dy.sum(axis=0)
        return dy @ self.W.data.T


class ReLU(Layer):
    """``y = max(x, 0)``; ``dx = dy * (x > 0)``."""

    def forward(self, x: Array) -> Array:
        check_float_input(x)
        self._x = x
        return get_array_module(x).maximum(x, x.dtype.type(0))

    def backward(self, dy: Array) -> Array:
        return dy * (self._x > 0)


class Sigmoid(Layer):
    """``y = 1 / (1 + exp(-x))``; ``dx = dy * y * (1 - y)``."""

    def forward(self, x: Array) -> Array:
        check_float_input(x)
        half = x.dtype.type(0.5)
        # the same function written as (1 + tanh(x/2)) / 2: exp(-x) would overflow for large
        # negative x
        self._y = half * (1 + get_array_module(x).tanh(half * x))
        return self._y

    def backward(self, dy: Array) -> Array:
        return dy * self._y * (1 - self._y)


class Tanh(Layer):
    """``y = tanh(x)``; ``dx = dy * (1 - y**2)``."""

    def forward(self, x: Array) -> Array:
        check_float_input(x)
        self._y = get_array_module(x).tanh(x)
        return self._y

    def backward(self, dy: Array) -> Array:
        return dy * (1 - self._y * self._y)


class Softmax(Layer):
    """Row-wise ``y = exp(x_j) / sum_k exp(x_k)`` (:func:`gpunet.backend.softmax`);
    ``dx = y * (dy - sum(dy * y, axis=1))``. For probability outputs; train with
    ``SoftmaxCrossEntropy`` on logits instead."""

    def forward(self, x: Array) -> Array:
        check_float_input(x)
        self._y = softmax(x)
        return self._y

    def backward(self, dy: Array) -> Array:
        return self._y * (dy - (dy * self._y).sum(axis=1, keepdims=True))


# --- dropout's random bits: a counter-based draw, computed where the data lives -------------------
# A mask keyed k gives unit i the 16-bit lane (i % 4) of word (i // 4) of SplitMix64's output stream
# started at k: word j is mix(k + (j + 1) * GOLDEN), with mix SplitMix64's finaliser. The key comes
# from the layer's NumPy generator on the host, one per mask, so a CPU and a GPU run draw the same
# masks, the state to checkpoint is the host generator's alone, and no device generator (sized to
# the GPU) exists at all. i is the unit's flat index in the *global* batch: a data-parallel rank
# whose shard starts at row r of the batch draws units from r * C on (Dropout.row_start), so K ranks
# draw exactly the one process's mask.
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def dropout_bits(xp: Any, key: int, size: int, start: int = 0) -> Array:
    """(size,) uint16 uniform random bits of units ``start`` to ``start + size - 1`` of the mask
    keyed ``key`` (see above), on ``xp``'s device."""
    u = xp.uint64
    first, lane = divmod(start, 4)
    x = xp.arange(first + 1, (start + size + 3) // 4 + 1, dtype=u)
    x *= u(GOLDEN)  # unsigned arithmetic wraps modulo 2**64, as SplitMix64 means it to
    x += u(key)
    x ^= x >> u(30)
    x *= u(MIX1)
    x ^= x >> u(27)
    x *= u(MIX2)
    x ^= x >> u(31)
    return x.astype("<u8", copy=False).view("<u2")[
        lane : lane + size
    ]  # little-endian: lane 0 is the low bits


class Dropout(Layer):
    """Inverted dropout: in training mode ``y = x * mask``, where the mask zeroes each unit with
    probability ``p`` and scales the rest by ``1 / (1 - p)``; ``dx = dy * mask``. The identity in
    eval mode. A unit is kept when its 16 random bits (:func:`dropout_bits`) lie below
    ``threshold``, i.e. with probability ``1 - p`` rounded to a multiple of 2**-16; each mask's key
    is drawn from a NumPy generator seeded with ``seed``, on the host, whatever the device.
    ``row_start`` is the row of the global batch where this process's rows begin (a data-parallel
    rank's shard; 0 for a single process): row j here takes row ``row_start + j`` of the global
    batch's mask."""

    # the draw above, named in checkpoints: another draw cannot continue one
    STREAM = "splitmix64-lanes16"

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
            raise ValueError(f"p: expected a dropout probability in [0, 1), got {p!r}")
        self.p = float(p)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.threshold = min(round((1.0 - self.p) * 65536), 65535)
        self.scale = 1.0 / (1.0 - self.p)  # a kept unit's value in the mask
        self.row_start = 0
        self._mask: Array | None = None

    def config(self) -> dict:
        return {"type": "Dropout", "p": self.p}

    def active(self) -> bool:
        return self.training and self.p > 0.0

    def next_key(self) -> int:
        """The key of the next mask (a draw from the host generator)."""
        return int(self.rng.integers(0, 2**63))

    def mask_start(self, x: Array) -> int:
        """The global flat index of ``x``'s (N, ...) first unit: ``row_start`` times the units of a
        row."""
        return self.row_start * int(np.prod(x.shape[1:], dtype=np.int64))

    def new_mask(self, x: Array) -> Array | None:
        """A fresh scaled keep-mask shaped and typed like ``x`` (entries 0 or 1/(1-p)), or None when
        dropout is off (eval mode, p = 0)."""
        if not self.active():
            return None
        xp = get_array_module(x)
        kept = (
            dropout_bits(xp, self.next_key(), x.size, self.mask_start(x)).reshape(x.shape)
            < self.threshold
        )
        return kept * x.dtype.type(self.scale)

    def random_state(self) -> dict:
        """Where this layer's draws stand, as plain JSON data (the host generator's state): the same
        on every device, so a run resumes exactly on the CPU or a GPU, whichever wrote it."""
        return {"seed": self.seed, "stream": self.STREAM, "numpy": self.rng.bit_generator.state}

    def set_random_state(self, state: dict) -> None:
        """Continue exactly where :meth:`random_state` was taken."""
        if state.get("seed") != self.seed:
            raise ValueError(
                f"state: expected a dropout state for seed {self.seed}, got seed "
                f"{state.get('seed')}"
            )
        if state.get("stream") != self.STREAM:
            raise ValueError(
                f"state: expected dropout draws of the {self.STREAM} stream, got "
                f"{state.get('stream', 'an older gpunet')}'s; start the run anew"
            )
        self.rng = np.random.Generator(np.random.PCG64())
        self.rng.bit_generator.state = state["numpy"]

    def forward(self, x: Array) -> Array:
        check_float_input(x)
        self._mask = self.new_mask(x)
        return x if self._mask is None else x * self._mask

    def backward(self, dy: Array) -> Array:
        return dy if self._mask is None else dy * self._mask


class BatchNorm(Layer):
    """Batch normalisation (Ioffe and Szegedy, 2015) of each feature, as ``torch.nn.BatchNorm1d``.

    Training mode, over the batch x (N, F) with N >= 2:

        mu = mean(x, 0);  var = mean((x - mu)^2, 0);  sigma = sqrt(var + eps);  xhat = (x - mu) /
        sigma y = gamma * xhat + beta
        running_mean = (1 - momentum) running_mean + momentum mu
        running_var  = (1 - momentum) running_var + momentum var * N / (N - 1)   (unbiased, as
    PyTorch)

    backward: ``dgamma = sum(dy * xhat, 0)``, ``dbeta = sum(dy, 0)``,
    ``dx = (1/N) * gamma / sigma * (N dy - sum(dy, 0) - xhat * sum(dy * xhat, 0))``.
    Eval mode uses the running statistics instead (``sigma = sqrt(running_var + eps)``), an affine
    map: ``dx = dy * gamma / sigma``. Parameters ``gamma`` (ones) then ``beta`` (zeros), each (F,);
    buffers ``running_mean`` (zeros) and ``running_var`` (ones), (F,), saved with the weights.
    """

    buffer_names = ("running_mean", "running_var")

    def __init__(
        self,
        features: int,
        momentum: float = 0.1,
        eps: float = 1e-5,
        dtype: DTypeLike = np.float32,
        device: str | None = None,
    ) -> None:
        if (
            not isinstance(features, (int, np.integer))
            or isinstance(features, bool)
            or features < 1
        ):
            raise ValueError(f"features: expected a positive integer, got {features!r}")
        for name, value, ok in (
            ("momentum", momentum, lambda v: 0 <= v <= 1),
            ("eps", eps, lambda v: v > 0),
        ):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
                raise ValueError(
                    f"{name}: expected a number {'in [0, 1]' if name == 'momentum' else '> 0'}, "
                    f"got {value!r}"
                )
        self.features, self.momentum, self.eps = int(features), float(momentum), float(eps)
        self.gamma = Parameter(to_device(np.ones(self.features, dtype), device), "gamma")
        self.beta = Parameter(to_device(np.zeros(self.features, dtype), device), "beta")
        self.running_mean = to_device(np.zeros(self.features, dtype), device)
        self.running_var = to_device(np.ones(self.features, dtype), device)
        self._xhat = self._inv_sigma = None

    def parameters(self) -> list[Parameter]:
        return [self.gamma, self.beta]

    def config(self) -> dict:
        return {
            "type": "BatchNorm",
            "features": self.features,
            "momentum": self.momentum,
            "eps": self.eps,
        }

    def forward(self, x: Array) -> Array:
        """x (N, F) -> y (N, F); in training mode also updates the running statistics."""
        check_float_input(x)
        if x.ndim != 2 or x.shape[1] != self.features:
            raise ValueError(
                f"x: expected shape (batch, {self.features}) for BatchNorm({self.features}), "
                f"got {tuple(x.shape)}"
            )
        xp, t = get_array_module(x), x.dtype.type
        if self.training:
            n = x.shape[0]
            if n < 2:
                raise ValueError(
                    f"x: expected a batch of at least 2 rows in training mode (a batch's "
                    f"variance), "
                    f"got {n}; use a larger batch, or eval mode"
                )
            mu = x.mean(axis=0)
            centred = x - mu
            var = (centred * centred).mean(axis=0)
            m = t(self.momentum)
            self.running_mean *= t(1 - self.momentum)
            self.running_mean += m * mu
            self.running_var *= t(1 - self.momentum)
            self.running_var += (m * t(n / (n - 1))) * var
        else:
            centred, var = x - self.running_mean, self.running_var
        self._inv_sigma = t(1) / xp.sqrt(var + t(self.eps))
        self._xhat = centred * self._inv_sigma
        return self.gamma.data * self._xhat + self.beta.data

    def backward(self, dy: Array) -> Array:
        """dy (N, F) -> dx (N, F); writes dgamma = sum(dy * xhat) and dbeta = sum(dy)."""
        xhat = self._xhat
        self.gamma.grad[...] = (dy * xhat).sum(axis=0)
        self.beta.grad[...] = dy.sum(axis=0)
        scale = self.gamma.data * self._inv_sigma
        if not self.training:
            return dy * scale
        n = dy.shape[0]
        t = dy.dtype.type
        return (scale * t(1.0 / n)) * (t(n) * dy - self.beta.grad - xhat * self.gamma.grad)


class Standardize(Layer):
    """Fixed feature scaling ``y = (x - shift) / scale``; ``dx = dy / scale``. ``shift`` and
    ``scale`` (features,) are numbers, not parameters: the statistics of the training set (its mean
    and standard deviation, or its minimum and range), which ``gpunet train --data`` puts first in
    the model it saves, so that whoever loads it feeds the features as they are. A scale of 0 (a
    constant feature) counts as 1."""

    def __init__(self, shift: ArrayLike, scale: ArrayLike) -> None:
        shift, scale = np.asarray(shift, dtype=np.float64), np.asarray(scale, dtype=np.float64)
        if shift.ndim != 1 or shift.shape != scale.shape or not len(shift):
            raise ValueError(
                f"shift, scale: expected two lists of one number per feature, got shapes "
                f"{shift.shape} and {scale.shape}"
            )
        if not (np.isfinite(shift).all() and np.isfinite(scale).all() and (scale >= 0).all()):
            raise ValueError("shift, scale: expected finite numbers and scales >= 0")
        self.shift, self.scale = shift, np.where(scale > 0, scale, 1.0)
        # (array module, dtype) -> (shift, 1 / scale) there: cast and moved once
        self._cast: dict[tuple[str, str], tuple[Array, ...]] = {}

    def config(self) -> dict:
        return {"type": "Standardize", "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    def _constants(self, x: Array) -> tuple[Array, ...]:
        key = (get_array_module(x).__name__, x.dtype.str)
        if key not in self._cast:
            self._cast[key] = tuple(
                to_device(a.astype(x.dtype), device_of(x)) for a in (self.shift, 1 / self.scale)
            )
        return self._cast[key]

    def forward(self, x: Array) -> Array:
        check_float_input(x)
        if x.ndim != 2 or x.shape[1] != len(self.shift):
            raise ValueError(
                f"x: expected shape (batch, {len(self.shift)}) for Standardize, got "
                f"{tuple(x.shape)}"
            )
        shift, inverse = self._constants(x)
        self._inverse = inverse
        return (x - shift) * inverse

    def backward(self, dy: Array) -> Array:
        return dy * self._inverse


LAYERS: dict[str, type[Layer]] = {
    cls.__name__: cls
    for cls in (Linear, ReLU, Sigmoid, Tanh, Softmax, Dropout, BatchNorm, Standardize)
}
BUILT_IN = frozenset(LAYERS)


def register_layer(cls: type[L]) -> type[L]:
    """Class decorator: ``gpunet.load`` rebuilds layers of class ``cls`` (a :class:`Layer` subclass)
    from their ``config()`` through ``cls.from_config``; their parameters are saved and loaded like
    Linear's.

        @gpunet.register_layer
        class Square(gpunet.Layer):
            def forward(self, x: Array) -> Array: ...

    Registering a class again under its name replaces the earlier one (a notebook cell run
    twice)."""
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise TypeError(f"cls: expected a subclass of gpunet.Layer, got {cls!r}")
    name = cls.__name__
    if name in BUILT_IN and LAYERS[name] is not cls:
        raise ValueError(
            f"cls: expected a class name that no built-in layer has, got {name!r}; rename the class"
        )
    LAYERS[name] = cls
    return cls


ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}
