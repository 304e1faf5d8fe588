"""The kernels of issue 33's launch budgets, run from their CUDA sources on the CPU
(tests/support/cuda_cpu.py, through the fake CuPy, which also holds each launch to its NumPy mirror)
and compared here with the core's formulas: the updates after a distributed step's all-reduce
(gpunet_layer_momentum_given, gpunet_layer_sgd_given: core Momentum and SGD), BatchNorm's
statistics, normalisation and backward (gpunet_batch_norm_stats/apply/backward: core BatchNorm,
ReLU and Dropout's mask) and the augmentation's resampling (gpunet_resample: core bilinear at
source_points). Rows 1, 3, 127-129 and 255-257 (not multiples of the 128-thread blocks), columns
across a block's edge, float32 and float64. The planted bugs at the end must each be caught by the
harness.

Skips without g++ or CuPy's headers, or fails under GPUNET_REQUIRE_CXX=1 (as
tests/unit/test_cuda_cpu.py). About 8 s here (the objects cached by cuda_cpu).
"""

import types

import cuda_cpu
import cuda_support
import launch_counts
import numpy as np
import pytest

import gpunet as gn
from gpunet.augment import bilinear, source_points
from gpunet.fast import cuda
from gpunet.layers import BatchNorm, ReLU

ROWS = (1, 3, 127, 128, 129, 255, 256, 257)
DTYPES = ("float32", "float64")


@pytest.fixture
def fake(monkeypatch):
    """The counting fake CuPy with the CUDA-on-CPU harness on (skips, or fails, without g++)."""
    cuda_support.cxx_or_skip()
    monkeypatch.delenv("GPUNET_CUDA_CPU", raising=False)
    cuda_cpu.stats["names"].clear()
    yield launch_counts.install(monkeypatch)
    cuda_support.clear_kernel_caches()


def ran_from_cuda(*names):
    """Whether the harness ran these kernels' CUDA sources (not only their mirrors)."""
    return set(names) <= cuda_cpu.stats["names"]


