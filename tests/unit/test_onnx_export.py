"""ONNX export (gpunet/onnx_export.py, `gpunet export`): the exported graph, run by ONNX Runtime (an
independent implementation of every operator), gives gpunet's own predictions on the real MNIST test
set.

Tolerance 1e-5 on probabilities (absolute; they lie in [0, 1]): both sides compute in float32, with
different summation orders in the GEMMs and the softmax; the differences measured here are about
1e-7 (a few float32 ulps of 1), so 1e-5 leaves a margin of a hundred and still catches any wrong
operator, weight layout or missing bias (those move probabilities by 1e-2 or more).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_allclose, optional
from fresh_python import run_code

import gpunet as gn
from gpunet import layers
from gpunet.training import fit, predict, predict_proba

onnx = optional("onnx", "onnx")
ort = optional("onnxruntime", "test")


def session(model):
    """An ONNX Runtime session for a file path or an in-memory ``onnx.ModelProto``."""
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def every_layer_network(device, x_train):
    """One network holding every layer type gpunet has (the scaling first, as gpunet train --data
    saves it)."""
    rng = np.random.default_rng(0)
    return gn.Sequential(
        layers.Standardize(x_train.mean(axis=0), x_train.std(axis=0)),
        gn.Linear(784, 64, rng=rng, device=device),
        gn.BatchNorm(64, device=device),
        gn.ReLU(),
        gn.Dropout(0.2, seed=1),
        gn.Linear(64, 32, init="xavier", rng=rng, device=device),
        gn.Sigmoid(),
        gn.Linear(32, 32, init="xavier", rng=rng, device=device),
        gn.Tanh(),
        gn.Linear(32, 10, init="xavier", rng=rng, device=device),
        gn.Softmax(),
    )


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    from gpunet.data import load_mnist

    return load_mnist(mnist_dir, download=False)


def test_every_layer_type_on_the_mnist_test_set(mnist, device, tmp_path):
    """Trained a little (so that BatchNorm's running statistics and every weight are no longer their
    start values), exported, and run by ONNX Runtime on the 10,000 test digits; a GPU-trained one
    the same."""
    (x_train, y_train), (x_test, y_test) = mnist
    net = every_layer_network(device, x_train[:6000])
    kinds = {type(layer).__name__ for layer in net.layers}
    assert kinds == set(layers.BUILT_IN)
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    fit(
        net,
        gn.SoftmaxCrossEntropy(),
        opt,
        x_train[:6000],
        y_train[:6000],
        epochs=1,
        batch_size=128,
        seed=0,
    )
    net.to_onnx(tmp_path / "every.onnx")
    probabilities, label = session(tmp_path / "every.onnx").run(None, {"input": x_test})
    assert probabilities.dtype == np.float32 and probabilities.shape == (10000, 10)
    assert label.dtype == np.int64 and label.shape == (10000,)
    assert_allclose(
        probabilities, predict_proba(net, x_test), atol=1e-5
    )  # see the module's docstring
    np.testing.assert_array_equal(label, gn.to_numpy(predict(net, x_test)))


@pytest.mark.slow
def test_default_model_through_the_command_line(mnist, tmp_path):
    """The default recipe's network and optimizer (784-512-512-10, dropout 0.2, momentum; trained on
    6,000 digits here, a tenth of an epoch, to stay cheap), saved, `gpunet export`ed, then run by
    ONNX Runtime on the test set: the labels `gpunet predict` prints, the probabilities of
    ``predict_proba``."""
    from gpunet.commands.train import TrainConfig, build

    (x_train, y_train), (x_test, _) = mnist
    net, opt, _ = build(TrainConfig(), 784, 10, "cpu")
    assert [type(layer).__name__ for layer in net.layers] == ["Linear", "ReLU", "Dropout"] * 2 + [
        "Linear"
    ]
    fit(net, gn.SoftmaxCrossEntropy(), opt, x_train[:6000], y_train[:6000], epochs=1, seed=0)
    net.save(tmp_path / "model.npz")
    cmd = [sys.executable, "-m", "gpunet"]
    res = subprocess.run(
        cmd + ["export", str(tmp_path / "model.npz"), str(tmp_path / "model.onnx")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0 and res.stdout.startswith("wrote "), res.stderr
    np.save(tmp_path / "test.npy", x_test)
    res = subprocess.run(
        cmd
        + [
            "predict",
            str(tmp_path / "model.npz"),
            str(tmp_path / "test.npy"),
            "--json",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    printed = np.array([row["digit"] for row in json.loads(res.stdout)])
    probabilities, label = session(tmp_path / "model.onnx").run(None, {"input": x_test})
    np.testing.assert_array_equal(label, printed)
    assert_allclose(
        probabilities, predict_proba(net, x_test), atol=1e-5
    )  # see the module's docstring
    meta = session(tmp_path / "model.onnx").get_modelmeta().custom_metadata_map
    assert meta["task"] == "classifier" and meta["inputs"].startswith("pixel / 255")


def test_the_graph_is_opset_17_ir_8_with_a_dynamic_batch_and_passes_the_full_check():
    net = gn.mlp([5, 4, 3], seed=0, device="cpu")
    model = net.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,) = model.graph.input
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 5
    assert [o.name for o in model.graph.output] == ["probabilities", "label"]
    sess = session(model)
    for rows in (1, 7):  # any batch size
        x = np.random.default_rng(rows).normal(size=(rows, 5)).astype(np.float32)
        p, label = sess.run(None, {"input": x})
        assert p.shape == (rows, 3) and label.shape == (rows,)
        assert_allclose(
            p, predict_proba(net, x), atol=1e-6
        )  # float32 on both sides, a 4-input network


def test_a_regressor_exports_its_output(device):
    """A network trained with a regression loss exports as a regressor by default (what gpunet
    predicts)."""
    net = gn.mlp([3, 8, 2], activation="tanh", seed=0, device=device)
    x = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
    fit(
        net,
        gn.MSELoss(),
        gn.SGD(net.parameters(), lr=0.1),
        x,
        np.ones((9, 2), np.float32),
        epochs=1,
    )
    model = net.to_onnx(inputs="three numbers")
    assert [o.name for o in model.graph.output] == ["output"]
    (out,) = session(model).run(None, {"input": x})
    assert_allclose(out, predict(net, x), atol=1e-6)  # float32 on both sides, three inputs
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["task"] == "regressor" and meta["inputs"] == "three numbers"
    assert [o.name for o in net.to_onnx(task="classifier").graph.output] == [
        "probabilities",
        "label",
    ]


def test_exporting_leaves_the_network_as_it_was(tmp_path):
    net = gn.mlp([4, 3, 2], dropout=0.5, seed=0, device="cpu")
    before = net.state_dict()
    net.to_onnx(tmp_path / "m.onnx", classes=["a", "b"], metadata={"source": "test"})
    assert net.training and all(np.array_equal(v, before[k]) for k, v in net.state_dict().items())
    meta = session(tmp_path / "m.onnx").get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == ["a", "b"] and meta["source"] == "test"
    assert json.loads(meta["network"]) == net.config()


def test_mistakes_name_the_argument(monkeypatch):
    net = gn.mlp([4, 3, 2], seed=0, device="cpu")
    with pytest.raises(
        ValueError, match="task: expected one of classifier, regressor, got 'ranker'"
    ):
        net.to_onnx(task="ranker")

    class Square(gn.Layer):
        def forward(self, x):
            return x * x

    with pytest.raises(
        ValueError, match=r"layers\[1\]: expected a layer ONNX export knows .* got Square"
    ):
        gn.Sequential(gn.Linear(4, 3), Square()).to_onnx()
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the extra were not installed
    with pytest.raises(
        ModuleNotFoundError,
        match=r"^ONNX export needs the onnx package: pip install 'gpunet\[onnx\]'$",
    ) as err:
        net.to_onnx()
    assert (
        err.value.name == "onnx"
    )  # so README's block test skips it as an optional library, not fails


def test_the_command_line_says_one_line(tmp_path):
    net = gn.mlp([4, 3, 2], seed=0, device="cpu")
    net.save(tmp_path / "m.npz")
    run = [sys.executable, "-m", "gpunet", "export"]
    res = subprocess.run(
        run
        + [
            str(tmp_path / "m.npz"),
            str(tmp_path / "m.onnx"),
            "--task",
            "regressor",
            "--inputs",
            "four numbers",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "'output' [batch, 2]" in res.stdout
    (out,) = session(tmp_path / "m.onnx").run(None, {"input": np.ones((2, 4), np.float32)})
    assert_allclose(out, net.forward(np.ones((2, 4), np.float32)), atol=1e-6)
    scaled = gn.Sequential(
        layers.Standardize([1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 0.0, 4.0]), gn.Linear(4, 3, rng=0)
    )
    scaled.save(tmp_path / "scaled.npz")
    res = subprocess.run(
        run + [str(tmp_path / "scaled.npz"), str(tmp_path / "scaled.onnx"), "--task", "regressor"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    sess = session(tmp_path / "scaled.onnx")
    assert sess.get_modelmeta().custom_metadata_map["inputs"].startswith("the features as they are")
    raw = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32) * 10
    assert_allclose(
        sess.run(None, {"input": raw})[0], scaled.forward(raw), atol=1e-5
    )  # values ~10, float32
    res = subprocess.run(
        run + [str(tmp_path / "missing.npz"), str(tmp_path / "x.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        res.returncode == 2 and res.stderr.count("\n") == 1 and "model file not found" in res.stderr
    )
    script = (
        "import sys; sys.modules['onnx'] = None; from gpunet.cli import main; "
        f"sys.exit(main(['export', {str(tmp_path / 'm.npz')!r}, {str(tmp_path / 'y.onnx')!r}]))"
    )
    res = run_code(script, timeout=120)
    assert res.returncode == 2 and res.stderr == (
        "gpunet export: error: ONNX export needs the onnx package: pip install 'gpunet[onnx]'\n"
    )
