"""gpunet's CUDA sources executed on the CPU (tests/support/cuda_cpu.py): every kernel, launched
through the fake CuPy, runs its real CUDA source in three orders of threads and is held to its NumPy
mirror there; here also to the core's formula, over shapes that are not multiples of the block, with
zeros, -0, NaN and infinities, in float32 and float64; and the planted bugs below must each be
caught.

Skips without g++ or CuPy (headers and code generator; no GPU); GPUNET_REQUIRE_CXX=1 (set by
.ci/run) makes that a failure. .ci/run also runs this file under AddressSanitizer and UBSan
(GPUNET_CXX_SANITIZE=1).
"""

import os

import cuda_compile as cc
import cuda_cpu
import cuda_support
import numpy as np
import pytest
from fresh_python import run_code

from gpunet import backend, losses
from gpunet.fast import cuda

ROWS = (1, 3, 127, 128, 129, 255, 256, 257, 1000, 5000)
CLASSES = (1, 3, 10, 1000)
DTYPES = ("float32", "float64")


toolchain_or_skip = cuda_support.cxx_or_skip


@pytest.fixture
def fake(monkeypatch):
    """The fake CuPy, with the harness on (it is whenever the toolchain is here)."""
    with cuda_support.fake_cupy(monkeypatch, harness=True) as fake:
        yield fake


def test_missing_toolchain_skips_or_fails_as_configured(monkeypatch):
    def unavailable():
        raise cuda_cpu.Unavailable("no C++ compiler (g++) on PATH; apt-get install g++")

    monkeypatch.setattr(cuda_cpu, "toolchain", unavailable)
    for require, outcome in (("0", pytest.skip.Exception), ("1", pytest.fail.Exception)):
        monkeypatch.setenv("GPUNET_REQUIRE_CXX", require)
        with pytest.raises(outcome, match="apt-get install g"):
            toolchain_or_skip()


