"""``net.classifies`` belongs to the network and is set once: given when the network is built (a
model file's record, the sklearn estimators' task) or by the first ``fit`` from its loss, and then
kept: a second value is refused, naming the setting, the expected and the given value, before
``fit`` does any work. predict, ONNX export and the train command read it; no module but network.py
and fit write it."""

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import optional

import gpunet as gn

GPUNET = Path(gn.__file__).parent


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64), x[:, :2].copy()


def fit(net, loss, y):
    x = data()[0]
    opt = gn.SGD(net.parameters(), lr=0.1)
    return gn.fit(net, loss, opt, x, y, epochs=1, batch_size=8, seed=0, verbose=0)


def test_the_first_fit_sets_it_and_a_fit_of_the_same_task_keeps_it():
    net = gn.mlp([3, 4, 2], seed=0, device="cpu")
    assert net.classifies is None
    fit(net, gn.SoftmaxCrossEntropy(), data()[1])
    assert net.classifies is True
    fit(net, gn.SoftmaxCrossEntropy(), data()[1])
    assert net.classifies is True


@pytest.mark.parametrize(
    "given, loss, y", [(True, gn.MSELoss, 2), (False, gn.SoftmaxCrossEntropy, 1)]
)
def test_a_fit_of_another_task_is_refused_before_any_step(given, loss, y):
    net = gn.Sequential(gn.Linear(3, 2, rng=0, device="cpu"), classifies=given)
    before = [p.data.copy() for p in net.parameters()]
    with pytest.raises(
        ValueError,
        match=rf"^classifies: expected {given} \(the network is .*\), "
        rf"got {not given}$",
    ):
        fit(net, loss(), data()[y])
    assert net.classifies is given
    assert all(np.array_equal(b, p.data) for b, p in zip(before, net.parameters()))


def test_a_value_that_is_not_a_bool_is_refused():
    with pytest.raises(TypeError, match="classifies: expected True, False or None, got 1"):
        gn.Sequential(gn.Linear(3, 2, rng=0, device="cpu"), classifies=1)


@pytest.mark.parametrize(
    "loss, y, other", [(gn.SoftmaxCrossEntropy, 1, False), (gn.MSELoss, 2, True)]
)
def test_a_model_file_keeps_it_and_the_loaded_network_holds_it(tmp_path, loss, y, other):
    net = gn.mlp([3, 4, 2], seed=0, device="cpu")
    fit(net, loss(), data()[y])
    net.save(tmp_path / "m.npz")
    back = gn.load(tmp_path / "m.npz", device="cpu")
    assert back.classifies is net.classifies
    with pytest.raises(ValueError, match=f"classifies: expected {not other}"):
        back.classifies = other
    predicted = gn.predict(back, data()[0])
    assert predicted.shape == ((32,) if net.classifies else (32, 2))


def test_no_module_but_network_and_fit_writes_it():
    writers = []
    for path in sorted(GPUNET.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr == "classifies":
                    writers.append(f"{path.relative_to(GPUNET)}:{node.lineno}")
    assert [w.split(":")[0] for w in writers] == ["network.py", "training.py"], writers


def test_the_sklearn_estimators_networks_know_their_task_from_the_start_and_after_unpickling():
    optional("sklearn", "sklearn")
    from gpunet.sklearn import MLPClassifier, MLPRegressor

    x, labels, targets = data()
    for est, y, task in ((MLPClassifier, labels, True), (MLPRegressor, targets, False)):
        model = est(hidden_layer_sizes=(4,), max_iter=2, random_state=0, device="cpu")
        with pytest.warns(Warning):  # max_iter reached
            model.fit(x, y)
        assert model.net_.classifies is task
        assert pickle.loads(pickle.dumps(model)).net_.classifies is task
