"""Tables as a first-class job (issue 35), on scikit-learn's bundled data sets (no download):
feature names kept and used, the NaN front door, the feature count, through Python, the estimators
and the command line. Expectations come from the data themselves (the same rows in another column
order must give the same predictions) or from scikit-learn's own encoders and metrics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import optional

import gpunet as gn
from gpunet.training import evaluate, fit, predict

datasets = optional("sklearn.datasets", "sklearn")


def _frame():
    optional("pandas", "sklearn")
    bunch = datasets.load_breast_cancer(as_frame=True)
    x = bunch.data
    return (x - x.mean()) / x.std(), bunch.target


def _trained(x, y, epochs=15):
    net = gn.mlp([x.shape[1], 16, int(np.max(y)) + 1], seed=0)
    fit(net, gn.SoftmaxCrossEntropy(), gn.Adam(net.parameters(), lr=1e-2), x, y, epochs=epochs)
    return net


# --- feature names --------------------------------------------------------------------------------
def test_frame_columns_are_kept_and_reordered_by_name(tmp_path):
    """A model fitted on a DataFrame keeps its columns (in the model file too) and predicts a frame
    of the same columns in another order by name: the same predictions as in the training order
    (taking them by position instead fails it)."""
    x, y = _frame()
    net = _trained(x, y)
    assert net.feature_names == list(x.columns)
    net.save(tmp_path / "m.npz")
    loaded = gn.load(tmp_path / "m.npz")
    assert loaded.feature_names == list(x.columns)
    want = predict(loaded, x)
    assert (want == y.to_numpy()).mean() > 0.9  # a real model, so that reordering matters
    shuffled = x[list(np.random.default_rng(0).permutation(x.columns))]
    np.testing.assert_array_equal(predict(loaded, shuffled), want)
    assert evaluate(loaded, gn.SoftmaxCrossEntropy(), shuffled, y)["accuracy"] == pytest.approx(
        float((want == y.to_numpy()).mean())
    )


def test_other_columns_are_refused_naming_them():
    x, y = _frame()
    net = _trained(x, y, epochs=1)
    other = x.drop(columns=["mean radius"]).assign(age=1.0)
    with pytest.raises(ValueError, match=r"missing \['mean radius'\] and extra \['age'\]"):
        predict(net, other)


def test_estimator_keeps_names_and_onnx_metadata(tmp_path):
    """gpunet.sklearn's classifier passes feature_names_in_ and classes_ to its network, so the
    model file and the ONNX metadata hold them, and a reordered frame is predicted by name."""
    from gpunet.sklearn import MLPClassifier

    x, y = _frame()
    labels = np.where(y == 1, "benign", "malignant")
    est = MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0).fit(x, labels)
    assert est.loss_ == est.loss_curve_[-1]  # scikit-learn's MLP has loss_
    np.testing.assert_array_equal(est.predict(x[x.columns[::-1]]), est.predict(x))
    est.net_.save(tmp_path / "est.npz")
    net = gn.load(tmp_path / "est.npz")
    assert net.feature_names == list(x.columns) and net.classes == ["benign", "malignant"]
    optional("onnx", "onnx")
    meta = {p.key: p.value for p in net.to_onnx().metadata_props}
    assert json.loads(meta["feature_names"]) == list(x.columns)
    assert json.loads(meta["classes"]) == ["benign", "malignant"]


# --- one front door: finite numbers, the right width ----------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e300])
def test_fit_refuses_non_finite_x_naming_row_and_column(bad):
    """NaN, +-inf, and a float64 too large for float32 (inf after the cast) are refused before
    training (today's fit trained on them and returned stop_reason 'diverged')."""
    x, y = datasets.load_wine(return_X_y=True)
    x = x.copy()
    x[17, 4] = bad
    net = gn.mlp([13, 8, 3], seed=0)
    with pytest.raises(ValueError, match=r"x: expected finite numbers, got .* at row 17, column 4"):
        fit(net, gn.SoftmaxCrossEntropy(), gn.Adam(net.parameters()), x, y, epochs=1)


def test_front_door_names_a_frames_column_and_regression_targets():
    x, _ = _frame()
    x = x.copy()
    x.iloc[3, 2] = np.nan
    net = gn.mlp([30, 2], seed=0)
    with pytest.raises(ValueError, match=r"row 3, column 'mean perimeter'"):
        predict(net, x)
    xd, yd = datasets.load_diabetes(return_X_y=True)
    yd = yd.copy()
    yd[9] = np.nan
    reg = gn.mlp([10, 1], seed=0)
    with pytest.raises(ValueError, match=r"y: expected finite numbers, got nan at row 9"):
        fit(reg, gn.MSELoss(), gn.Adam(reg.parameters()), xd, yd, epochs=1)


def test_estimator_refuses_nan_through_the_same_door():
    from gpunet.sklearn import MLPRegressor

    x, y = datasets.load_diabetes(return_X_y=True)
    x = x.copy()
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MLPRegressor(max_iter=2).fit(x, y)


def test_fit_with_the_wrong_feature_count_says_so():
    """Today: NumPy's 'matmul: Input operand 1 has a mismatch in its core dimension'."""
    x, y = datasets.load_digits(return_X_y=True)
    net = gn.mlp([63, 10], seed=0)
    with pytest.raises(
        ValueError, match=r"x: expected 63 features \(the network's inputs\), got 64"
    ):
        fit(net, gn.SoftmaxCrossEntropy(), gn.Adam(net.parameters()), x, y, epochs=1)


def test_a_text_file_is_not_a_model_file(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("label,a\n1,2\n")
    with pytest.raises(ValueError, match="not a gpunet model file") as info:
        gn.load(path)
    assert "pickled" not in str(info.value)


# --- the command line for your own table ----------------------------------------------------------
def gpunet(*args, cwd):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    env.pop("GPUNET_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "gpunet", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def wine_run(tmp_path_factory):
    """wine as a CSV with word labels, trained from the command line with --data's own defaults."""
    optional("pandas", "sklearn")
    work = tmp_path_factory.mktemp("wine")
    bunch = datasets.load_wine(as_frame=True)
    frame = bunch.frame.copy()
    frame["target"] = [f"kind_{'abc'[t]}" for t in bunch.target]
    frame.to_csv(work / "wine.csv", index=False)
    frame[frame.columns[::-1]].to_csv(work / "wine_reversed.csv", index=False)
    res = gpunet(
        "train",
        "--data",
        "wine.csv",
        "--label-column",
        "target",
        "--hidden",
        "32",
        "--epochs",
        "30",
        "--no-plots",
        cwd=work,
    )
    assert res.returncode == 0, res.stderr
    return work, frame, res


def test_data_runs_get_their_own_defaults(wine_run):
    """Out folder runs/wine (not runs/mnist) and a validation share of 0.2 (178 rows < 5000 were
    refused)."""
    work, frame, res = wine_run
    metrics = json.loads((work / "runs" / "wine" / "metrics.json").read_text())
    assert metrics["config"]["val_size"] == 0.2
    assert (
        f"{len(frame) - round(0.2 * len(frame))} train / {round(0.2 * len(frame))} validation"
        in res.stdout
    )
    assert metrics["classes"] == [
        "kind_a",
        "kind_b",
        "kind_c",
    ]  # sorted, as the estimator's classes_
    # wine.csv is sorted by class: its last 0.2 would all be kind_c; the drawn rows hold every class
    assert all(c > 0 for c in metrics["per_class"]["support"])


def test_evaluate_and_predict_use_what_the_model_keeps(wine_run):
    """No --label-column given again; columns in reversed order are taken by name, the label column
    ignored; class names printed and in the JSON as 'class' (not 'digit')."""
    work, frame, _ = wine_run
    model = work / "runs" / "wine" / "model.npz"
    res = gpunet("evaluate", model, "--data", "wine_reversed.csv", "--json", cwd=work)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["classes"] == ["kind_a", "kind_b", "kind_c"] and rep["accuracy"] > 0.9
    res = gpunet("predict", model, "wine_reversed.csv", "--json", cwd=work)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    got = [r["class"] for r in rows]
    assert "digit" not in rows[0]
    assert np.mean(np.array(got) == frame["target"].to_numpy()) == pytest.approx(rep["accuracy"])
    frame.drop(columns=["alcohol"]).to_csv(work / "short.csv", index=False)
    res = gpunet("predict", model, "short.csv", cwd=work)
    assert res.returncode == 1 and "missing ['alcohol']" in res.stderr


def test_save_inputs_of_a_table_model_writes_the_rows_it_read(wine_run):
    """predict --save-inputs on a table model writes the rows the network read, in the model's
    column order (the file's columns were reversed and held the label), into DIR/inputs.csv: before,
    the flag was ignored for a table model without a word."""
    pd = optional("pandas", "sklearn")
    work, frame, _ = wine_run
    model = work / "runs" / "wine" / "model.npz"
    res = gpunet("predict", model, "wine_reversed.csv", "--save-inputs", "seen", "--json", cwd=work)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert {str(work / r["input"]) for r in rows} == {str(work / "seen" / "inputs.csv")}
    seen = pd.read_csv(work / "seen" / "inputs.csv")
    features = [c for c in frame.columns if c != "target"]
    assert list(seen.columns) == ["file", *features]
    assert list(seen["file"]) == [r["file"] for r in rows]
    np.testing.assert_allclose(seen[features].to_numpy(), frame[features].to_numpy(), rtol=1e-6)


def test_export_keeps_names_and_refuses_a_missing_folder(wine_run):
    onnx = optional("onnx", "onnx")
    work, frame, _ = wine_run
    model = work / "runs" / "wine" / "model.npz"
    res = gpunet("export", model, work / "nowhere" / "w.onnx", cwd=work)
    assert res.returncode == 2 and str(work / "nowhere") in res.stderr and ".part" not in res.stderr
    assert gpunet("export", model, "w.onnx", cwd=work).returncode == 0
    meta = {p.key: p.value for p in onnx.load(str(work / "w.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == ["kind_a", "kind_b", "kind_c"]
    assert json.loads(meta["feature_names"]) == [c for c in frame.columns if c != "target"]


def test_a_regression_csv_trains_evaluates_and_exports(tmp_path):
    """diabetes from the command line: MSE, MAE and R2 in the target's own units, checked against
    scikit-learn's metrics on the model's own predictions."""
    optional("pandas", "sklearn")
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    bunch = datasets.load_diabetes(as_frame=True)
    bunch.frame.to_csv(tmp_path / "diabetes.csv", index=False)
    res = gpunet(
        "train",
        "--data",
        "diabetes.csv",
        "--label-column",
        "target",
        "--task",
        "regressor",
        "--hidden",
        "32",
        "--epochs",
        "40",
        "--lr",
        "0.01",
        "--no-plots",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    model = tmp_path / "runs" / "diabetes" / "model.npz"
    res = gpunet("evaluate", model, "--data", "diabetes.csv", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    pred = predict(gn.load(model), bunch.data.to_numpy())[:, 0].astype(np.float64)
    y = bunch.target.to_numpy()
    # float32 network outputs of size ~150: relative 1e-5 of the sums
    assert rep["mse"] == pytest.approx(mean_squared_error(y, pred), rel=1e-5)
    assert rep["mae"] == pytest.approx(mean_absolute_error(y, pred), rel=1e-5)
    assert rep["r2"] == pytest.approx(r2_score(y, pred), rel=1e-4, abs=1e-5) and rep["r2"] > 0.3
    res = gpunet("predict", model, "diabetes.csv", "--json", cwd=tmp_path)
    assert json.loads(res.stdout)[0]["value"][0] == pytest.approx(pred[0], rel=1e-5)


def test_history_indexes_epochs_like_a_list():
    x, y = datasets.load_digits(return_X_y=True)
    net = gn.mlp([64, 10], seed=0)
    h = fit(net, gn.SoftmaxCrossEntropy(), gn.Adam(net.parameters()), x / 16, y, epochs=3)
    assert h[0]["epoch"] == 1 and h[-1]["epoch"] == 3 and h["epoch"] == [1, 2, 3]
    assert [e["epoch"] for e in h] == [1, 2, 3]


def test_blas_threads_follow_the_work_per_call():
    """A small table's fit runs OpenBLAS on one thread, MNIST-sized products keep OpenBLAS's count,
    and the count is put back after fit (a threshold of 0 fails the first assertion; no restore, the
    last)."""
    from gpunet import callbacks
    from gpunet.fast import blas

    if blas.threads() is None:
        pytest.skip(
            "NumPy's OpenBLAS is not the BLAS here (another build): no thread count to choose"
        )
    seen = []

    class Watch(callbacks.Callback):
        def on_epoch_end(self, run, record):
            seen.append(blas.threads())

    before = blas.threads()
    x, y = datasets.load_digits(return_X_y=True)
    net = gn.mlp([64, 100, 10], seed=0)
    fit(
        net,
        gn.SoftmaxCrossEntropy(),
        gn.Adam(net.parameters()),
        x / 16,
        y,
        epochs=1,
        batch_size=200,
        callbacks=[Watch()],
    )
    assert gn.training.largest_product(net, 200) == 200 * 64 * 100 < blas.SMALL_WORK
    assert seen == [1]
    big = gn.mlp([784, 512, 10], seed=0)
    assert gn.training.largest_product(big, 128) > blas.SMALL_WORK
    with blas.threads_for(gn.training.largest_product(big, 128)):
        assert blas.threads() == before
    assert blas.threads() == before