def special(shape, dtype, seed=0, marks=True):
    """Normal values with, where the shape allows, zeros, -0, NaN and infinities in the first row
    and denormals in the second (flushed to zero by float32 kernels: held to the mirror within
    tiny)."""
    a = np.random.default_rng(seed).normal(size=shape).astype(dtype)
    if not marks:
        return a
    flat = a.reshape(-1)
    marks = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 3.0], dtype)
    flat[: min(flat.size // 2, marks.size)] = marks[: min(flat.size // 2, marks.size)]
    return a


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_runs_its_cuda_source(fake, dtype):
    """Each kernel gpunet builds (tests/support/cuda_compile.py's list) runs from its CUDA source on
    the CPU when called through the fake CuPy: the harness picks up every launch, nothing is
    registered by hand."""
    cuda_cpu.stats["names"].clear()
    cc.launch_all(dtype, fake)
    z, y = fake.asarray(special((129, 10), dtype)), fake.asarray(np.arange(129) % 10)
    cuda.softmax_xent(z, y, fake.zeros_like(z), fake.zeros(129, dtype))
    cuda.softmax_xent_sums(
        z,
        y,
        fake.zeros_like(z),
        fake.zeros((), dtype),
        fake.zeros((), np.float64),
        fake.zeros((), np.int64),
    )
    ran = cuda_cpu.stats["names"]
    want = {spec[3] for spec in cuda.ELEMENTWISE.values()} | {
        cuda.SOFTMAX_XENT_NAME,
        cuda.SOFTMAX_XENT_SUMS_NAME,
        cuda.LAYER_MOMENTUM_NAME,
        cuda.LAYER_SGD_NAME,
    }
    assert ran == want | ({backend.PROBE_KERNEL[3]} & ran), want ^ ran


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,classes",
    [(r, 10) for r in ROWS] + [(r, c) for r in (1, 3, 257) for c in CLASSES] + [(1000, 1000)],
)
def test_softmax_kernels_match_the_core(fake, dtype, rows, classes):
    """Both softmax kernels (run from CUDA and held to the mirror by the harness) against the core's
    SoftmaxCrossEntropy: gradient rows, mean loss, and the right answers by argmax (the core's rule,
    NaN rows included: the first NaN is the prediction). Tolerance: 1e-5 relative in float32
    (expf/logf against
    NumPy's exp/log, 10 to 1000 terms), 1e-12 in float64; NaN where the core has NaN."""
    z = special((rows, classes), dtype, seed=rows + classes)
    y = np.random.default_rng(rows).integers(0, classes, rows)
    core = losses.SoftmaxCrossEntropy()
    mean = core.forward(z, y, check=False)
    grad = core.backward()
    dz, dy = fake.asarray(z), fake.asarray(y)
    g1, g2 = fake.zeros_like(dz), fake.zeros_like(dz)
    rows_loss = fake.zeros(rows, dtype)
    cuda.softmax_xent(dz, dy, g1, rows_loss)
    kmean, loss_sum, correct = (
        fake.zeros((), dtype),
        fake.zeros((), np.float64),
        fake.zeros((), np.int64),
    )
    cuda.softmax_xent_sums(dz, dy, g2, kmean, loss_sum, correct)
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    for g in (g1, g2):
        np.testing.assert_allclose(np.asarray(g), grad, rtol=tol, atol=tol / rows)
    np.testing.assert_allclose(float(kmean), mean, rtol=tol * 10)
    np.testing.assert_allclose(
        float(loss_sum), float(np.asarray(rows_loss, np.float64).sum()), rtol=tol
    )
    assert int(correct) == int((z.argmax(axis=1) == y).sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_right_answers_follow_argmax_with_nan(fake, dtype):
    """Issue 33's rows: a NaN is the prediction where it comes first (NumPy's argmax, the core's
    count in training.py), so none of these is right; the kernel used to skip NaN (``zi[j] > m``)
    and count 2."""
    z = np.array([[0, np.nan, 1, 2], [3, 1, np.nan, 0], [np.nan, 5, 1, 0]], dtype)
    y = np.array([3, 0, 1])
    assert int((z.argmax(axis=1) == y).sum()) == 0
    dz = fake.asarray(z)
    correct = fake.zeros((), np.int64)
    cuda.softmax_xent_sums(
        dz,
        fake.asarray(y),
        fake.zeros_like(dz),
        fake.zeros((), dtype),
        fake.zeros((), np.float64),
        correct,
    )
    assert int(correct) == 0


# ---------------------------------------------------------------- planted bugs: each must be caught
def _plant(source, old, new, count=1):
    assert source.count(old) >= count, f"the mutation's anchor {old!r} is not in the source"
    if count == 2:  # the second occurrence only
        first = source.index(old) + len(old)
        return source[:first] + source[first:].replace(old, new, 1)
    return source.replace(old, new, 1)


def _softmax(fake, rows=129, classes=10, dtype="float32", sums=False):
    z = fake.asarray(
        special((rows, classes), dtype, seed=5, marks=not sums)
    )  # a NaN would hide a bad sum
    y = fake.asarray(np.random.default_rng(1).integers(0, classes, rows))
    if sums:
        cuda.softmax_xent_sums(
            z,
            y,
            fake.zeros_like(z),
            fake.zeros((), dtype),
            fake.zeros((), np.float64),
            fake.zeros((), np.int64),
        )
    else:
        cuda.softmax_xent(z, y, fake.zeros_like(z), fake.zeros(rows, dtype))


SUMS_BUGS = {  # (anchor, replacement, which occurrence), the error they must raise
    "missing barrier": (
        ("    __syncthreads();\n    }", "    }", 1),
        cuda_cpu.Mismatch,
        "race|mirror",
    ),
    "barrier skipped by some threads": (
        ("        __syncthreads();\n", "        if (threadIdx.x < k) __syncthreads();\n", 1),
        cuda_cpu.KernelFault,
        "not reached by every thread",
    ),
    "threads at different barriers": (
        (
            "    __syncthreads();\n    for",
            "    if (threadIdx.x & 1) __syncthreads(); else __syncthreads();\n    for",
            1,
        ),
        cuda_cpu.KernelFault,
        "divergent __syncthreads",
    ),
    "reduction reads one too far": (
        ("part[threadIdx.x + k]", "part[threadIdx.x + k + (k > 1)]", 1),
        cuda_cpu.Mismatch,
        "mirror|race",
    ),
}
SOFTMAX_BUGS = {
    "wrong row stride": (
        ("const T* zi = z + (long long)i * c;", "const T* zi = z + (long long)i * (c - 1);", 1),
        cuda_cpu.Mismatch,
        "mirror",
    ),
    "off-by-one label": (
        ("(j == t ? (T)1 : (T)0)", "(j == t + 1 ? (T)1 : (T)0)", 1),
        cuda_cpu.Mismatch,
        "mirror",
    ),
    "off-by-one row bound": (
        ("if (i >= n) return;", "if (i > n) return;", 1),
        cuda_cpu.KernelFault,
        "wrote outside argument|invalid memory access",
    ),
    "out-of-bounds write": (
        ("loss[i] = ", "loss[i + 1] = ", 1),
        cuda_cpu.KernelFault,
        "wrote outside argument 3",
    ),
}
LAYER_BUGS = {  # in the layer update's bias reduction, on W (784, 510) and b (510,): 510 is not a
    # multiple of the 32 columns a block sums, so the last block has lanes past the bias
    "wrong stride in the bias sum": (
        ("dy[(long long)r * cols + j]", "dy[(long long)r * (cols - 1) + j]", 1),
        cuda_cpu.Mismatch,
        "mirror",
    ),
    "off-by-one bias bound": (
        ("if (group == 0 && j < cols)", "if (group == 0 && j <= cols)", 1),
        cuda_cpu.KernelFault,
        "wrote outside argument",
    ),
    "missing barrier in the bias reduction": (
        ("        __syncthreads();\n    }", "    }", 1),
        cuda_cpu.Mismatch,
        "race|mirror",
    ),
    "bias reduction's barrier skipped by some threads": (
        ("        __syncthreads();\n    }", "        if (group < k) __syncthreads();\n    }", 1),
        cuda_cpu.KernelFault,
        "not reached by every thread",
    ),
}
GUARDED = {
    "off-by-one row bound",
    "out-of-bounds write",
    "off-by-one bias bound",
}  # ASan's, when sanitizing


def _skip_guarded(bug):
    if bug in GUARDED and cuda_cpu.sanitizing():
        pytest.skip(
            "under AddressSanitizer the guards are off: ASan names this one (the subprocess test)"
        )


@pytest.mark.parametrize("bug", sorted(SUMS_BUGS))
def test_a_planted_bug_in_the_sums_kernel_is_caught(fake, monkeypatch, bug):
    (old, new, which), error, match = SUMS_BUGS[bug]
    monkeypatch.setattr(cuda, "SOFTMAX_XENT_SUMS", _plant(cuda.SOFTMAX_XENT_SUMS, old, new, which))
    with pytest.raises(error, match=match):
        _softmax(fake, rows=1000, sums=True)


@pytest.mark.parametrize("bug", sorted(SOFTMAX_BUGS))
def test_a_planted_bug_in_the_softmax_kernel_is_caught(fake, monkeypatch, bug):
    _skip_guarded(bug)
    (old, new, which), error, match = SOFTMAX_BUGS[bug]
    monkeypatch.setattr(cuda, "SOFTMAX_XENT", _plant(cuda.SOFTMAX_XENT, old, new, which))
    with pytest.raises(error, match=match):
        _softmax(fake)


@pytest.mark.parametrize("bug", sorted(LAYER_BUGS))
@pytest.mark.parametrize("momentum", [False, True])
def test_a_planted_bug_in_the_layer_update_is_caught(fake, monkeypatch, bug, momentum):
    import types

    _skip_guarded(bug)
    (old, new, which), error, match = LAYER_BUGS[bug]
    name = cuda.LAYER_MOMENTUM_NAME if momentum else cuda.LAYER_SGD_NAME
    monkeypatch.setitem(cuda.RAW, name, _plant(cuda.RAW[name], old, new, which))
    W, b = (
        types.SimpleNamespace(
            data=fake.asarray(special(s, "float32", 2, marks=False)),
            grad=fake.asarray(special(s, "float32", 3, marks=False)),
        )
        for s in ((784, 510), (510,))
    )
    v = (fake.zeros_like(W.data), fake.zeros_like(b.data)) if momentum else (None, None)
    with pytest.raises(error, match=match):
        cuda.layer_update(
            W,
            b,
            *v,
            fake.asarray(special((128, 510), "float32", 4, marks=False)),
            np.float32(0.05),
            np.float32(0.9 if momentum else 0),
            np.float32(1e-4),
            False,
        )


# ------------------------------------------------------------ the update kernels against the core
def _core_step(opt_cls, W, b, dy, **kw):
    """The core optimizer's step on copies of W, b (float arrays) with W.grad given and b.grad =
    dy.sum(0)."""
    import gpunet as gn
    from gpunet.layers import Parameter

    params = [Parameter(W[0].copy()), Parameter(b[0].copy())]
    params[0].grad, params[1].grad = W[1].copy(), dy.sum(axis=0, dtype=dy.dtype)
    getattr(gn, opt_cls)(params, **kw).step()
    return params[0].data, params[1].data


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 3), (129, 10), (257, 1000), (1000, 3)])
@pytest.mark.parametrize("wd", [0.0, 1e-4])
def test_layer_updates_match_the_core(fake, dtype, rows, cols, wd):
    """SGD and momentum's one-launch layer update (CUDA, held to the mirror by the harness) against
    the core's optimizers, with zeros, -0, NaN and infinite weights. With weight decay 0 the L2 term
    is skipped, as the core skips it: an infinite weight stays infinite (the kernels computed g + 0
    * w, NaN). Tolerance: 1e-5 relative in float32 (the bias sum's order), 1e-12 in float64."""
    import types

    W = special((2, 784 if cols != 1000 else 7, cols), dtype, seed=rows)
    W[0].reshape(-1)[:6] = np.array(
        [np.inf, -np.inf, 0, -0.0, 1, 2], dtype
    )  # weights, not gradients
    W[1].reshape(-1)[:6] = 1
    b, dy = (
        special((2, cols), dtype, seed=cols, marks=False),
        special((rows, cols), dtype, marks=False),
    )
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    t = np.dtype(dtype).type
    for rule, kw in (("SGD", {}), ("Momentum", {"momentum": 0.9})):
        want = _core_step(rule, W, b, dy, lr=0.05, weight_decay=wd, **kw)
        p = [
            types.SimpleNamespace(data=fake.asarray(a[0].copy()), grad=fake.asarray(a[1].copy()))
            for a in (W, b)
        ]
        velocities = (
            (fake.zeros_like(p[0].data), fake.zeros_like(p[1].data)) if kw else (None, None)
        )
        cuda.layer_update(
            *p, *velocities, fake.asarray(dy), t(0.05), t(kw.get("momentum", 0)), t(wd), False
        )
        for got, w in zip((p[0].data, p[1].data), want):
            np.testing.assert_allclose(np.asarray(got), w, rtol=tol, atol=tol, err_msg=rule)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("cols", [1, 33, 1000])
