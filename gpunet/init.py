"""Weight initialisers, drawn on the host with NumPy.

Every draw happens in float64 on the host from a seeded ``numpy.random.Generator`` and is then cast and
moved, so a CPU network and a GPU network (or a float32 and a float64 one) built from the same seed start
from the same weights. Weights are small, random and non-zero: all-zero weights give all-zero hidden
gradients and the network never learns (course notes, point 6).
"""
from __future__ import annotations

import numpy as np

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
