"""gpunet.sklearn: the estimators pass scikit-learn's own estimator checks, work in a Pipeline,
GridSearchCV (two processes) and cross_val_score, stop by scikit-learn's rule, pickle to host
arrays, and on the digits data set classify as well as scikit-learn's MLPClassifier with the same
hidden sizes and epochs."""

import contextlib
import pickle
import re
import warnings

import numpy as np
import pytest
from conftest import optional
from fresh_python import run_code

sklearn = optional("sklearn", "sklearn")
from sklearn import neural_network  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from gpunet.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

try:  # one BLAS thread: the digits' small GEMMs are slower with two on a busy two-core machine
    from threadpoolctl import threadpool_limits
except ImportError:
    threadpool_limits = contextlib.nullcontext

# The checks' data sets are small (tens to hundreds of rows): 16 hidden units and 50 epochs at a
# learning rate of 0.01 learn them well enough for their accuracy and R^2 thresholds (10 epochs do
# not) in about 4 s for both.
SMALL = dict(hidden_layer_sizes=(16,), max_iter=50, learning_rate_init=0.01, device="cpu")
EXPECTED_FAILURES = {
    "check_methods_subset_invariance": (
        "float32 throughout: BLAS blocks a GEMM by its number of rows, so a row's output computed "
        "in a small "
        "batch and in the whole set can differ by a few float32 ulps (1.5e-7 relative measured at "
        "0.48), above "
        "the check's rtol=1e-7; whether a row does depends on the weights, so the check passes for "
        "some seeds "
        "(an XPASS); scikit-learn's float64 MLP stays far below it"
    ),
}


def expected_failures(estimator):
    return EXPECTED_FAILURES


def _checks():
    from sklearn.utils.estimator_checks import parametrize_with_checks

    try:
        return parametrize_with_checks(
            [MLPClassifier(**SMALL), MLPRegressor(**SMALL)],
            expected_failed_checks=expected_failures,
        )
    except TypeError:  # scikit-learn before 1.6 has no expected_failed_checks
        return pytest.mark.skip(
            reason="the estimator checks with named expected failures need scikit-learn >= 1.6"
        )


def test_at_most_three_expected_failures_each_with_its_reason():
    assert len(EXPECTED_FAILURES) <= 3 and all(
        len(reason) > 40 for reason in EXPECTED_FAILURES.values()
    )


@_checks()
def test_scikit_learn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 50 epochs are meant to be few
        check(estimator)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def test_digits_in_a_scaler_pipeline_match_or_beat_scikit_learns_mlp(digits):
    """Same hidden sizes (64), epochs (50), solver (adam), learning rate and starting-weight rule;
    the mean test accuracy over five seeds on the test split's 450 digits. Measured 2026-12-01 (a
    shared machine): gpunet 0.968, scikit-learn 0.970; single seeds spread by about 0.005, so the
    difference of two 5-seed means has a standard error of about 0.003. Allowed: 0.005 below (1.5
    standard errors, about two digits); what a real fault costs is more (He-initialised weights and
    zero biases instead of scikit-learn's start cost 0.006 to 0.009, measured)."""
    x_tr, x_te, y_tr, y_te = digits
    means = {}
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, cls in (("gpunet", MLPClassifier), ("sklearn", neural_network.MLPClassifier)):
            extra = {"device": "cpu"} if cls is MLPClassifier else {}
            scores = [
                make_pipeline(StandardScaler(), cls((64,), max_iter=50, random_state=seed, **extra))
                .fit(x_tr, y_tr)
                .score(x_te, y_te)
                for seed in range(5)
            ]
            means[name] = float(np.mean(scores))
    assert means["gpunet"] >= means["sklearn"] - 0.005, means
    assert means["gpunet"] > 0.95, means


