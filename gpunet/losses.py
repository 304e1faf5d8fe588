"""Loss functions: ``forward(pred, target)`` returns the mean loss as a 0-d array on the predictions'
device (reading it as a Python float is the caller's choice: on a GPU that waits for the device);
``backward()`` returns the gradient with respect to ``pred``. ``classifies`` says whether the targets
are class labels (so that accuracy means something).

Formulas (course notes, point 7 and "Cross entropy"), with N rows and K outputs:

- SoftmaxCrossEntropy: ``L = mean_i(logsumexp(z_i) - z_i[y_i])``; ``dL/dz = (softmax(z) - onehot) / N``.
  This is the notes' output delta ``delta^L = y^D - y^L`` with the sign flipped (we subtract the update)
  and divided by N (the cost is a mean over the batch).
- MSELoss: ``L = sum((p - t)**2) / (N*K)``; ``dL/dp = 2 (p - t) / (N*K)``
- MAELoss: ``L = sum(|p - t|) / (N*K)``; ``dL/dp = sign(p - t) / (N*K)``
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backend import Array, check_labels, device_of, get_array_module, log_softmax


def _check_pair(pred: Any, target: Any) -> None:
    if not hasattr(pred, "dtype") or pred.dtype.kind != "f":
        raise TypeError(f"pred: expected a floating-point array, got {getattr(pred, 'dtype', type(pred).__name__)}")
    if not hasattr(target, "shape"):
        raise TypeError(f"target: expected an array, got {type(target).__name__}")
    if device_of(pred) != device_of(target):
        raise TypeError(f"target: expected an array on the {device_of(pred)} like the predictions, "
                        f"got one on the {device_of(target)}")
    if target.shape[:1] != pred.shape[:1]:
        raise ValueError(f"target: expected {pred.shape[0]} rows to match the predictions, got {target.shape[0]}")


class Loss:
    classifies = False

    if TYPE_CHECKING:  # what every loss defines (the checker reads it; no default at run time)
        def forward(self, pred: Array, target: Array) -> Array: ...

    def __call__(self, pred: Array, target: Array) -> Array:
        return self.forward(pred, target)

    def config(self) -> dict:
        return {"type": type(self).__name__}


class SoftmaxCrossEntropy(Loss):
    """Softmax followed by cross-entropy, fused: the stable log-sum-exp, and the simple gradient.

    ``logits`` (N, C) float; ``target`` either integer labels (N,) in ``[0, C)`` or one-hot /
    probability rows (N, C) of the logits' dtype. ``check=False`` skips the label check (the
    training loop checks the whole label set once, so that a GPU step does not wait for the host).
    """

    classifies = True

    def forward(self, logits: Array, target: Array, check: bool = True) -> Array:
        _check_pair(logits, target)
        if logits.ndim != 2:
            raise ValueError(f"logits: expected shape (batch, classes), got {tuple(logits.shape)}")
        xp = get_array_module(logits)
        n, c = logits.shape
        if target.ndim == 1:
            if check:  # a host sync: fit passes check=False (its labels checked at the front door)
                check_labels(target, c, "target")
            onehot = xp.zeros_like(logits)
            onehot[xp.arange(n), target] = 1
        elif target.shape == logits.shape:
            if target.dtype != logits.dtype:
                raise TypeError(f"target: expected dtype {logits.dtype} for one-hot rows, got {target.dtype}")
            onehot = target
        else:
            raise ValueError(f"target: expected labels of shape ({n},) or one-hot rows of shape "
                             f"{tuple(logits.shape)}, got {tuple(target.shape)}")
        log_p = log_softmax(logits)
        # rows of probabilities need not sum to 1: dL/dz = softmax * sum(t) - t, which for one-hot is the above
        self._grad = (xp.exp(log_p) * onehot.sum(axis=1, keepdims=True) - onehot) / logits.dtype.type(n)
        return -(onehot * log_p).sum() / logits.dtype.type(n)

    def backward(self) -> Array:
        if getattr(self, "_grad", None) is None:
            raise RuntimeError("backward() called before forward()")
        return self._grad


class _Regression(Loss):
    if TYPE_CHECKING:  # each subclass's gradient of its loss, from the last _diff
        def _grad(self) -> Array: ...

    def _diff(self, pred: Array, target: Array) -> Array:
        _check_pair(pred, target)
        if target.shape != pred.shape:
            if target.ndim == 1 and pred.ndim == 2 and pred.shape[1] == 1:
                target = target.reshape(-1, 1)
            else:
                raise ValueError(f"target: expected shape {tuple(pred.shape)} like the predictions, "
                                 f"got {tuple(target.shape)}")
        if target.dtype != pred.dtype:
            raise TypeError(f"target: expected dtype {pred.dtype} like the predictions, got {target.dtype}")
        self._d = pred - target
        self._nk = pred.dtype.type(max(pred.size, 1))
        return self._d

    def backward(self) -> Array:
        if getattr(self, "_d", None) is None:
            raise RuntimeError("backward() called before forward()")
        return self._grad()


class MSELoss(_Regression):
    """Mean squared error over all N*K entries (the notes' C_MSE)."""

    def forward(self, pred: Array, target: Array) -> Array:
        d = self._diff(pred, target)
        return (d * d).sum() / self._nk

    def _grad(self) -> Array:
        return 2 * self._d / self._nk


class MAELoss(_Regression):
    """Mean absolute error over all N*K entries; the gradient at exactly 0 is taken as 0."""

    def forward(self, pred: Array, target: Array) -> Array:
        d = self._diff(pred, target)
        return get_array_module(d).abs(d).sum() / self._nk

    def _grad(self) -> Array:
        return get_array_module(self._d).sign(self._d) / self._nk
