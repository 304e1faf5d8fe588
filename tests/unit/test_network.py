"""Networks: learning XOR, save/load round trips, and the errors users get for wrong inputs."""

import os

import numpy as np
import pytest
from fresh_python import run_code

import gpunet as gn


def test_xor_learns_on_each_device(device):
    """One hidden layer, full batch, momentum: 100% accuracy on XOR."""
    x = gn.to_device(np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32), device)
    y = gn.to_device(np.array([0, 1, 1, 0]), device)
    net = gn.mlp([2, 8, 2], activation="tanh", seed=0, device=device)
    opt = gn.Momentum(net.parameters(), lr=0.1, momentum=0.9)
    loss = gn.SoftmaxCrossEntropy()
    for _ in range(300):
        value = loss.forward(net.forward(x), y)
        net.backward(loss.backward())
        opt.step()
    pred = gn.to_numpy(net.forward(x).argmax(axis=1))
    assert pred.tolist() == [0, 1, 1, 0]
    assert float(value) < 0.05


def test_save_load_round_trip_is_bit_exact(tmp_path, device):
    net = gn.mlp([6, 5, 4, 3], activation=["sigmoid", "relu"], dropout=0.25, seed=3, device=device)
    # train a step so that the biases are non-zero
    opt = gn.SGD(net.parameters(), lr=0.1)
    loss = gn.SoftmaxCrossEntropy()
    x = gn.to_device(np.random.default_rng(0).random((8, 6), dtype=np.float32), device)
    loss.forward(net.forward(x), gn.to_device(np.arange(8) % 3, device))
    net.backward(loss.backward())
    opt.step()

    path = tmp_path / "model.npz"
    net.save(path)
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]  # no temp file left behind
    loaded = gn.load(path, device=device)
    assert loaded.config() == net.config()
    for (k1, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and a.dtype == b.dtype and np.array_equal(a, b)
    net.eval(), loaded.eval()
    assert np.array_equal(gn.to_numpy(net(x)), gn.to_numpy(loaded(x)))

    fresh = gn.mlp(
        [6, 5, 4, 3], activation=["sigmoid", "relu"], dropout=0.25, seed=99, device=device
    )
    fresh.load_state_dict(net.state_dict())
    for a, b in zip(net.state_dict().values(), fresh.state_dict().values()):
        assert np.array_equal(a, b)


LOAD_WITHOUT_CUPY = """
import sys
sys.modules['cupy'] = None  # any 'import cupy' now fails, as on a laptop without CuPy
import numpy as np, gpunet as gn
net = gn.load(sys.argv[1])
assert net.device == 'cpu' and gn.resolve_device('auto') == 'cpu'
print(repr(float(np.asarray(net.state_dict()['0.W']).sum())))
"""


def check_loads_without_cupy(tmp_path, device):
    net = gn.mlp([5, 4, 2], seed=1, device=device)
    path = tmp_path / "m.npz"
    net.save(path)
    out = run_code(LOAD_WITHOUT_CUPY, str(path), timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == float(net.state_dict()["0.W"].sum())


def test_saved_file_loads_without_cupy(tmp_path):
    check_loads_without_cupy(tmp_path, "cpu")


@pytest.mark.gpu
def test_gpu_saved_file_loads_without_cupy(tmp_path):
    check_loads_without_cupy(tmp_path, "gpu")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        gn.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a gpunet model file"):
        gn.load(bad)
    net = gn.mlp([3, 2], seed=0, device="cpu")
    with pytest.raises(KeyError, match="missing"):
        net.load_state_dict({})
    state = net.state_dict()
    state["0.W"] = state["0.W"][:, :1]
    with pytest.raises(ValueError, match=r"state\['0.W'\]: expected shape \(3, 2\), got \(3, 1\)"):
        net.load_state_dict(state)


def test_same_seed_same_weights_and_dtype():
    a = gn.mlp([10, 7, 3], seed=5, device="cpu").state_dict()
    b = gn.mlp([10, 7, 3], seed=5, device="cpu").state_dict()
    c = gn.mlp([10, 7, 3], seed=6, device="cpu").state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.W"], c["0.W"])
    assert all(v.dtype == np.float32 for v in a.values())
    assert np.all(a["0.W"] != 0)  # small, random, non-zero


@pytest.mark.parametrize("init", ["he", "xavier", "uniform"])
def test_initialisers_have_the_documented_scale(init):
    layer = gn.Linear(400, 300, init=init, rng=0, device="cpu")
    w = layer.W.data
    expected_std = {
        "he": np.sqrt(2 / 400),
        "xavier": np.sqrt(6 / 700) / np.sqrt(3),
        "uniform": 0.05 / np.sqrt(3),
    }[init]
    assert w.std() == pytest.approx(expected_std, rel=0.02)
    assert not np.any(layer.b.data)


def test_input_errors_name_expected_and_actual():
    net = gn.mlp([4, 3, 2], seed=0, device="cpu")
    loss = gn.SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 4\) .* got \(5, 3\)"):
        net(np.zeros((5, 3), np.float32))
    with pytest.raises(TypeError, match="x: expected floating-point data .* got uint8"):
        net(np.zeros((5, 4), np.uint8))
    with pytest.raises(TypeError, match="x: expected dtype float32 .* got float64"):
        net(np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"x: expected a 2-D array"):
        net(np.zeros(4, np.float32))
    out = net(np.zeros((5, 4), np.float32))
    with pytest.raises(
        ValueError,
        match=r"target: expected labels in \[0, 1\] for 2 classes, got values from 0 to 7",
    ):
        loss(out, np.array([0, 1, 0, 1, 7]))
    with pytest.raises(ValueError, match="target: expected 5 rows to match the predictions, got 4"):
        loss(out, np.array([0, 1, 0, 1]))
    with pytest.raises(TypeError, match="target: expected integer class labels"):
        loss(out, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match=r"target: expected shape \(5, 2\)"):
        gn.MSELoss()(out, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="in_features: expected a positive integer, got 0"):
        gn.Linear(0, 3)
    with pytest.raises(ValueError, match="init: expected one of he, xavier, uniform, got 'zeros'"):
        gn.Linear(3, 3, init="zeros")
    with pytest.raises(ValueError, match=r"p: expected a dropout probability in \[0, 1\), got 1.5"):
        gn.Dropout(1.5)
    with pytest.raises(ValueError, match="activation: expected one of"):
        gn.mlp([3, 2, 2], activation="swish")


def test_forward_does_not_modify_the_callers_input():
    net = gn.Sequential(gn.Tanh(), gn.Linear(3, 2, rng=0, device="cpu"), gn.Sigmoid())
    x = np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)
    keep = x.copy()
    net(x)
    assert np.array_equal(x, keep)