def test_the_bias_gradient_is_the_core_column_sum(fake, dtype, rows, cols):
    """The layer update's block-wide bias reduction (CUDA) against the core: b.grad is dy.sum(0)
    and b the core Momentum step's, at batches that are not multiples of the 8 row groups or the
    256-thread block, bias widths past a 32-column group (33) and with more column blocks than W
    has blocks (1000 columns, W of 7 x 1000). Both within the sums' rounding: n terms in any order
    are within (n - 1) eps sum|dy| of the exact sum; here each thread adds ceil(n / 8) then 3
    levels of the tree, so b.grad is within (ceil(n / 8) + 3) eps sum|dy| of the float64 sum; the
    core adds dy's rows one after another (within (n - 1) eps sum|dy|), so b is within lr times
    both bounds plus 2 eps |b| of the core's. W's rule is elementwise: 4 eps."""
    import types

    shape = (7, cols) if cols == 1000 else (5, cols)
    W, b = special((2, *shape), dtype, seed=rows, marks=False), special((2, cols), dtype, seed=cols)
    dy = special((rows, cols), dtype, seed=rows + cols, marks=False)
    want_w, want_b = _core_step("Momentum", W, b, dy, lr=0.05, momentum=0.9)
    p = [
        types.SimpleNamespace(data=fake.asarray(a[0].copy()), grad=fake.asarray(a[1].copy()))
        for a in (W, b)
    ]
    before = cuda_cpu.stats["launches"]
    t = np.dtype(dtype).type
    cuda.layer_update(
        *p,
        fake.zeros_like(p[0].data),
        fake.zeros_like(p[1].data),
        fake.asarray(dy),
        t(0.05),
        t(0.9),
        t(0),
        False,
    )
    assert cuda_cpu.stats["launches"] == before + 1  # the CUDA source ran, not the mirror alone
    eps = np.finfo(dtype).eps
    bound = (-(-rows // 8) + 3) * eps * np.abs(dy.astype(np.float64)).sum(axis=0)
    exact = dy.astype(np.float64).sum(axis=0)
    got_grad = np.asarray(p[1].grad)
    assert np.all(np.abs(got_grad - exact) <= bound), np.max(np.abs(got_grad - exact) - bound)
    got_b = np.asarray(p[1].data)
    core = (rows - 1) * eps * np.abs(dy.astype(np.float64)).sum(axis=0)
    with np.errstate(invalid="ignore"):  # b has NaN and infinities: the same ones as the core's
        close = np.abs(got_b - want_b) <= 0.05 * (bound + core) + 2 * eps * np.abs(want_b)
    same = (got_b == want_b) | (np.isnan(got_b) & np.isnan(want_b))
    assert np.all(np.where(np.isfinite(want_b), close, same)), (got_b, want_b)
    np.testing.assert_allclose(np.asarray(p[0].data), want_w, rtol=4 * eps, atol=4 * eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ["Adam", "AdamW"])
def test_adam_skips_a_zero_weight_decay_as_the_core_does(fake, dtype, rule):
    """Adam's kernel with weight decay 0 on infinite and NaN-free weights: the core's values (an
    infinite weight stays infinite; ``g + 0 * w`` made it NaN). Tolerance 1e-6 relative (float32
    sqrt/divide)."""
    import gpunet as gn
    from gpunet.layers import Parameter

    w = special((1000,), dtype, marks=False)
    w[:3] = [np.inf, -np.inf, -0.0]
    g = special((1000,), dtype, seed=1, marks=False)
    p = Parameter(w.copy())
    p.grad = g.copy()
    opt = getattr(gn, rule)([p], lr=1e-3, weight_decay=0.0)
    opt.step()
    dw, dm, dv = fake.asarray(w.copy()), fake.zeros(1000, dtype), fake.zeros(1000, dtype)
    k = [np.dtype(dtype).type(c) for c in opt.constants().values()]  # after the core's step 1
    cuda.rule(opt)(dw, fake.asarray(g), dm, dv, *k)
    np.testing.assert_allclose(np.asarray(dw), p.data, rtol=1e-6)


def test_a_float16_network_is_refused_in_one_line(fake):
    z = fake.asarray(np.zeros((4, 3), np.float16))
    with pytest.raises(
        TypeError,
        match="^dtype: gpunet's CUDA kernels run float32 and float64 networks, got float16$",
    ):
        cuda.softmax_xent_sums(
            z,
            fake.asarray(np.zeros(4, np.int64)),
            fake.zeros_like(z),
            fake.zeros((), z.dtype),
            fake.zeros((), np.float64),
            fake.zeros((), np.int64),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,cols",
    [
        (1, 1),
        (3, 3),
        (127, 10),
        (128, 10),
        (129, 1000),
        (255, 3),
        (256, 10),
        (257, 10),
        (1000, 10),
        (5000, 3),
    ],
)
def test_relu_kernels_match_the_core(fake, dtype, rows, cols):
    """bias_relu (b broadcast with stride 0 over the rows, or one flat loop for a single row),
    relu_backward and relu_mask_backward from CUDA against the core's ReLU forward and backward,
    with zeros, -0, NaN and infinities in activations, bias and gradients: equal, NaN where the core
    has NaN (ReLU is exact)."""
    from gpunet.layers import ReLU

    x, b = special((rows, cols), dtype, seed=rows), special((cols,), dtype, seed=cols)
    dy, mask = (
        special((rows, cols), dtype, seed=rows + 1),
        special((rows, cols), dtype, seed=7, marks=False),
    )
    relu = ReLU()
    want = relu.forward(x + b)
    y = fake.asarray(x)
    cuda.bias_relu(y, fake.asarray(b))
    np.testing.assert_array_equal(np.asarray(y), want)
    want_dx = relu.backward(dy)
    got = fake.asarray(dy)
    cuda.relu_backward(got, y)
    np.testing.assert_array_equal(np.asarray(got), want_dx)
    got = fake.asarray(dy)
    cuda.relu_mask_backward(got, y, fake.asarray(mask))
    np.testing.assert_array_equal(np.asarray(got), relu.backward(dy * mask))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 129, 257, 1000])
