"""scikit-learn estimators: gpunet networks in Pipelines, GridSearchCV and cross_val_score.

``MLPClassifier`` and ``MLPRegressor`` take scikit-learn's own parameter names where they mean the
same thing as in ``sklearn.neural_network`` (``hidden_layer_sizes``, ``activation``, ``solver``,
``alpha``, ``batch_size``, ``learning_rate_init``, ``max_iter``, ``momentum``,
``nesterovs_momentum``, ``beta_1``, ``beta_2``, ``epsilon``, ``early_stopping``,
``validation_fraction``, ``n_iter_no_change``, ``tol``, ``shuffle``, ``random_state``, ``verbose``,
``warm_start``) plus gpunet's ``device`` and ``dropout``, and they stop as scikit-learn's do: after
``n_iter_no_change`` epochs in a row without an improvement of ``tol`` in the training loss (or,
with ``early_stopping``, in the score on the held-out ``validation_fraction``, whose best weights
are kept). Fitted attributes are scikit-learn's (``classes_``, ``n_features_in_``,
``feature_names_in_``, ``loss_curve_``, ``n_iter_``, ``coefs_``, ``intercepts_``, ...) plus
``net_``, the gpunet network. Every result is a NumPy array, whatever the device; a pickled
estimator holds host arrays only, so one fitted on a GPU unpickles on a machine without.

Weights and biases start as scikit-learn's do. Differences, by design: ``activation="logistic"`` is
gpunet's Sigmoid; the training runs in float32 (the
inputs are converted once); ``alpha`` is L2 weight decay ``alpha / batch_size`` added to every
gradient (scikit-learn's penalty ``alpha / 2 * ||W||^2`` on a batch, biases included here);
``loss_curve_`` holds the mean training loss of each epoch without that penalty. The ``lbfgs``
solver and the ``learning_rate`` schedules are not offered. scikit-learn is imported with this
module only (the ``sklearn`` extra).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets, type_of_target
    from sklearn.utils.validation import check_is_fitted
except ImportError:
    raise ImportError("gpunet.sklearn needs scikit-learn: pip install 'gpunet[sklearn]'") from None

from . import callbacks
from .backend import ArrayLike, DeviceError, resolve_device, to_numpy
from .layers import Dropout, Linear, ReLU, Sigmoid, Tanh
from .losses import MSELoss, SoftmaxCrossEntropy
from .network import Sequential
from .optimizers import make_optimizer
from .training import (
    by_name,
    columns_of,
    fit as gn_fit,
    predict as gn_predict,
    predict_proba as gn_predict_proba,
)

if TYPE_CHECKING:
    from typing_extensions import Self

ACTIVATIONS = {"identity": None, "logistic": Sigmoid, "tanh": Tanh, "relu": ReLU}
SOLVERS = ("adam", "sgd")


def _validate_data(estimator, *args, **kwargs):
    """scikit-learn's input validation (``validate_data`` from 1.6 on, the estimator's method
    before)."""
    try:
        from sklearn.utils.validation import validate_data
    except ImportError:
        return estimator._validate_data(*args, **kwargs)
    return validate_data(estimator, *args, **kwargs)


def _check(name, value, ok, expected):
    if isinstance(value, bool) or not ok(value):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _is_int(v):
    return isinstance(v, (int, np.integer))


def _is_number(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)


class _Stopper(callbacks.Callback):
    """scikit-learn's bookkeeping after every epoch (``loss_curve_``, ``n_iter_``, the validation
    scores) and its stopping rule, on the estimator it is given."""

    def __init__(self, estimator, validation, rows):
        self.est, self.validation, self.rows = estimator, validation, rows

    def on_epoch_end(self, run, record):
        est = self.est
        est.n_iter_ += 1
        est.t_ += self.rows
        est.loss_curve_.append(float(record["loss"]))
        est.loss_ = est.loss_curve_[-1]  # scikit-learn's: the last epoch's mean training loss
        if est.verbose:
            print(f"Iteration {est.n_iter_}, loss = {record['loss']:.8f}")
        if self.validation is not None:
            score = est._score_on(*self.validation)
            est.validation_scores_.append(score)
            if est.verbose:
                print(f"Validation score: {score:f}")
            worse = score < est.best_validation_score_ + est.tol
            if score > est.best_validation_score_:
                est.best_validation_score_, est._best_state = score, run.net.state_dict()
        else:
            worse = est.loss_curve_[-1] > est.best_loss_ - est.tol
            est.best_loss_ = min(est.best_loss_, est.loss_curve_[-1])
        est._no_improvement_count = est._no_improvement_count + 1 if worse else 0
        if est._no_improvement_count > est.n_iter_no_change:
            callbacks.stop(run, "no_improvement")


class _BaseMLP(BaseEstimator):
    """What the classifier and the regressor share: parameters, the network, the training loop."""

    def __init__(
        self,
        hidden_layer_sizes: int | Sequence[int] = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: int | str = "auto",
        learning_rate_init: float = 0.001,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: int | np.random.RandomState | None = None,
        tol: float = 1e-4,
        verbose: bool | int = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: int = 10,
        device: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        self.hidden_layer_sizes, self.activation, self.solver, self.alpha = (
            hidden_layer_sizes,
            activation,
            solver,
            alpha,
        )
        self.batch_size, self.learning_rate_init, self.max_iter = (
            batch_size,
            learning_rate_init,
            max_iter,
        )
        self.shuffle, self.random_state, self.tol, self.verbose = (
            shuffle,
            random_state,
            tol,
            verbose,
        )
        self.warm_start, self.momentum, self.nesterovs_momentum = (
            warm_start,
            momentum,
            nesterovs_momentum,
        )
        self.early_stopping, self.validation_fraction = early_stopping, validation_fraction
        self.beta_1, self.beta_2, self.epsilon, self.n_iter_no_change = (
            beta_1,
            beta_2,
            epsilon,
            n_iter_no_change,
        )
        self.device, self.dropout = device, dropout

    # --- parameters, checked when fitting (scikit-learn's rule: __init__ and set_params only store)
    # -----
    def _hidden(self) -> list:
        sizes = (
            [self.hidden_layer_sizes]
            if _is_int(self.hidden_layer_sizes)
            else list(self.hidden_layer_sizes)
        )
        for s in sizes:
            _check("hidden_layer_sizes", s, lambda v: _is_int(v) and v > 0, "positive integers")
        return [int(s) for s in sizes]

    def _check_params(self):
        _check(
            "activation",
            self.activation,
            lambda v: v in ACTIVATIONS,
            f"one of {', '.join(ACTIVATIONS)}",
        )
        _check(
            "solver",
            self.solver,
            lambda v: v in SOLVERS,
            f"one of {', '.join(SOLVERS)} (lbfgs is not offered)",
        )
        _check("alpha", self.alpha, lambda v: _is_number(v) and v >= 0, "a number >= 0")
        _check(
            "batch_size",
            self.batch_size,
            lambda v: v == "auto" or (_is_int(v) and v > 0),
            "'auto' or a positive integer",
        )
        _check(
            "learning_rate_init",
            self.learning_rate_init,
            lambda v: _is_number(v) and v > 0,
            "a number > 0",
        )
        _check("max_iter", self.max_iter, lambda v: _is_int(v) and v > 0, "a positive integer")
        _check(
            "n_iter_no_change",
            self.n_iter_no_change,
            lambda v: _is_int(v) and v > 0,
            "a positive integer",
        )
        _check("tol", self.tol, lambda v: _is_number(v) and v >= 0, "a number >= 0")
        _check(
            "momentum", self.momentum, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"
        )
        for name in ("beta_1", "beta_2"):
            _check(
                name,
                getattr(self, name),
                lambda v: _is_number(v) and 0 <= v < 1,
                "a number in [0, 1)",
            )
        _check("epsilon", self.epsilon, lambda v: _is_number(v) and v > 0, "a number > 0")
        _check(
            "validation_fraction",
            self.validation_fraction,
            lambda v: _is_number(v) and 0 < v < 1,
            "a number in (0, 1)",
        )
        _check(
            "dropout", self.dropout, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"
        )
        return self._hidden()

    def _where(self) -> str:
        return resolve_device(self.device)

    # --- the network and its optimizer ------------------------------------------------------------
    def _network(self, n_in: int, n_out: int, rng, device: str) -> Sequential:
        """Linear [activation] [Dropout] per hidden layer, then the output Linear (logits or
        values). Weights and biases start as scikit-learn's do: uniform on ``±sqrt(f / (fan_in +
        fan_out))``, f = 2 for logistic networks, else 6 (Glorot's bound)."""
        act, sizes, layers = ACTIVATIONS[self.activation], [n_in, *self._hidden()], []
        for i, (a, b) in enumerate(zip(sizes + [n_out], sizes[1:] + [n_out])):
            layers.append(self._linear(a, b, rng))
            if i == len(sizes) - 1:
                break
            layers += [act()] if act is not None else []
            if self.dropout:
                layers.append(Dropout(float(self.dropout), seed=int(rng.integers(2**31))))
        # drawn on the host, then moved: the same draws on every device
        return Sequential(*layers, classifies=self._classifies).to(device)

    def _linear(self, fan_in: int, fan_out: int, rng) -> Linear:
        bound = math.sqrt((2.0 if self.activation == "logistic" else 6.0) / (fan_in + fan_out))
        w = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        b = rng.uniform(-bound, bound, fan_out).astype(np.float32)
        layer = Linear(fan_in, fan_out, init="xavier", rng=0, device="cpu")
        layer.W.data[...], layer.b.data[...] = w, b
        return layer

    def _optimizer(self, net, batch: int):
        """scikit-learn's solver as a gpunet rule: "adam", else momentum ("sgd" with momentum 0)."""
        settings = {"lr": float(self.learning_rate_init), "weight_decay": float(self.alpha) / batch}
        if self.solver == "adam":
            settings.update(
                beta1=float(self.beta_1), beta2=float(self.beta_2), eps=float(self.epsilon)
            )
            return make_optimizer("adam", net.parameters(), **settings)
        if self.momentum == 0:
            return make_optimizer("sgd", net.parameters(), **settings)
        return make_optimizer(
            "momentum",
            net.parameters(),
            momentum=float(self.momentum),
            nesterov=bool(self.nesterovs_momentum),
            **settings,
        )

    def _batch(self, rows: int) -> int:
        return min(200, rows) if self.batch_size == "auto" else min(int(self.batch_size), rows)

    def _initialize(self, n_in, n_out, rows):
        self._rng = check_random_state(self.random_state)
        seed = int(self._rng.randint(2**31))
        self.net_ = self._network(n_in, n_out, np.random.default_rng(seed), self._where())
        self._opt = self._optimizer(self.net_, self._batch(rows))
        self.n_outputs_, self.n_layers_ = n_out, len(self._hidden()) + 2
        self.out_activation_ = "softmax" if self._classifies else "identity"
        self.n_iter_, self.t_, self.loss_curve_, self._no_improvement_count = 0, 0, [], 0
        self.best_loss_, self.validation_scores_, self.best_validation_score_ = np.inf, None, None

    # --- training ---------------------------------------------------------------------------------
    def _train(self, x, y, n_out: int, incremental: bool):
        """One scikit-learn fit (``max_iter`` epochs at most) or one ``partial_fit`` epoch on
        encoded targets ``y`` (class indices or float values)."""
        self._check_params()
        if not hasattr(self, "net_") or (not self.warm_start and not incremental):
            self._initialize(x.shape[1], n_out, len(x))
        validation = None
        if self.early_stopping and not incremental:
            stratify = y if self._classifies and len(np.unique(y)) > 1 else None
            x, x_val, y, y_val = train_test_split(
                x, y, random_state=self._rng, stratify=stratify, test_size=self.validation_fraction
            )
            validation, self._best_state = (x_val, y_val), None
            self.validation_scores_ = self.validation_scores_ or []
            if self.best_validation_score_ is None:
                self.best_validation_score_ = -np.inf
        loss = SoftmaxCrossEntropy() if self._classifies else MSELoss()
        self._opt.weight_decay = float(self.alpha) / self._batch(len(x))
        epochs = 1 if incremental else int(self.max_iter)
        self._name_network()
        history = gn_fit(
            self.net_,
            loss,
            self._opt,
            x,
            y,
            epochs=epochs,
            batch_size=self._batch(len(x)),
            shuffle=bool(self.shuffle),
            seed=int(self._rng.randint(2**31)),
            callbacks=[_Stopper(self, validation, len(x))],
        )
        if validation is not None and self._best_state is not None:
            self.net_.load_state_dict(self._best_state)
        if not incremental and history.stop_reason == "max_epochs":
            warnings.warn(
                f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                f"optimization hasn't converged yet.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _name_network(self):
        """What a model file and ONNX export of ``net_`` keep: ``feature_names_in_`` and
        ``classes_``."""
        self.net_.feature_names = [str(n) for n in getattr(self, "feature_names_in_", [])] or None
        if self._classifies:
            self.net_.classes = [
                int(c) if np.asarray(c).dtype.kind in "biu" else str(c) for c in self.classes_
            ]

    def _outputs(self, X):
        """The network's outputs (N, n_outputs_) for ``X`` as host float64 (softmax for a
        classifier)."""
        check_is_fitted(self)
        names = getattr(self, "feature_names_in_", None)
        if names is not None and sorted(columns_of(X) or []) == sorted(map(str, names)):
            X = by_name(
                X, [str(n) for n in names]
            )  # the same columns in another order: taken by name
        x = _validate_data(self, X, reset=False, dtype=np.float32)
        predict = gn_predict_proba if self._classifies else gn_predict
        return to_numpy(predict(self.net_, x)).astype(np.float64)

    def _score_on(self, x, y) -> float:
        """The score (accuracy or R^2) on already encoded validation data."""
        out = to_numpy((gn_predict_proba if self._classifies else gn_predict)(self.net_, x))
        if self._classifies:
            return float((out.argmax(axis=1) == y).mean())
        from sklearn.metrics import r2_score

        return float(r2_score(y, out))

    # --- fitted attributes, as scikit-learn's -----------------------------------------------------
    @property
    def coefs_(self) -> list:
        """Each Linear layer's weights (n_in, n_out), host copies."""
        check_is_fitted(self)
        return [
            to_numpy(layer.W.data).copy() for layer in self.net_.layers if isinstance(layer, Linear)
        ]

    @property
    def intercepts_(self) -> list:
        """Each Linear layer's bias (n_out,), host copies."""
        check_is_fitted(self)
        return [
            to_numpy(layer.b.data).copy() for layer in self.net_.layers if isinstance(layer, Linear)
        ]

    # --- pickling: host arrays only ---------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if "net_" in state:
            opt = self._opt.state_dict()
            state["net_"] = {"weights": self.net_.state_dict(), "optimizer": opt}
            state.pop("_opt")
        if state.get("_best_state") is not None:
            state["_best_state"] = {k: to_numpy(v) for k, v in state["_best_state"].items()}
        return state

    def __setstate__(self, state: dict) -> None:
        saved = state.get("net_")
        self.__dict__.update(state)
        if isinstance(saved, dict):
            try:
                device = self._where()
            except DeviceError:  # fitted on a GPU, unpickled where there is none
                device = "cpu"
            weights = saved["weights"]
            n_in, n_out = weights["0.W"].shape[0], self.n_outputs_
            self.net_ = self._network(n_in, n_out, np.random.default_rng(0), device)
            self.net_.load_state_dict(weights)
            self._name_network()
            self.net_.eval()
            self._opt = self._optimizer(self.net_, 1)
            self._opt.load_state_dict(saved["optimizer"])


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """A multilayer perceptron classifier trained by gpunet, with scikit-learn's interface and
    parameter names (see the module's docstring). ``predict_proba`` gives (n_samples, n_classes)
    float64."""

    _classifies = True
    classes_: np.ndarray  # the labels, sorted (set by fit and the first partial_fit)

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        """Train on ``X`` (n_samples, n_features) and labels ``y`` (n_samples,) of any type; returns
        self."""
        reset = not (self.warm_start and hasattr(self, "net_"))
        X, y = _validate_data(self, X, y, reset=reset, dtype=np.float32)
        check_classification_targets(y)
        kind = type_of_target(y)
        if kind not in ("binary", "multiclass"):
            raise ValueError(f"y: expected binary or multiclass labels, got {kind} targets")
        classes = np.unique(y)
        if not reset and not np.array_equal(classes, self.classes_):
            raise ValueError(
                f"y: expected the classes of the first fit with warm_start=True, {self.classes_}, "
                f"got {classes}"
            )
        self.classes_ = classes
        return self._train(X, np.searchsorted(classes, y), len(classes), incremental=False)

    def partial_fit(self, X: ArrayLike, y: ArrayLike, classes: ArrayLike | None = None) -> Self:
        """One epoch over ``X``, ``y``; ``classes`` (every label there will be) is required on the
        first call."""
        first = not hasattr(self, "net_")
        if first and classes is None:
            raise ValueError(
                "classes: expected every class label on the first call to partial_fit, got None"
            )
        X, y = _validate_data(self, X, y, reset=first, dtype=np.float32)
        check_classification_targets(y)
        if first:
            self.classes_ = np.unique(classes)
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise ValueError(
                f"y: expected labels among classes_ {self.classes_}, got also {unknown}"
            )
        return self._train(
            X, np.searchsorted(self.classes_, y), len(self.classes_), incremental=True
        )

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        """Class probabilities (n_samples, n_classes), float64, in the order of ``classes_``."""
        return self._outputs(X)

    def predict_log_proba(self, X: ArrayLike) -> np.ndarray:
        """The logarithm of :meth:`predict_proba` (n_samples, n_classes), float64."""
        with np.errstate(
            divide="ignore"
        ):  # a probability that underflowed to 0 is log 0 = -inf, as scikit-learn's
            return np.log(self._outputs(X))

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The most probable class of each row (n_samples,), labels as in ``classes_``."""
        index = self._outputs(X).argmax(axis=1)  # checks first that the estimator is fitted
        return self.classes_[index]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = False
        return tags


class MLPRegressor(RegressorMixin, _BaseMLP):
    """A multilayer perceptron regressor trained by gpunet (squared error), with scikit-learn's
    interface and parameter names (see the module's docstring); one output or several (y (n_samples,
    n_outputs))."""

    _classifies = False

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        """Train on ``X`` (n_samples, n_features) and targets ``y`` (n_samples,) or (n_samples,
        n_outputs)."""
        reset = not (self.warm_start and hasattr(self, "net_"))
        X, y = _validate_data(
            self, X, y, reset=reset, dtype=np.float32, multi_output=True, y_numeric=True
        )
        return self._fit_targets(X, y, incremental=False)

    def partial_fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        """One epoch over ``X``, ``y`` (the first call builds the network)."""
        X, y = _validate_data(
            self,
            X,
            y,
            reset=not hasattr(self, "net_"),
            dtype=np.float32,
            multi_output=True,
            y_numeric=True,
        )
        return self._fit_targets(X, y, incremental=True)

    def _fit_targets(self, X, y, incremental):
        y2 = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
        if (
            hasattr(self, "net_")
            and (incremental or self.warm_start)
            and y2.shape[1] != self.n_outputs_
        ):
            raise ValueError(
                f"y: expected {self.n_outputs_} outputs, as in the first fit, got {y2.shape[1]}"
            )
        self._y_columns = np.ndim(y) == 2
        return self._train(X, y2, y2.shape[1], incremental)

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predicted values (n_samples,), or (n_samples, n_outputs) when fitted on 2-D targets;
        float64."""
        out = self._outputs(X)
        return out if self._y_columns else out[:, 0]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def _more_tags(self) -> dict:  # scikit-learn before 1.6
        return {"multioutput": True}