def test_train_eval_modes_switch_dropout():
    net = gn.mlp([20, 50, 2], dropout=0.5, seed=0, device="cpu")
    x = np.ones((4, 20), np.float32)
    net.eval()
    assert np.array_equal(net(x), net(x))
    net.train()
    assert not np.array_equal(net(x), net(x))


def splitmix64_lanes(key, size):
    """An independent reference for layers.dropout_bits, in Python integers: SplitMix64 (Steele, Lea
    and Flood, 2014; as in Java's SplittableRandom) from state ``key``, each 64-bit output cut into
    four 16-bit lanes, low lane first."""
    out, state, mask = [], key, (1 << 64) - 1
    while len(out) < size:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.extend((z >> (16 * lane)) & 0xFFFF for lane in range(4))
    return np.array(out[:size], dtype=np.uint16)


def check_dropout_masks(device):
    """Dropout's bits are SplitMix64's (against the reference above), its keep rate is 1 - p, and
    the masks depend only on the seed and the order of draws: the same on every device, and a state
    taken from one layer continues exactly in another (resume across devices)."""
    xp = gn.get_array_module(gn.to_device(np.zeros(1), device))
    for key, size in ((0, 1), (12345, 7), (2**63 - 1, 130)):
        np.testing.assert_array_equal(
            gn.to_numpy(gn.layers.dropout_bits(xp, key, size)), splitmix64_lanes(key, size)
        )
    drop = gn.Dropout(0.3, seed=11)
    x = gn.to_device(np.ones((200, 1000), np.float32), device)
    mask = gn.to_numpy(drop.new_mask(x))
    assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.7)}
    # 200,000 units kept with probability 0.7: the rate's standard deviation is 0.001, so 5 sigma is
    # 0.005
    assert abs((mask > 0).mean() - 0.7) < 0.005
    cpu = gn.Dropout(0.3, seed=11)
    np.testing.assert_array_equal(gn.to_numpy(cpu.new_mask(np.ones((200, 1000), np.float32))), mask)
    state = drop.random_state()
    other = gn.Dropout(0.3, seed=11)
    other.set_random_state(state)
    np.testing.assert_array_equal(
        gn.to_numpy(other.new_mask(np.ones((3, 5), np.float32))),
        gn.to_numpy(drop.new_mask(gn.to_device(np.ones((3, 5), np.float32), device))),
    )
    with pytest.raises(
        ValueError, match="dropout draws of the splitmix64-lanes16 stream, got an older gpunet's"
    ):
        other.set_random_state({"seed": 11, "numpy": None, "gpu_draws": [[[3, 5], "float32", 1]]})


