"""gpunet.committee: one network whose logits are the mean of its members' (float64: the joined
sum runs in another order, so 1e-12; float32 1e-5 of the largest logit)."""

import numpy as np
import pytest

import gpunet as gn
from gpunet.committee import committee


def members(dtype, widths=((12, 9), (7, 9), (12, 5)), acts=("relu", "tanh")):
    return [
        gn.mlp([6, *w, 4], activation=list(acts), dropout=0.1, seed=s, dtype=dtype)
        for s, w in enumerate(widths)
    ]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_the_committee_gives_the_mean_of_its_members_logits(dtype, tol, tmp_path):
    nets = members(dtype)
    x = np.random.default_rng(0).normal(size=(25, 6)).astype(dtype)
    want = np.mean([n.train(False).forward(x) for n in nets], axis=0)
    joined = committee(nets)
    got = joined.forward(x)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
    joined.save(tmp_path / "c.npz")  # one model file, as any network
    np.testing.assert_array_equal(gn.network.load(tmp_path / "c.npz").forward(x), got)
    assert [type(layer).__name__ for layer in joined.layers] == [
        "Linear", "ReLU", "Linear", "Tanh", "Linear",
    ]  # fmt: skip
    assert joined.layers[2].W.data.shape == (31, 23)  # 12+7+12 in, 9+9+5 out, block-diagonal


def test_one_linear_members_average_their_weights():
    nets = [gn.mlp([5, 3], seed=s, dtype=np.float64) for s in range(3)]
    x = np.random.default_rng(1).normal(size=(8, 5))
    want = np.mean([n.forward(x) for n in nets], axis=0)
    np.testing.assert_allclose(committee(nets).forward(x), want, rtol=1e-12, atol=1e-12)


def test_refusals_name_the_member_and_what_differs():
    with pytest.raises(ValueError, match="at least 2 networks, got 1"):
        committee(members(np.float64)[:1])
    a, b = members(np.float64)[:2]
    with pytest.raises(ValueError, match=r"nets\[1\]: expected the chain"):
        committee([a, gn.mlp([6, 7, 9, 4], activation="sigmoid", seed=1, dtype=np.float64)])
    with pytest.raises(ValueError, match=r"nets\[1\].*in float32"):
        committee([a, members(np.float32)[1]])
    with pytest.raises(ValueError, match="got a BatchNorm"):
        committee([a, gn.mlp([6, 7, 9, 4], batch_norm=True, seed=1, dtype=np.float64)])
    regressor = members(np.float64)[1]
    regressor.classifies = False  # its task, set once (as fit sets it from a regression loss)
    a.classifies = True
    with pytest.raises(ValueError, match=r"nets\[1\].*\(classifies=True\), got .*classifies=False"):
        committee([a, regressor])