def special(shape, dtype, seed):
    """Normal values with zeros, -0 and, where ``shape`` allows, an infinity first."""
    a = np.random.default_rng(seed).normal(size=shape).astype(dtype)
    marks = np.array([0.0, -0.0, np.inf, 2.0], dtype)
    a.reshape(-1)[: min(a.size // 2, 4)] = marks[: min(a.size // 2, 4)]
    return a


# ----------------------------------------------------------------- the updates after the all-reduce
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("rule", ["sgd", "momentum", "nesterov"])
def test_the_given_update_kernels_step_as_the_core_optimizers(fake, dtype, rows, rule):
    """W (rows, cols) and b (cols,) with gradients already written, one launch per layer, against
    the core's SGD/Momentum step on the same arrays, with weight decay 0 (an infinite weight stays
    infinite: no 0 * inf) and 1e-3, over cols 1, 129 (b's threads i < cols past one block). The same
    operations in the same order as the core: within 2 ulps (rtol 2 eps)."""
    t = np.dtype(dtype).type
    for cols in (1, 129):
        for wd in (0.0, 1e-3):
            host = [special((rows, cols), dtype, rows + cols), special((cols,), dtype, cols)]
            grads = [special(a.shape, dtype, 7 + a.ndim) for a in host]
            velocity = [np.random.default_rng(3).normal(size=a.shape).astype(dtype) for a in host]
            core = [gn.Parameter(a.copy()) for a in host]
            for p, g in zip(core, grads):
                p.grad[...] = g
            opt = (
                gn.SGD(core, lr=0.05, weight_decay=wd)
                if rule == "sgd"
                else gn.Momentum(
                    core, lr=0.05, momentum=0.9, nesterov=rule == "nesterov", weight_decay=wd
                )
            )
            if rule != "sgd":
                for v, v0 in zip(opt.velocities, velocity):
                    v[...] = v0
            opt.step()
            W, b = (
                types.SimpleNamespace(data=fake.asarray(a), grad=fake.asarray(g))
                for a, g in zip(host, grads)
            )
            vW, vb = (None, None) if rule == "sgd" else (fake.asarray(v) for v in velocity)
            cuda.layer_update_given(
                W, b, vW, vb, t(0.05), t(0.9 if rule != "sgd" else 0.0), t(wd), rule == "nesterov"
            )
            tol = 2 * np.finfo(dtype).eps
            for got, want in zip((W.data, b.data), core):
                np.testing.assert_allclose(
                    np.asarray(got), want.data, rtol=tol, atol=tol, err_msg=f"cols {cols}, wd {wd}"
                )
            if rule != "sgd":
                for got, want in zip((vW, vb), opt.velocities):
                    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)
    name = "gpunet_layer_sgd_given" if rule == "sgd" else "gpunet_layer_momentum_given"
    assert ran_from_cuda(name)


# --------------------------------------------------------------------------------------- BatchNorm
def _core_batch_norm(z, bias, gamma, beta, mask, dy, relu):
    """The core's Linear output z + bias through BatchNorm (training mode), [ReLU], [Dropout's
    mask], and back from dy: (output, dx, dgamma, dbeta, running_mean, running_var)."""
    bn = BatchNorm(z.shape[1], momentum=0.1, dtype=z.dtype)
    bn.gamma.data[...], bn.beta.data[...] = gamma, beta
    bn.running_mean[...], bn.running_var[...] = 0.5, 2.0
    act = ReLU()
    out = bn.forward(z + bias)
    out = act.forward(out) if relu else out
    out = out * mask if mask is not None else out
    d = dy * mask if mask is not None else dy
    dx = bn.backward(act.backward(d) if relu else d)
    return out, dx, bn.gamma.grad, bn.beta.grad, bn.running_mean, bn.running_var


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [2, *ROWS[1:]])
def test_the_batch_norm_kernels_match_the_core(fake, dtype, rows):
    """The fused step's three BatchNorm launches (statistics, normalisation with the bias and ReLU,
    backward with Dropout's mask and the ReLU) against the core's layers, over features 1, 3, 129
    (one thread per feature, past one 128-thread block), a constant column (variance 0: 1/sqrt(eps))
    and with and without ReLU and mask. (One row is the core's refusal: the fused step hands it to
    bn.forward, test_gpu_launches.) Tolerance: the kernel sums its column serially, NumPy pairwise,
    over up to 257 rows, and dx subtracts nearly equal sums: float32 rtol 1e-4 / atol 1e-4, float64
    1e-10 / 1e-10."""
    t = np.dtype(dtype).type
    rng = np.random.default_rng(rows)
    tol = {"float32": 1e-4, "float64": 1e-10}[dtype]
    for features in (1, 3, 129):
        for relu, dropout in ((True, False), (False, True), (True, True)):
            z = rng.normal(1.0, 2.0, (rows, features)).astype(dtype)
            z[:, -1] = 3.0 if features > 1 else z[:, -1]  # a constant feature
            bias, gamma, beta = (rng.normal(size=features).astype(dtype) for _ in range(3))
            dy = rng.normal(size=(rows, features)).astype(dtype)
            mask = (rng.random((rows, features)) < 0.7).astype(dtype) / t(0.7) if dropout else None
            want = _core_batch_norm(z, bias, gamma, beta, mask, dy, relu)
            y, b_, g_, be_ = (fake.asarray(a) for a in (z.copy(), bias, gamma, beta))
            mu, inv_sigma, xhat = (
                fake.zeros(features, dtype),
                fake.zeros(features, dtype),
                fake.empty_like(y),
            )
            rm, rv = (
                fake.asarray(np.full(features, 0.5, dtype)),
                fake.asarray(np.full(features, 2.0, dtype)),
            )
            cuda.batch_norm_stats(y, b_, mu, inv_sigma, rm, rv, 0.1, 1e-5)
            cuda.batch_norm_apply(y, xhat, b_, mu, inv_sigma, g_, be_, relu)
            m = None if mask is None else fake.asarray(mask)
            if m is not None:
                y *= m  # the dropout kernel's product (its own tests check its draw)
            d, dgamma, dbeta = (
                fake.asarray(dy.copy()),
                fake.zeros(features, dtype),
                fake.zeros(features, dtype),
            )
            cuda.batch_norm_backward(d, y, m, xhat, g_, inv_sigma, dgamma, dbeta, relu)
            for label, got, exp in zip(
                ("output", "dx", "dgamma", "dbeta", "running_mean", "running_var"),
                (y, d, dgamma, dbeta, rm, rv),
                want,
            ):
                np.testing.assert_allclose(
                    np.asarray(got),
                    exp,
                    rtol=tol,
                    atol=tol,
                    err_msg=f"{label}: features {features}, relu {relu}, mask {dropout}",
                )
    assert ran_from_cuda(
        "gpunet_batch_norm_stats", "gpunet_batch_norm_apply", "gpunet_batch_norm_backward"
    )