def test_dropout_masks_cpu():
    check_dropout_masks("cpu")


@pytest.mark.gpu
def test_dropout_masks_gpu():
    check_dropout_masks("gpu")


def test_batchnorm_network_saves_its_running_statistics(tmp_path, device):
    """A model file keeps BatchNorm's configuration and running statistics: after training batches
    the loaded network's eval-mode output is bit for bit the original's."""
    net = gn.mlp([6, 5, 4, 3], batch_norm=True, dropout=0.1, seed=3, device=device)
    assert [type(l).__name__ for l in net.layers] == [
        "Linear",
        "BatchNorm",
        "ReLU",
        "Dropout",
        "Linear",
        "BatchNorm",
        "ReLU",
        "Dropout",
        "Linear",
    ]
    opt = gn.Adam(net.parameters(), lr=0.01)
    loss = gn.SoftmaxCrossEntropy()
    x = gn.to_device(np.random.default_rng(0).random((8, 6), dtype=np.float32), device)
    for _ in range(3):
        loss.forward(net.forward(x), gn.to_device(np.arange(8) % 3, device))
        net.backward(loss.backward())
        opt.step()
    state = net.state_dict()
    assert list(state)[-4:] == [
        "1.running_mean",
        "1.running_var",
        "5.running_mean",
        "5.running_var",
    ]
    assert not np.array_equal(state["1.running_var"], np.ones(5, np.float32))
    net.save(tmp_path / "model.npz")
    loaded = gn.load(tmp_path / "model.npz", device=device)
    assert loaded.config() == net.config()
    assert loaded.layers[1].config() == {
        "type": "BatchNorm",
        "features": 5,
        "momentum": 0.1,
        "eps": 1e-5,
    }
    for (k, a), b in zip(state.items(), loaded.state_dict().values()):
        assert np.array_equal(a, b), k
    net.eval(), loaded.eval()
    assert np.array_equal(gn.to_numpy(net(x)), gn.to_numpy(loaded(x)))
    moved = gn.load(tmp_path / "model.npz", device="cpu").to(device)
    assert gn.backend.device_of(moved.layers[1].running_mean) == gn.backend.device_of(
        moved.layers[1].gamma.data
    )


# --- layers of the user's own: registered, they save and load; unregistered, save refuses before
# writing
class Scale(gn.Layer):
    """y = x * s + t with learned s, t (features,): a layer with unnamed parameters and a
    constructor argument."""

    def __init__(self, features, start=1.0):
        self.features, self.start = features, start
        rng = np.random.default_rng(1)
        self.s = gn.Parameter(rng.normal(start, 0.1, features).astype(np.float32))
        self.t = gn.Parameter(np.zeros(features, np.float32))

    def parameters(self):
        return [self.s, self.t]

    def config(self):
        return {"type": "Scale", "features": self.features, "start": self.start}

    def forward(self, x):
        self._x = x
        return x * self.s.data + self.t.data

    def backward(self, dy):
        self.s.grad[...] = (dy * self._x).sum(axis=0)
        self.t.grad[...] = dy.sum(axis=0)
        return dy * self.s.data


