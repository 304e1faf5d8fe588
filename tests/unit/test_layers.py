"""BatchNorm (gpunet/layers.py) against its formulas written out in NumPy float64: batch statistics
in training mode, PyTorch's running averages (momentum 0.1, unbiased variance), eval mode on the
running statistics, the matrix-form backward; errors name the argument; where PyTorch is installed,
torch.nn.BatchNorm1d itself. The central-difference checks are in test_gradients.py."""

import numpy as np
import pytest
from conftest import assert_allclose, optional

import gpunet as gn


def batch(n=16, f=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(2.0, 3.0, size=(n, f)), rng.normal(size=(n, f))


def expected_forward(x, gamma, beta, eps=1e-5):
    mu, var = x.mean(0), x.var(0)  # the biased variance normalises the batch
    return gamma * (x - mu) / np.sqrt(var + eps) + beta, mu, var


def layer(device, f=5, dtype=np.float64, **kwargs):
    bn = gn.BatchNorm(f, dtype=dtype, device=device, **kwargs)
    rng = np.random.default_rng(1)
    bn.gamma.data[...] = gn.to_device(rng.uniform(0.5, 2.0, f).astype(dtype), device)
    bn.beta.data[...] = gn.to_device(rng.normal(size=f).astype(dtype), device)
    return bn


def test_batchnorm_training_forward_backward_and_running_statistics(device):
    """float64 throughout: the same formulas in another order agree to 1e-12."""
    x, dy = batch()
    bn = layer(device)
    gamma, beta = gn.to_numpy(bn.gamma.data), gn.to_numpy(bn.beta.data)
    y = bn.forward(gn.to_device(x, device))
    want, mu, var = expected_forward(x, gamma, beta)
    assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    n = len(x)
    # PyTorch's update: momentum 0.1 on the new batch, the unbiased variance (N / (N - 1))
    assert_allclose(bn.running_mean, 0.1 * mu, rtol=1e-12, atol=1e-15)
    assert_allclose(bn.running_var, 0.9 + 0.1 * var * n / (n - 1), rtol=1e-12)
    dx = bn.backward(gn.to_device(dy, device))
    sigma = np.sqrt(var + 1e-5)
    xhat = (x - mu) / sigma
    assert_allclose(bn.gamma.grad, (dy * xhat).sum(0), rtol=1e-12)
    assert_allclose(bn.beta.grad, dy.sum(0), rtol=1e-12)
    want_dx = gamma / sigma / n * (n * dy - dy.sum(0) - xhat * (dy * xhat).sum(0))
    assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-12)


def test_batchnorm_eval_mode_uses_the_running_statistics(device):
    """After three training batches the eval-mode output is the affine map of the running averages
    (followed here by hand), and the batch's own statistics play no part."""
    bn = layer(device, momentum=0.3)
    mean, var = np.zeros(5), np.ones(5)
    for seed in range(3):
        x, _ = batch(seed=seed)
        bn.forward(gn.to_device(x, device))
        mean = 0.7 * mean + 0.3 * x.mean(0)
        var = 0.7 * var + 0.3 * x.var(0, ddof=1)
    assert_allclose(bn.running_mean, mean, rtol=1e-12)
    assert_allclose(bn.running_var, var, rtol=1e-12)
    bn.eval()
    x, dy = batch(n=3, seed=9)
    gamma, beta = gn.to_numpy(bn.gamma.data), gn.to_numpy(bn.beta.data)
    y = bn.forward(gn.to_device(x, device))
    assert_allclose(y, gamma * (x - mean) / np.sqrt(var + 1e-5) + beta, rtol=1e-12, atol=1e-12)
    assert_allclose(bn.running_mean, mean, rtol=1e-12)  # eval mode leaves them alone
    assert_allclose(
        bn.backward(gn.to_device(dy, device)), dy * gamma / np.sqrt(var + 1e-5), rtol=1e-12
    )
    one = bn.forward(gn.to_device(x[:1], device))  # a single row is fine in eval mode
    assert_allclose(one, gn.to_numpy(y)[:1], rtol=1e-12)


def test_batchnorm_float32_stays_float32(device):
    x, dy = batch()
    bn = layer(device, dtype=np.float32)
    y = bn.forward(gn.to_device(x.astype(np.float32), device))
    dx = bn.backward(gn.to_device(dy.astype(np.float32), device))
    arrays = [y, dx, bn.running_mean, bn.running_var, bn.gamma.grad, bn.beta.grad]
    assert all(a.dtype == np.float32 for a in arrays)
    want, _, _ = expected_forward(
        x, gn.to_numpy(bn.gamma.data).astype(np.float64), gn.to_numpy(bn.beta.data)
    )
    assert_allclose(y, want, rtol=1e-5, atol=1e-5)  # float32 rounding of values ~ 1