# -------------------------------------------------------------------------------------- resampling
def _distortions(b, shape, dtype, seed, elastic):
    """(B, 2, 3) maps that throw points far outside the image (shifts of 1.5 image sizes, scales 0.3
    to 1.7, shears), and (B, 2, W, H) displacement fields of a few pixels (or None)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    maps = np.zeros((b, 2, 3))
    maps[:, :, :2] = np.eye(2) + rng.uniform(-0.7, 0.7, (b, 2, 2))
    maps[:, :, 2] = rng.uniform(-1.5, 1.5, (b, 2)) * (h, w)
    fields = rng.normal(0, 3.0, (b, 2, w, h)).astype(dtype) if elastic else None
    return maps.astype(dtype), fields


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_the_resampling_kernel_matches_the_core(fake, dtype, rows):
    """gpunet_resample (one thread per output pixel: rows * H * W threads, not a multiple of its
    256) against the core's bilinear(source_points(...)) on NumPy, on 5 x 7 images (and MNIST's
    28 x 28 at 1 and 129 rows), affine only and elastic, points clipped outside on every side (zero
    padding).
    Tolerance: the kernel forms each point in its own order of the same products (the core through
    a matmul), so a point moves by a few ulps of its coordinates (< 60 px) and the value by that
    times the largest pixel step (< 1): float32 atol 2e-5, float64 1e-12."""
    shapes = [(5, 7)] + ([(28, 28)] if rows in (1, 129) else [])
    for shape in shapes:
        for elastic in (False, True):
            images = np.random.default_rng(rows).random((rows, shape[0] * shape[1])).astype(dtype)
            images[:, ::5] = 0
            maps, fields = _distortions(rows, shape, dtype, rows + elastic, elastic)
            want = bilinear(images, source_points(maps, shape, fields), shape)
            got = cuda.resample(
                fake.asarray(images),
                fake.asarray(maps),
                None if fields is None else fake.asarray(fields),
                shape,
            )
            np.testing.assert_allclose(
                np.asarray(got),
                want,
                rtol=0,
                atol=2e-5 if dtype == "float32" else 1e-12,
                err_msg=f"{shape}, elastic {elastic}",
            )
    assert ran_from_cuda("gpunet_resample")


# ------------------------------------------------------------- planted bugs: each must be caught
RAW_BUGS = {  # kernel, (anchor, replacement): a CUDA source that no longer matches its mirror
    "resample reads past the row's end": (
        cuda.RESAMPLE_NAME,
        ("left = ci >= 0 && ci < w", "left = ci >= 0"),
    ),
    "resample's fields transposed": (
        cuda.RESAMPLE_NAME,
        ("(long long)j * h + i", "(long long)i * w + j"),
    ),
    "batch-norm variance over n - 1": (cuda.BATCH_NORM_STATS_NAME, ("q / (T)n", "q / (T)(n - 1)")),
    "batch-norm dx without the xhat term": (cuda.BATCH_NORM_BACKWARD_NAME, (" - xhat[k] * sg", "")),
}
ELEMENTWISE_BUGS = {  # kernel key, (anchor, replacement)
    "momentum_given's bias without weight decay": (
        "layer_momentum_given",
        # the bias's step in the generated branch for weight decay on, Nesterov off
        # (gpunet.fast.rules)
        (
            "T o0 = (b[i] - ((vb[i] * gamma) + (lr * (gb[i] + (wd * b[i])))));",
            "T o0 = (b[i] - ((vb[i] * gamma) + (lr * gb[i])));",
        ),
    ),
    "sgd_given updates only the first bias": ("layer_sgd_given", ("if (i < cols)", "if (i < 1)")),
}


def _launch_each(fake, dtype="float32"):
    """Every kernel above once, at awkward sizes (129 rows, 129 features, 5 x 7 images)."""
    t = np.dtype(dtype).type
    z = fake.asarray(np.random.default_rng(0).normal(size=(129, 129)).astype(dtype))
    col = [fake.asarray(np.random.default_rng(k).normal(size=129).astype(dtype)) for k in range(4)]
    mu, inv_sigma, xhat = fake.zeros(129, dtype), fake.zeros(129, dtype), fake.empty_like(z)
    cuda.batch_norm_stats(z, col[0], mu, inv_sigma, col[1], col[2] * col[2], 0.1, 1e-5)
    cuda.batch_norm_apply(z, xhat, col[0], mu, inv_sigma, col[1], col[3], False)
    cuda.batch_norm_backward(
        z.copy(),
        z,
        None,
        xhat,
        col[1],
        inv_sigma,
        fake.zeros(129, dtype),
        fake.zeros(129, dtype),
        False,
    )
    maps, fields = _distortions(9, (5, 7), dtype, 0, True)
    cuda.resample(
        fake.asarray(np.random.default_rng(1).random((9, 35)).astype(dtype)),
        fake.asarray(maps),
        fake.asarray(fields),
        (5, 7),
    )
    W, b = (
        types.SimpleNamespace(
            data=fake.asarray(special(s, dtype, 2)), grad=fake.asarray(special(s, dtype, 3))
        )
        for s in ((129, 129), (129,))
    )
    cuda.layer_update_given(
        W, b, fake.zeros((129, 129), dtype), fake.zeros(129, dtype), t(0.05), t(0.9), t(1e-3), False
    )
    cuda.layer_update_given(W, b, None, None, t(0.05), t(0.0), t(1e-3), False)


def test_the_unplanted_kernels_pass(fake):
    _launch_each(fake)
    assert ran_from_cuda(
        cuda.RESAMPLE_NAME,
        cuda.BATCH_NORM_STATS_NAME,
        cuda.BATCH_NORM_BACKWARD_NAME,  # (RAW's layer updates: tests/test_cuda_cpu.py)
        "gpunet_batch_norm_apply",
        "gpunet_layer_momentum_given",
        "gpunet_layer_sgd_given",
    )


@pytest.mark.parametrize("bug", sorted(RAW_BUGS))
def test_a_planted_bug_in_a_raw_kernel_is_caught(fake, monkeypatch, bug):
    name, (old, new) = RAW_BUGS[bug]
    assert old in cuda.RAW[name], f"the mutation's anchor {old!r} is not in {name}"
    monkeypatch.setitem(cuda.RAW, name, cuda.RAW[name].replace(old, new, 1))
    cuda._raw.cache_clear()
    with pytest.raises(cuda_cpu.Mismatch, match=name):
        _launch_each(fake)


@pytest.mark.parametrize("bug", sorted(ELEMENTWISE_BUGS))
def test_a_planted_bug_in_a_given_update_is_caught(fake, monkeypatch, bug):
    key, (old, new) = ELEMENTWISE_BUGS[bug]
    spec = cuda.ELEMENTWISE[key]
    assert old in spec[2], f"the mutation's anchor {old!r} is not in {key}"
    monkeypatch.setitem(
        cuda.ELEMENTWISE, key, (spec[0], spec[1], spec[2].replace(old, new, 1), spec[3])
    )
    cuda._elementwise.cache_clear()
    with pytest.raises(cuda_cpu.Mismatch, match=spec[3]):
        _launch_each(fake)