def test_grid_search_with_two_processes_and_cross_val_score(digits):
    x_tr, _, y_tr, _ = digits
    x, y = x_tr[:600], y_tr[:600]
    pipe = make_pipeline(
        StandardScaler(),
        MLPClassifier(max_iter=30, learning_rate_init=0.01, random_state=0, device="cpu"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        grid = GridSearchCV(
            pipe, {"mlpclassifier__hidden_layer_sizes": [(2,), (32,)]}, cv=2, n_jobs=2
        ).fit(x, y)
        scores = cross_val_score(
            pipe.set_params(mlpclassifier__hidden_layer_sizes=(32,)), x, y, cv=3
        )
    # 2 hidden units cannot hold ten digit classes as 32 do (measured: about 0.5 against 0.9)
    assert grid.best_params_ == {"mlpclassifier__hidden_layer_sizes": (32,)}, grid.cv_results_[
        "mean_test_score"
    ]
    assert grid.best_score_ > 0.85 and scores.shape == (3,) and scores.min() > 0.85, (
        grid.best_score_,
        scores,
    )


def test_results_are_numpy_and_a_pickle_holds_host_arrays_only(device, tmp_path, digits):
    """Fitted on ``device``; unpickled in a process where CuPy cannot be imported (as on a machine
    without a GPU), it predicts the same probabilities."""
    x_tr, x_te, y_tr, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier((16,), max_iter=5, random_state=0, device=device).fit(x_tr / 16, y_tr)
    proba, labels = est.predict_proba(x_te / 16), est.predict(x_te / 16)
    assert (
        type(proba) is np.ndarray and proba.dtype == np.float64 and proba.shape == (len(x_te), 10)
    )
    assert type(labels) is np.ndarray and set(labels) <= set(est.classes_)
    np.testing.assert_allclose(
        np.exp(est.predict_log_proba(x_te / 16)), proba, rtol=1e-12
    )  # log, then exp
    np.testing.assert_array_equal(labels, est.classes_[proba.argmax(axis=1)])
    assert est.out_activation_ == "softmax" and est.n_layers_ == 3 and est.n_outputs_ == 10
    assert all(type(a) is np.ndarray for a in est.coefs_ + est.intercepts_)
    assert [c.shape for c in est.coefs_] == [(64, 16), (16, 10)]
    (tmp_path / "est.pkl").write_bytes(pickle.dumps(est))
    np.save(tmp_path / "x.npy", x_te / 16)
    script = (
        "import sys, pickle, numpy as np; sys.modules['cupy'] = None; "
        f"est = pickle.loads(open({str(tmp_path / 'est.pkl')!r}, 'rb').read()); "
        f"np.save({str(tmp_path / 'p.npy')!r}, "
        f"est.predict_proba(np.load({str(tmp_path / 'x.npy')!r}))); "
        "print(est.net_.device)"
    )
    res = run_code(script, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "cpu", res.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "p.npy"), proba, atol=1e-6
    )  # float32 GEMMs on two devices


def test_an_unpickled_estimator_trains_on_exactly_as_the_original(digits):
    """The pickle carries the optimizer's state (Adam's moments and step count) and the random
    state: one more partial_fit epoch gives the same weights, bit for bit (the CPU, the same
    BLAS)."""
    x_tr, _, y_tr, _ = digits
    est = MLPClassifier((16,), random_state=0, device="cpu")
    for _ in range(2):
        est.partial_fit(x_tr / 16, y_tr, classes=np.arange(10))
    copy = pickle.loads(pickle.dumps(est))
    for model in (est, copy):
        model.partial_fit(x_tr / 16, y_tr)
    for ours, theirs in zip(est.coefs_ + est.intercepts_, copy.coefs_ + copy.intercepts_):
        np.testing.assert_array_equal(ours, theirs)
    assert copy.n_iter_ == est.n_iter_ == 3 and copy.loss_curve_ == est.loss_curve_


def test_the_stopping_rule_is_scikit_learns(digits):
    """With a tolerance no epoch can beat, both stop after n_iter_no_change + 1 epochs."""
    x_tr, _, y_tr, _ = digits
    for early in (False, True):
        params = dict(
            hidden_layer_sizes=(8,),
            max_iter=50,
            tol=1e9,
            n_iter_no_change=3,
            random_state=0,
            early_stopping=early,
        )
        ours = MLPClassifier(**params, device="cpu").fit(x_tr / 16, y_tr)
        theirs = neural_network.MLPClassifier(**params).fit(x_tr / 16, y_tr)
        assert ours.n_iter_ == theirs.n_iter_ == 5 and len(ours.loss_curve_) == 5
        if early:
            assert len(ours.validation_scores_) == 5
            assert ours.best_validation_score_ == max(ours.validation_scores_)
        else:
            assert ours.best_loss_ == min(ours.loss_curve_) and ours.validation_scores_ is None


def test_partial_fit_warm_start_and_the_regressor(digits, capsys):
    x_tr, x_te, y_tr, y_te = digits
    est = MLPClassifier((16,), random_state=0, device="cpu", verbose=True)
    with pytest.raises(ValueError, match="classes: expected every class label on the first call"):
        est.partial_fit(x_tr / 16, y_tr)
    for _ in range(3):
        est.partial_fit(x_tr / 16, y_tr, classes=np.arange(10))
    assert est.n_iter_ == 3 and est.loss_curve_[2] < est.loss_curve_[0]
    assert capsys.readouterr().out.splitlines()[0].startswith("Iteration 1, loss = ")
    warm = MLPClassifier((16,), max_iter=2, random_state=0, warm_start=True, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warm.fit(x_tr / 16, y_tr)
        first = warm.coefs_[0]
        warm.fit(x_tr / 16, y_tr)
    assert (
        warm.n_iter_ == 4
        and len(warm.loss_curve_) == 4
        and not np.array_equal(first, warm.coefs_[0])
    )
    targets = np.stack([y_tr, y_tr % 2], axis=1).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reg = MLPRegressor(
            (32,), max_iter=60, learning_rate_init=0.01, random_state=0, device="cpu"
        )
        reg.fit(x_tr / 16, targets)
    assert (
        reg.predict(x_te / 16).shape == (len(x_te), 2)
        and reg.score(x_te / 16, np.stack([y_te, y_te % 2], 1)) > 0.5
    )


def test_mistakes_name_the_parameter():
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    for params, message in (
        (
            {"solver": "lbfgs"},
            "solver: expected one of adam, sgd (lbfgs is not offered), got 'lbfgs'",
        ),
        ({"activation": "softplus"}, "activation: expected one of identity, logistic, tanh, relu"),
        ({"hidden_layer_sizes": (4, 0)}, "hidden_layer_sizes: expected positive integers, got 0"),
        ({"batch_size": 0}, "batch_size: expected 'auto' or a positive integer, got 0"),
        ({"dropout": 1.0}, "dropout: expected a number in [0, 1), got 1.0"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            MLPClassifier(**params).fit(x, y)


def test_feature_names_from_a_data_frame():
    pd = optional("pandas", "test")
    frame = pd.DataFrame({"a": [0.0, 1.0, 0.0, 1.0], "b": [1.0, 0.0, 1.0, 0.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = MLPClassifier((4,), max_iter=3, random_state=0, device="cpu").fit(frame, [0, 1, 0, 1])
    assert list(est.feature_names_in_) == ["a", "b"] and est.n_features_in_ == 2


def test_the_fit_time_benchmark_runs(tmp_path, monkeypatch):
    """benchmarks/sklearn_fit.py (digits only without MNIST): one fit per side, raw seconds and
    accuracies stored, the table's ratio computed from them."""
    import json

    from conftest import ROOT

    monkeypatch.delenv("GPUNET_DATA", raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import sklearn_fit

    assert sklearn_fit.main(["--rounds", "1", "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    (work,) = result["workloads"]
    assert work["name"] == "digits" and work["epochs"] == 50
    (gp,), (sk,) = work["raw"]["gpunet"], work["raw"]["sklearn"]
    assert gp[0] > 0 and sk[0] > 0 and gp[1] > 0.9 and sk[1] > 0.9
    assert f"| {sk[0] / gp[0]:.1f}x |" in sklearn_fit.table(result)