def test_batchnorm_equals_torch_batchnorm1d():
    """torch.nn.BatchNorm1d as an independent oracle, float64: output, input gradient, parameter
    gradients and running statistics after two training batches; then eval mode."""
    torch = optional("torch", "bench")
    bn = layer("cpu", momentum=0.2, eps=1e-3)
    ref = torch.nn.BatchNorm1d(5, momentum=0.2, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(bn.gamma.data.copy()))
        ref.bias.copy_(torch.from_numpy(bn.beta.data.copy()))
    for seed in range(2):
        x, dy = batch(seed=seed)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        yt.backward(torch.from_numpy(dy))
        assert_allclose(bn.forward(x), yt.detach().numpy(), rtol=1e-12, atol=1e-12)
        assert_allclose(bn.backward(dy), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
        assert_allclose(bn.gamma.grad, ref.weight.grad.numpy(), rtol=1e-12)
        assert_allclose(bn.beta.grad, ref.bias.grad.numpy(), rtol=1e-12)
        ref.weight.grad = ref.bias.grad = None
    assert_allclose(bn.running_mean, ref.running_mean.numpy(), rtol=1e-12)
    assert_allclose(bn.running_var, ref.running_var.numpy(), rtol=1e-12)
    bn.eval()
    ref.eval()
    x, _ = batch(seed=5)
    assert_allclose(
        bn.forward(x), ref(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: gn.BatchNorm(0), ValueError, "features: expected a positive integer, got 0"),
        (
            lambda: gn.BatchNorm(3, momentum=1.5),
            ValueError,
            r"momentum: expected a number in \[0, 1\], got 1.5",
        ),
        (lambda: gn.BatchNorm(3, eps=0), ValueError, "eps: expected a number > 0, got 0"),
        (
            lambda: gn.BatchNorm(3).forward(np.ones((4, 2), np.float32)),
            ValueError,
            r"x: expected shape \(batch, 3\) for BatchNorm\(3\), got \(4, 2\)",
        ),
        (
            lambda: gn.BatchNorm(3).forward(np.ones((1, 3), np.float32)),
            ValueError,
            "expected a batch of at least 2 rows in training mode",
        ),
        (
            lambda: gn.Sequential(gn.Linear(4, 3), gn.BatchNorm(2)),
            ValueError,
            r"layers\[1\]: expected BatchNorm\(3\) to match the previous Linear's out_features, "
            r"got BatchNorm\(2\)",
        ),
    ],
)
def test_batchnorm_errors_name_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


# --- Standardize: the fixed scaling a --data model starts with ------------------------------------
def test_standardize_forward_backward_and_its_config(device, tmp_path):
    rng = np.random.default_rng(0)
    shift, scale = (
        rng.normal(size=4),
        np.array([2.0, 0.5, 0.0, 4.0]),
    )  # a constant feature: scale 0 -> 1
    layer = gn.Standardize(shift, scale)
    x = rng.normal(size=(5, 4))
    for dtype in (np.float32, np.float64):
        xd = gn.to_device(x.astype(dtype), device)
        y = layer.forward(xd)
        assert y.dtype == dtype  # the input's dtype: never promoted
        # float32: shift and 1/scale rounded to float32 first, a few ulps of |x| ~ 1
        tol = 1e-6 if dtype == np.float32 else 1e-15
        assert_allclose(y, (x - shift) / np.where(scale > 0, scale, 1), rtol=tol, atol=tol)
        assert_allclose(
            layer.backward(gn.to_device(np.ones((5, 4), dtype), device)),
            np.ones((5, 4)) / np.where(scale > 0, scale, 1),
            rtol=tol,
        )
    net = gn.Sequential(layer, gn.Linear(4, 2, rng=0, device=device))
    net.save(tmp_path / "m.npz")
    back = gn.load(tmp_path / "m.npz", device=device)
    assert back.layers[0].config() == layer.config()
    with pytest.raises(
        ValueError, match=r"x: expected shape \(batch, 4\) for Standardize, got \(5, 3\)"
    ):
        layer.forward(gn.to_device(x[:, :3], device))
    with pytest.raises(
        ValueError, match="shift, scale: expected two lists of one number per feature"
    ):
        gn.Standardize([1.0, 2.0], [1.0])