def test_the_gather_kernel_matches_numpy(fake, dtype, rows):
    """The pixels' gather and /255 (raw uint8 rows indexed by int64) from CUDA against NumPy's
    src[idx] / 255, rows not a multiple of the block, indices with repeats and both ends."""
    src = np.random.default_rng(rows).integers(0, 256, (1000, 784), dtype=np.uint8)
    idx = np.random.default_rng(0).integers(0, 1000, rows)
    idx[:2] = [0, 999][:rows] if rows >= 2 else [999]
    out = fake.zeros((rows, 784), dtype)
    cuda.gather_scaled(fake.asarray(src), fake.asarray(idx), out, 255)
    np.testing.assert_array_equal(np.asarray(out), np.divide(src[idx], 255, dtype=dtype))


def test_an_out_of_bounds_write_is_named_at_its_line_under_asan():
    """Under AddressSanitizer (.ci/run's GPUNET_CXX_SANITIZE=1 step) a write one element past the
    loss array ends a child process with ASan's report naming the kernel's source line. Runs only
    there: the sanitized build costs seconds, and the ordinary run catches the same bug with its
    guard bytes."""
    if not cuda_cpu.sanitizing():
        pytest.skip(
            "runs in .ci/run's AddressSanitizer step (GPUNET_CXX_SANITIZE=1, libasan preloaded)"
        )
    toolchain_or_skip()
    planted = cuda.SOFTMAX_XENT.replace("loss[i] = ", "loss[i + 1] = ")
    line = (
        cuda.softmax_xent_source("float", planted)
        .split("\n")
        .index(next(l for l in planted.split("\n") if "loss[i + 1]" in l))
        + 1
    )
    code = (
        f"import numpy as np, cuda_cpu\nfrom gpunet.fast import cuda\n"
        f"src = cuda.softmax_xent_source('float', {planted!r})\n"
        "z = np.zeros((129, 10), np.float32)\n"
        "grid, block, args = cuda.softmax_xent_launch(z, np.zeros(129, np.int64), "
        "np.zeros_like(z), "
        "np.zeros(129, np.float32))\n"
        "cuda_cpu.raw_kernel(src, cuda.SOFTMAX_XENT_NAME, grid, block, args)\n"
    )
    path = os.pathsep.join(
        [str(cuda_cpu.HERE), str(cuda_cpu.HERE.parents[1]), os.environ.get("PYTHONPATH", "")]
    )
    done = run_code(code, timeout=300, env={**os.environ, "PYTHONPATH": path})
    assert done.returncode != 0, done.stderr[-3000:]
    assert "heap-buffer-overflow" in done.stderr and "WRITE of size 4" in done.stderr, done.stderr[
        -3000:
    ]
    assert f"{cuda.SOFTMAX_XENT_NAME}.cu:{line}" in done.stderr, done.stderr[-3000:]