class Square(gn.Layer):
    def forward(self, x):
        self._x = x
        return x * x

    def backward(self, dy):
        return 2 * self._x * dy


def test_a_registered_layer_of_ones_own_round_trips(tmp_path, device, monkeypatch):
    monkeypatch.setitem(
        gn.layers.LAYERS, "Scale", None
    )  # restored after the test, registered below
    gn.register_layer(Scale)
    net = gn.Sequential(
        gn.Linear(3, 4, rng=0, device=device),
        Scale(4, start=2.0),
        gn.ReLU(),
        gn.Linear(4, 2, rng=1, device=device),
    ).to(device)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    opt = gn.SGD(net.parameters(), lr=0.1)
    gn.fit(net, gn.SoftmaxCrossEntropy(), opt, x, np.array([0, 1, 0, 1, 1]), epochs=2, batch_size=5)
    net.save(tmp_path / "m.npz")
    back = gn.load(tmp_path / "m.npz", device=device)
    assert isinstance(back.layers[1], Scale) and back.layers[1].start == 2.0
    assert list(back.state_dict()) == [
        "0.W",
        "0.b",
        "1.0",
        "1.1",
        "3.W",
        "3.b",
    ]  # unnamed: by place
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key], value, err_msg=key)
    np.testing.assert_array_equal(
        gn.to_numpy(gn.predict_proba(back, x)), gn.to_numpy(gn.predict_proba(net, x))
    )


def test_saving_an_unregistered_layer_fails_before_writing(tmp_path):
    net = gn.Sequential(gn.Linear(3, 3, rng=0), Square(), gn.Linear(3, 2, rng=1))
    with pytest.raises(
        TypeError,
        match=r"layers\[1\]: expected a registered layer, got Square, which gpunet.load "
        r"could not rebuild; decorate its class with @gpunet.register_layer",
    ):
        net.save(tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists() and list(tmp_path.iterdir()) == []


def test_a_registered_layer_whose_config_cannot_rebuild_it_is_refused(tmp_path, monkeypatch):
    class Bare(Scale):  # forgets its constructor's arguments
        def config(self):
            return {"type": "Bare"}

    class Wrong(Scale):  # names a size that does not match its parameters
        def config(self):
            return {"type": "Wrong", "features": self.features + 1}

    for cls in (Bare, Wrong):
        monkeypatch.setitem(gn.layers.LAYERS, cls.__name__, None)
        gn.register_layer(cls)
    with pytest.raises(
        TypeError,
        match=r"layers\[0\]: expected Bare.from_config\(config\(\)\) to rebuild the layer, "
        r"got TypeError: .*missing 1 required positional argument: 'features'",
    ):
        gn.Sequential(Bare(3)).save(tmp_path / "m.npz")
    with pytest.raises(
        TypeError,
        match=r"layers\[0\]: expected Wrong.from_config\(config\(\)\) to rebuild "
        r"parameters of shapes \[\(3,\), \(3,\)\], got \[\(4,\), \(4,\)\]",
    ):
        gn.Sequential(Wrong(3)).save(tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []


def test_register_layer_refuses_what_is_no_layer_or_a_built_in_name():
    with pytest.raises(
        TypeError, match="cls: expected a subclass of gpunet.Layer, got <class 'int'>"
    ):
        gn.register_layer(int)

    class ReLU(gn.Layer):
        pass

    with pytest.raises(
        ValueError, match="cls: expected a class name that no built-in layer has, got 'ReLU'"
    ):
        gn.register_layer(ReLU)


def test_loading_an_unknown_layer_says_how_to_make_it_known(tmp_path, monkeypatch):
    monkeypatch.setitem(gn.layers.LAYERS, "Square", Square)
    gn.Sequential(gn.Linear(2, 2, rng=0), Square()).save(tmp_path / "m.npz")
    monkeypatch.delitem(gn.layers.LAYERS, "Square")
    with pytest.raises(
        ValueError,
        match=r"unknown layer type 'Square'.*import its module, decorated with "
        r"@gpunet.register_layer, before gpunet.load",
    ):
        gn.load(tmp_path / "m.npz")
