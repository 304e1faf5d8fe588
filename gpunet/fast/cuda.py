"""CUDA kernels of the fast path: each fuses the elementwise work of one step of the notes into a
single launch. Built once per process on first use (CuPy caches the compiled code on disk).

Why: on a GPU every elementwise operation is a kernel launch that reads and writes the whole array;
for MNIST-sized layers the launches, not the arithmetic, dominate. The formulas are the core's
(:mod:`gpunet.layers`, :mod:`gpunet.losses`, :mod:`gpunet.optimizers`); tests check each kernel
against them. The sources are plain module constants so that CI can compile every one with NVRTC on
a machine without a GPU.
"""

from __future__ import annotations

import functools

import numpy as np

from . import rules

# (in_params, out_params, operation, name) of each cupy.ElementwiseKernel
# NaN passes through both, as through the core's maximum(x, 0) and dy * (x > 0): a diverging run
# must reach the loss as NaN on every path, or the divergence guard misses it.
BIAS_RELU = ("T b", "T y", "T t = y + b; y = t < (T)0 ? (T)0 : t;", "gpunet_bias_relu")
RELU_BACKWARD = ("T y", "T dy", "dy = y > (T)0 ? dy : dy * (T)0;", "gpunet_relu_backward")
# Dropout's draw, scale and mask in one launch: the bits of gpunet.layers.dropout_bits (SplitMix64
# word j / 4 of the stream keyed ``key``, 16-bit lane j % 4; j = start + i, the flat C-order index
# in the global batch: a data-parallel rank's shard starts at unit ``start``), the scaled keep-mask
# kept for backward, and y *= mask.
DROPOUT = (
    "uint64 key, uint64 start, uint32 threshold, T scale",
    "T y, T mask",
    "unsigned long long j = start + (unsigned long long)i;"
    " unsigned long long x = key + (j / 4 + 1ull) * 0x9E3779B97F4A7C15ull;"
    " x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull; x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;"
    " x ^= x >> 31; unsigned int bits = (unsigned int)(x >> (16 * (j % 4))) & 0xFFFFu;"
    " mask = bits < threshold ? scale : (T)0; y = y * mask;",
    "gpunet_dropout",
)
# The ReLU backward of a block whose output went through dropout: dy * mask (Dropout's backward),
# then
# * (x > 0) (ReLU's), in one pass; y is the block's output after dropout, > 0 exactly where both let
#   through.
RELU_MASK_BACKWARD = (
    "T y, T mask",
    "T dy",
    "T t = dy * mask; dy = y > (T)0 ? t : t * (T)0;",
    "gpunet_relu_mask_backward",
)
# One layer's whole update in one launch, over W's elements: the rule on W from W.grad, and in the
# threads i < cols also b's gradient dy.sum(0) (the column sums of dy, written to b.grad) and the
# rule on b;
_BIAS_SUM = "T s = 0; for (int r = 0; r < rows; ++r) s += dy[r * cols + i]; gb[i] = s; "
# the rule itself is generated from the optimizer's (gpunet.fast.rules.dispatch), its flags chosen
# by the kernel's parameters: the L2 term only where weight decay is on, as the core adds it (0 * w
# is NaN for an infinite weight, where the core's rule, skipping it, keeps the weight infinite)
_RUN_TIME = {"wd": "wd != (T)0", "nesterov": "nesterov"}


def _layer_rule(kind: str, given: bool) -> str:
    """The operation of a layer kernel: the rule on W's element i, then in the threads i < cols b's
    gradient (the column sum of dy, unless ``given``) and the rule on b[i]."""
    on_w = rules.dispatch(kind, _RUN_TIME, lambda r: {"velocities": "v"}.get(r, r))
    names = {"w": "b[i]", "g": "gb[i]" if given else "s", "velocities": "vb[i]"}
    on_b = rules.dispatch(kind, _RUN_TIME, lambda r: names.get(r, r))
    return f"{on_w} if (i < cols) {{ {'' if given else _BIAS_SUM}{on_b} }}"


LAYER_MOMENTUM = (
    "raw T dy, int32 rows, int32 cols, T lr, T gamma, T wd, bool nesterov",
    "T w, T g, T v, raw T b, raw T vb, raw T gb",
    _layer_rule("momentum", False),
    "gpunet_layer_momentum",
)
LAYER_SGD = (
    "raw T dy, int32 rows, int32 cols, T lr, T wd",
    "T w, T g, raw T b, raw T gb",
    _layer_rule("sgd", False),
    "gpunet_layer_sgd",
)
# (LAYER_MOMENTUM and LAYER_SGD are no longer launched eagerly: layer_update's RawKernel below sums
# the bias block-wide; they stay the source of the graph step's variants, graph_kernels.variants.)
# One layer's whole update in one launch: the rule on W from W.grad, grid-stride over W's elements,
# and b's gradient dy.sum(0) (written to b.grad) with the rule on b. The bias sum is a block-wide
# column reduction: block k of the first ceil(cols / LAYER_COLUMNS) takes columns 32k..32k+31, its 8
# x 32 threads each sum every 8th row of one column (neighbouring threads read neighbouring
# columns), then the 8 partial sums of each column are added in shared memory in a fixed order (the
# same bits on every run). One thread per column summing every row (128 dependent loads at batch
# 128) cost milliseconds at full batch. The rules on W's element i and b's element j
# (LAYER_RULE_W, LAYER_RULE_B) are generated from the optimizer's as the elementwise kernels' are
# (rules.dispatch, _RUN_TIME's flags); they, LAYER_MOMENTUM (0 or 1) and LAYER_KERNEL are defined
# per kernel by _layer_source.
LAYER_THREADS, LAYER_COLUMNS = 256, 32
LAYER_UPDATE = r"""
#define LAYER_GROUPS (LAYER_THREADS / LAYER_COLUMNS)
#if LAYER_MOMENTUM
extern "C" __global__ void LAYER_KERNEL(T* w, const T* g, T* v, T* b, T* vb, T* gb, const T* dy,
                                        const int rows, const int cols, const long long size,
                                        const T lr, const T gamma, const T wd, const int nesterov) {
#else
extern "C" __global__ void LAYER_KERNEL(T* w, const T* g, T* b, T* gb, const T* dy, const int rows,
                                        const int cols, const long long size, const T lr,
                                        const T wd) {
#endif
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < size;
         i += (long long)blockDim.x * gridDim.x) {
        LAYER_RULE_W
    }
    if ((long long)blockIdx.x * LAYER_COLUMNS >= cols) return;  // the whole block: no barrier unmet
    __shared__ T part[LAYER_GROUPS][LAYER_COLUMNS];
    const int lane = threadIdx.x % LAYER_COLUMNS, group = threadIdx.x / LAYER_COLUMNS;
    const int j = blockIdx.x * LAYER_COLUMNS + lane;
    T s = 0;
    if (j < cols)
        for (int r = group; r < rows; r += LAYER_GROUPS) s += dy[(long long)r * cols + j];
    part[group][lane] = s;
    __syncthreads();
    for (int k = LAYER_GROUPS / 2; k > 0; k >>= 1) {
        if (group < k) part[group][lane] += part[group + k][lane];
        __syncthreads();
    }
    if (group == 0 && j < cols) {
        const T sum = part[0][lane];
        gb[j] = sum;
        LAYER_RULE_B
    }
}
"""
LAYER_MOMENTUM_NAME, LAYER_SGD_NAME = "gpunet_layer_momentum", "gpunet_layer_sgd"


def _layer_source(momentum: bool) -> str:
    name, kind = (LAYER_MOMENTUM_NAME, "momentum") if momentum else (LAYER_SGD_NAME, "sgd")
    on_w = rules.dispatch(
        kind, _RUN_TIME, lambda r: {"w": "w[i]", "g": "g[i]", "velocities": "v[i]"}.get(r, r)
    )
    on_b = rules.dispatch(
        kind, _RUN_TIME, lambda r: {"w": "b[j]", "g": "sum", "velocities": "vb[j]"}.get(r, r)
    )
    return (
        f"#define LAYER_MOMENTUM {int(momentum)}\n#define LAYER_KERNEL {name}\n"
        f"#define LAYER_RULE_W {on_w}\n#define LAYER_RULE_B {on_b}\n"
        f"#define LAYER_THREADS {LAYER_THREADS}\n#define LAYER_COLUMNS {LAYER_COLUMNS}\n"
        + LAYER_UPDATE
    )


# The same rule when both gradients are already written (a distributed run's, summed over the ranks
# after the backward pass; a BatchNorm's gamma and beta): over W's elements, and in the threads i <
# cols on b.
LAYER_MOMENTUM_GIVEN = (
    "int32 cols, T lr, T gamma, T wd, bool nesterov",
    "T w, T g, T v, raw T b, raw T vb, raw T gb",
    _layer_rule("momentum", True),
    "gpunet_layer_momentum_given",
)
LAYER_SGD_GIVEN = (
    "int32 cols, T lr, T wd",
    "T w, T g, raw T b, raw T gb",
    _layer_rule("sgd", True),
    "gpunet_layer_sgd_given",
)
# BatchNorm's normalisation of a block in training mode, after the column statistics
# (BATCH_NORM_STATS): the Linear's bias added as the core adds it (y = x @ W + b, rounded), xhat =
# (y - mu) * inv_sigma kept for the backward pass, then gamma * xhat + beta and, when ``relu``, the
# ReLU (NaN passes, as in BIAS_RELU).
BATCH_NORM_APPLY = (
    "raw T b, raw T mu, raw T inv_sigma, raw T gamma, raw T beta, int32 cols, bool relu",
    "T y, T xhat",
    "int j = i % cols; xhat = ((y + b[j]) - mu[j]) * inv_sigma[j];"
    " T o = gamma[j] * xhat + beta[j];"
    " y = relu && o < (T)0 ? (T)0 : o;",
    "gpunet_batch_norm_apply",
)
# Pixels' gather: rows idx of the uint8 images, as floats divided by 255, in one pass (no uint8
# temporary).
GATHER_SCALED = (
    "raw uint8 src, raw int64 idx, int32 cols, T divisor",
    "T out",
    "out = (T)src[idx[i / cols] * cols + i % cols] / divisor;",
    "gpunet_gather_scaled",
)
ELEMENTWISE = {
    "bias_relu": BIAS_RELU,
    "relu_backward": RELU_BACKWARD,
    "dropout": DROPOUT,
    "relu_mask_backward": RELU_MASK_BACKWARD,
    "gather_scaled": GATHER_SCALED,
    "layer_momentum_given": LAYER_MOMENTUM_GIVEN,
    "layer_sgd_given": LAYER_SGD_GIVEN,
    "batch_norm_apply": BATCH_NORM_APPLY,
}
# Each optimizer's update rule on one parameter, generated from its one definition
# (gpunet.fast.rules): a kernel per combination of its settings, gpunet_<kind>[_<flag>...], e.g.
# gpunet_adamw_wd
RULES = {name[len("gpunet_") :]: rules.kernel_spec(opt) for name, opt in rules.examples().items()}
ELEMENTWISE.update(RULES)

# softmax cross-entropy, forward and gradient in one pass: one thread per row (MNIST has 10 classes,
# so a row fits in registers). T, EXP and LOG are defined per dtype by softmax_xent_source.
SOFTMAX_XENT = r"""
extern "C" __global__ void gpunet_softmax_xent(const T* z, const long long* y, T* grad, T* loss,
                                                 const int n, const int c, const T inv_n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const T* zi = z + (long long)i * c;
    T* gi = grad + (long long)i * c;
    T m = zi[0];
    for (int j = 1; j < c; ++j) m = zi[j] > m ? zi[j] : m;
    T s = 0;
    for (int j = 0; j < c; ++j) { T e = EXP(zi[j] - m); gi[j] = e; s += e; }
    const long long t = y[i];
    const T inv_s = (T)1 / s;
    for (int j = 0; j < c; ++j) gi[j] = (gi[j] * inv_s - (j == t ? (T)1 : (T)0)) * inv_n;
    loss[i] = LOG(s) + m - zi[t];
}
"""
SOFTMAX_XENT_NAME = "gpunet_softmax_xent"

# The training step's softmax cross-entropy: the same gradient rows, and in the same launch the
# batch's mean loss and its sums for the epoch: loss_sum += sum of the row losses (in double) and
# correct += the rows whose argmax is the label, by NumPy's rule as the core counts (training.py's
# ``out.argmax(axis=1)``): the first largest logit, or the first NaN where the row has one (a NaN
# row's m is then NaN: its gradient and loss are NaN either way). One block of SUMS_THREADS threads
# strides over the rows and reduces in shared memory in a fixed order, so the sums are the same bits
# on every run (atomics would add in a varying order, and a resumed GPU run would drift from an
# uninterrupted one).
SUMS_THREADS = 256
SOFTMAX_XENT_SUMS = r"""
extern "C" __global__ void gpunet_softmax_xent_sums(const T* z, const long long* y, T* grad,
                                                      T* mean, double* loss_sum, long long* correct,
                                                      const int n, const int c, const T inv_n) {
    __shared__ double part[THREADS];
    __shared__ long long hits[THREADS];
    double loss = 0;
    long long hit = 0;
    for (int i = threadIdx.x; i < n; i += THREADS) {
        const T* zi = z + (long long)i * c;
        T* gi = grad + (long long)i * c;
        T m = zi[0];
        int best = 0;
        for (int j = 1; j < c; ++j)
            if (zi[j] > m || (zi[j] != zi[j] && m == m)) { m = zi[j]; best = j; }
        T s = 0;
        for (int j = 0; j < c; ++j) { T e = EXP(zi[j] - m); gi[j] = e; s += e; }
        const long long t = y[i];
        const T inv_s = (T)1 / s;
        for (int j = 0; j < c; ++j) gi[j] = (gi[j] * inv_s - (j == t ? (T)1 : (T)0)) * inv_n;
        loss += (double)(LOG(s) + m - zi[t]);
        hit += best == t;
    }
    part[threadIdx.x] = loss;
    hits[threadIdx.x] = hit;
    __syncthreads();
    for (int k = THREADS / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) {
            part[threadIdx.x] += part[threadIdx.x + k];
            hits[threadIdx.x] += hits[threadIdx.x + k];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        *mean = (T)(part[0] * (double)inv_n);
        *loss_sum += part[0];
        *correct += hits[0];
    }
}
"""
SOFTMAX_XENT_SUMS_NAME = "gpunet_softmax_xent_sums"
CTYPES = {"float32": "float", "float64": "double"}

# The augmentation's resampling (gpunet.augment: bilinear at source_points), one thread per output
# pixel: the point pixel (i, j) of image n reads, maps[n] @ (i - cr, j - cc, 1) + (cr, cc) (+ the
# elastic field's displacement fields[n, :, j, i] when ``elastic``), clipped to [-1, H] x [-1, W],
# then the bilinear interpolation of its four neighbours with zeros outside the image (the core's
# zero padding, as bounds tests). Nothing but the images, the (B, 2, 3) maps and the fields is read:
# no grid, centre or offsets.
RESAMPLE = r"""
extern "C" __global__ void gpunet_resample(const T* images, const T* maps, const T* fields, T* out,
                                            const int b, const int h, const int w,
                                            const int elastic) {
    const long long hw = (long long)h * w;
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (long long)b * hw) return;
    const long long n = k / hw;
    const int p = (int)(k - n * hw), i = p / w, j = p % w;
    const T cr = (T)0.5 * (T)(h - 1), cc = (T)0.5 * (T)(w - 1);
    const T dr = (T)i - cr, dc = (T)j - cc;
    const T* m = maps + n * 6;
    T r = m[0] * dr + m[1] * dc + m[2] + cr;
    T c = m[3] * dr + m[4] * dc + m[5] + cc;
    if (elastic) {
        const T* f = fields + n * 2 * hw + (long long)j * h + i;
        r += f[0];
        c += f[hw];
    }
    r = r < (T)-1 ? (T)-1 : (r > (T)h ? (T)h : r);
    c = c < (T)-1 ? (T)-1 : (c > (T)w ? (T)w : c);
    const T r0 = FLOOR(r), c0 = FLOOR(c);
    const T fr = r - r0, fc = c - c0;
    const int ri = (int)r0, ci = (int)c0;
    const T* img = images + n * hw;
    // r and c lie in [-1, H] x [-1, W]: a neighbour can be one before the image or at H / W
    // (past it)
    const bool up = ri >= 0 && ri < h, down = ri + 1 < h;
    const bool left = ci >= 0 && ci < w, right = ci + 1 < w;
    const T v00 = up && left ? img[ri * w + ci] : (T)0;
    const T v01 = up && right ? img[ri * w + ci + 1] : (T)0;
    const T v10 = down && left ? img[(ri + 1) * w + ci] : (T)0;
    const T v11 = down && right ? img[(ri + 1) * w + ci + 1] : (T)0;
    const T top = v00 + fc * (v01 - v00);
    const T bottom = v10 + fc * (v11 - v10);
    out[k] = top + fr * (bottom - top);
}
"""
RESAMPLE_NAME, RESAMPLE_THREADS = "gpunet_resample", 256

# BatchNorm's statistics in training mode, one thread per feature (column) of y = z + b (z = x @ W,
# the bias added as the core's Linear adds it): mu = mean(y), var = mean((y - mu)^2) over the rows,
# in two passes as the core; the running statistics updated as the core updates them (keep = 1 -
# momentum, unbiased = momentum * n / (n - 1), both rounded on the host as the core rounds them);
# inv_sigma = 1 / sqrt(var + eps).
BATCH_NORM_STATS = r"""
extern "C" __global__ void gpunet_batch_norm_stats(const T* z, const T* b, T* mu, T* inv_sigma,
                                                    T* running_mean, T* running_var,
                                                    const int n, const int f,
                                                    const T momentum, const T keep,
                                                    const T unbiased, const T eps) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= f) return;
    T s = 0;
    for (int r = 0; r < n; ++r) s += z[(long long)r * f + j] + b[j];
    const T mean = s / (T)n;
    T q = 0;
    for (int r = 0; r < n; ++r) { T c = (z[(long long)r * f + j] + b[j]) - mean; q += c * c; }
    const T var = q / (T)n;
    running_mean[j] = running_mean[j] * keep + momentum * mean;
    running_var[j] = running_var[j] * keep + unbiased * var;
    mu[j] = mean;
    inv_sigma[j] = (T)1 / SQRT(var + eps);
}
"""
BATCH_NORM_STATS_NAME = "gpunet_batch_norm_stats"

# BatchNorm's backward pass in training mode, one thread per feature, with the block's tail before
# it: dy (the gradient at the block's output) through Dropout's mask (``has_mask``) and the ReLU
# (``relu``: y is the block's output, > 0 exactly where both let through), then dgamma = sum(d *
# xhat), dbeta = sum(d) and dx = (gamma * inv_sigma / n) * (n d - dbeta - xhat dgamma), written over
# dy (the core's formulas).
BATCH_NORM_BACKWARD = r"""
extern "C" __global__ void gpunet_batch_norm_backward(T* dy, const T* y, const T* mask,
                                                       const T* xhat, const T* gamma,
                                                       const T* inv_sigma, T* dgamma,
                                                       T* dbeta, const int n, const int f,
                                                       const int has_mask, const int relu) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= f) return;
    T sb = 0, sg = 0;
    for (int r = 0; r < n; ++r) {
        const long long k = (long long)r * f + j;
        T d = dy[k];
        if (has_mask) d = d * mask[k];
        if (relu) d = y[k] > (T)0 ? d : d * (T)0;
        dy[k] = d;
        sb += d;
        sg += d * xhat[k];
    }
    dgamma[j] = sg;
    dbeta[j] = sb;
    const T scale = gamma[j] * inv_sigma[j] * ((T)1 / (T)n);
    for (int r = 0; r < n; ++r) {
        const long long k = (long long)r * f + j;
        dy[k] = scale * ((T)n * dy[k] - sb - xhat[k] * sg);
    }
}
"""
BATCH_NORM_BACKWARD_NAME = "gpunet_batch_norm_backward"
COLUMN_THREADS = 128
RAW = {
    RESAMPLE_NAME: RESAMPLE,
    BATCH_NORM_STATS_NAME: BATCH_NORM_STATS,
    BATCH_NORM_BACKWARD_NAME: BATCH_NORM_BACKWARD,
    LAYER_MOMENTUM_NAME: _layer_source(True),
    LAYER_SGD_NAME: _layer_source(False),
}


def raw_source(ctype: str, name: str) -> str:
    """The complete CUDA source of the RawKernel ``name`` of :data:`RAW` for ``ctype`` ("float" or
    "double"): floorf/sqrtf or floor/sqrt named here, not left to C++ overloads."""
    fn = {"float": ("floorf", "sqrtf"), "double": ("floor", "sqrt")}[ctype]
    return f"typedef {ctype} T;\n#define FLOOR {fn[0]}\n#define SQRT {fn[1]}\n" + RAW[name]


def ctype(dtype) -> str:
    """The C type of the kernels for a network of ``dtype``; a clear TypeError for any other
    dtype."""
    name = np.dtype(dtype).name
    if name not in CTYPES:
        raise TypeError(
            f"dtype: gpunet's CUDA kernels run float32 and float64 networks, got {name}"
        )
    return CTYPES[name]


def softmax_xent_source(ctype: str, kernel: str = SOFTMAX_XENT) -> str:
    """The complete CUDA source of ``kernel`` (either softmax kernel) for ``ctype`` ("float" or
    "double"): expf/logf or exp/log, chosen here rather than left to C++ overloads under NVRTC."""
    fn = {"float": ("expf", "logf"), "double": ("exp", "log")}[ctype]
    return (
        f"typedef {ctype} T;\n#define EXP {fn[0]}\n#define LOG {fn[1]}\n#define THREADS "
        f"{SUMS_THREADS}\n" + kernel
    )


@functools.lru_cache(maxsize=None)
def _elementwise(name: str):
    import cupy

    return cupy.ElementwiseKernel(*ELEMENTWISE[name])


@functools.lru_cache(maxsize=None)
def _softmax_xent(ctype: str, sums: bool = False):
    import cupy

    if sums:
        return cupy.RawKernel(softmax_xent_source(ctype, SOFTMAX_XENT_SUMS), SOFTMAX_XENT_SUMS_NAME)
    return cupy.RawKernel(softmax_xent_source(ctype, SOFTMAX_XENT), SOFTMAX_XENT_NAME)


@functools.lru_cache(maxsize=None)
def _raw(ctype: str, name: str):
    import cupy

    return cupy.RawKernel(raw_source(ctype, name), name)


def bias_relu(y, b):
    """``y = max(y + b, 0)`` in place; y (N, C), b (C,)."""
    return _elementwise("bias_relu")(b, y)


def relu_backward(dy, y):
    """``dy = dy * (y > 0)`` in place, with ``y`` the ReLU output (y > 0 exactly where x > 0)."""
    return _elementwise("relu_backward")(y, dy)


def relu_mask_backward(dy, y, mask):
    """``dy = (dy * mask) * (y > 0)`` in place: Dropout's backward, then ReLU's, in one pass."""
    return _elementwise("relu_mask_backward")(y, mask, dy)


def layer_update(W, b, vW, vb, dy, lr, gamma, wd, nesterov):
    """One Linear's update in one launch, W.grad already written (x.T @ dy): b.grad = dy.sum(0),
    then momentum (``vW``/``vb`` given) or SGD (``None``) on W and b, in place; scalars in W's
    dtype. Every array C-contiguous (the step's buffers are): the kernel reads them as dense."""
    arrays = (W.data, W.grad, b.data, b.grad, dy) + (() if vW is None else (vW, vb))
    if not all(a.flags.c_contiguous for a in arrays):
        raise ValueError(
            "layer_update: expected C-contiguous W, its gradient and velocity, b and dy"
        )
    name = LAYER_SGD_NAME if vW is None else LAYER_MOMENTUM_NAME
    _raw(ctype(W.data.dtype), name)(*layer_update_launch(W, b, vW, vb, dy, lr, gamma, wd, nesterov))


def layer_update_launch(W, b, vW, vb, dy, lr, gamma, wd, nesterov):
    """``(grid, block, args)`` of the layer-update kernel: enough blocks of LAYER_THREADS for W's
    elements and for the bias's column groups; arguments of the C types the kernel declares."""
    rows, cols = dy.shape
    size = W.data.size
    grid = max(-(-size // LAYER_THREADS), -(-cols // LAYER_COLUMNS))
    scalars = (np.int32(rows), np.int32(cols), np.int64(size))
    if vW is None:
        args = (W.data, W.grad, b.data, b.grad, dy, *scalars, lr, wd)
    else:
        flag = np.int32(bool(nesterov))
        args = (W.data, W.grad, vW, b.data, vb, b.grad, dy, *scalars, lr, gamma, wd, flag)
    return (grid,), (LAYER_THREADS,), args


def gather_scaled(src, idx, out, divisor):
    """``out = src[idx] / divisor`` for uint8 rows src (N, F), int64 idx (K,), out (K, F) float, one
    pass."""
    _elementwise("gather_scaled")(src, idx, np.int32(src.shape[1]), out.dtype.type(divisor), out)
    return out


def rule(opt):
    """``kernel(w, g, *state, *scalars)``: ``opt``'s rule on one parameter in one launch, in place
    (the kernel of :data:`RULES` for its settings; ``Optimizer.update`` passes the arrays)."""
    name = rules.variant(opt)[len("gpunet_") :]
    ELEMENTWISE.setdefault(name, rules.kernel_spec(opt))  # RULES has every variant of the examples
    kernel, slots = _elementwise(name), len(opt.slots)

    def launch(w, g, *args):
        kernel(g, *args[slots:], w, *args[:slots])

    return launch


def dropout(y, mask, key, threshold, scale, start=0):
    """``mask = (bits < threshold) * scale; y *= mask`` in place, with the bits of
    :func:`gpunet.layers.dropout_bits` for ``key`` from unit ``start`` on; y and mask (N, C) of one
    float dtype."""
    _elementwise("dropout")(
        np.uint64(key), np.uint64(start), np.uint32(threshold), y.dtype.type(scale), y, mask
    )


def softmax_xent(z, labels, grad, loss_rows):
    """Per row: ``loss_rows = logsumexp(z) - z[label]``, ``grad = (softmax(z) - onehot) / N``.

    z (N, C) and grad (N, C) C-contiguous float32/float64, loss_rows (N,) of z's dtype. The kernel
    reads its arrays as dense rows: labels are made contiguous int64 here (a strided view, such as
    ``y[::2]``, would otherwise be read as if it were dense).
    """
    import cupy

    if not (
        z.ndim == 2
        and z.flags.c_contiguous
        and grad.flags.c_contiguous
        and loss_rows.flags.c_contiguous
        and grad.shape == z.shape
        and loss_rows.shape == z.shape[:1]
        and grad.dtype == z.dtype == loss_rows.dtype
    ):
        raise ValueError(
            "softmax_xent: expected C-contiguous z, grad and loss_rows of one float dtype, got "
            f"{z.dtype}/{grad.dtype}/{loss_rows.dtype} with shapes "
            f"{z.shape}/{grad.shape}/{loss_rows.shape}"
        )
    labels = cupy.ascontiguousarray(labels, dtype=cupy.int64)
    _softmax_xent(ctype(z.dtype))(*softmax_xent_launch(z, labels, grad, loss_rows))
    return grad, loss_rows


def softmax_xent_launch(z, labels, grad, loss_rows):
    """``(grid, block, args)`` of the softmax_xent kernel: one thread per row, and the arguments in
    the kernel's parameter order, each of the C type it declares (z, labels as int64, grad,
    loss_rows, n and c as int32, 1/n in z's dtype; CI checks the kernel's signature against
    these)."""
    n, c = z.shape
    threads = 128
    return (
        ((n + threads - 1) // threads,),
        (threads,),
        (z, labels, grad, loss_rows, np.int32(n), np.int32(c), z.dtype.type(1.0 / n)),
    )


def softmax_xent_sums(z, labels, grad, mean, loss_sum, correct, rows=None):
    """The training step's softmax cross-entropy in one launch: ``grad = (softmax(z) - onehot) /
    N``, ``mean`` (0-d, z's dtype) the batch's mean loss, and the epoch's ``loss_sum`` (0-d float64)
    and ``correct`` (0-d int64) increased by the batch's loss sum and right answers. z, grad (N, C)
    C-contiguous. ``rows``: divide by these rows instead of N (a rank's shard of a global batch of
    ``rows``)."""
    import cupy

    labels = cupy.ascontiguousarray(labels, dtype=cupy.int64)
    _softmax_xent(ctype(z.dtype), True)(
        *softmax_xent_sums_launch(z, labels, grad, mean, loss_sum, correct, rows)
    )
    return grad, mean


def softmax_xent_sums_launch(z, labels, grad, mean, loss_sum, correct, rows=None):
    """``(grid, block, args)`` of the sums kernel: one block; arguments of the C types it
    declares."""
    n, c = z.shape
    return (
        (1,),
        (SUMS_THREADS,),
        (
            z,
            labels,
            grad,
            mean,
            loss_sum,
            correct,
            np.int32(n),
            np.int32(c),
            z.dtype.type(1.0 / (n if rows is None else rows)),
        ),
    )


def layer_update_given(W, b, vW, vb, lr, gamma, wd, nesterov):
    """One layer's update in one launch from gradients already written (W.grad and b.grad): momentum
    (``vW``/``vb`` given) or SGD (``None``) on W and b (W may be a BatchNorm's gamma, b its
    beta)."""
    cols = np.int32(b.data.size)
    if vW is None:
        _elementwise("layer_sgd_given")(cols, lr, wd, W.data, W.grad, b.data, b.grad)
    else:
        _elementwise("layer_momentum_given")(
            cols, lr, gamma, wd, bool(nesterov), W.data, W.grad, vW, b.data, vb, b.grad
        )


def resample(images, maps, fields, shape):
    """The augmentation's resampling in one launch: ``images`` (B, H*W) read at the points of
    ``maps`` (B, 2, 3) and ``fields`` (B, 2, W, H) or None (see :data:`RESAMPLE`); a new (B, H*W)
    array."""
    import cupy

    out = cupy.empty_like(images)
    _raw(ctype(images.dtype), RESAMPLE_NAME)(*resample_launch(images, maps, fields, shape, out))
    return out


def resample_launch(images, maps, fields, shape, out):
    """``(grid, block, args)`` of the resampling kernel: one thread per output pixel; the arguments
    of the C types it declares (``maps`` stands in for the fields' pointer when there are none)."""
    b, (h, w) = images.shape[0], shape
    total = b * h * w
    return (
        ((total + RESAMPLE_THREADS - 1) // RESAMPLE_THREADS,),
        (RESAMPLE_THREADS,),
        (
            images,
            maps,
            maps if fields is None else fields,
            out,
            np.int32(b),
            np.int32(h),
            np.int32(w),
            np.int32(fields is not None),
        ),
    )


def batch_norm_stats(z, bias, mu, inv_sigma, running_mean, running_var, momentum, eps):
    """BatchNorm's column statistics of ``z + bias`` (z (N, F) C-contiguous), into mu and inv_sigma
    (F,), and its running statistics updated in place; one launch (see :data:`BATCH_NORM_STATS`)."""
    _raw(ctype(z.dtype), BATCH_NORM_STATS_NAME)(
        *batch_norm_stats_launch(z, bias, mu, inv_sigma, running_mean, running_var, momentum, eps)
    )


def batch_norm_stats_launch(z, bias, mu, inv_sigma, running_mean, running_var, momentum, eps):
    """``(grid, block, args)`` of the statistics kernel: one thread per feature; the scalars in z's
    dtype, rounded as the core rounds them (``1 - momentum`` in float64, then cast; ``momentum * n /
    (n - 1)`` as the product of the two cast values)."""
    (n, f), t = z.shape, z.dtype.type
    m = t(momentum)
    return (
        ((f + COLUMN_THREADS - 1) // COLUMN_THREADS,),
        (COLUMN_THREADS,),
        (
            z,
            bias,
            mu,
            inv_sigma,
            running_mean,
            running_var,
            np.int32(n),
            np.int32(f),
            m,
            t(1 - momentum),
            m * t(n / (n - 1)),
            t(eps),
        ),
    )


def batch_norm_apply(y, xhat, bias, mu, inv_sigma, gamma, beta, relu):
    """``xhat = (y + bias - mu) * inv_sigma``, ``y = gamma * xhat + beta`` (then ReLU if ``relu``)
    in place; y and xhat (N, F), the rest (F,); one launch."""
    _elementwise("batch_norm_apply")(
        bias, mu, inv_sigma, gamma, beta, np.int32(y.shape[1]), bool(relu), y, xhat
    )


def batch_norm_backward(dy, y, mask, xhat, gamma, inv_sigma, dgamma, dbeta, relu):
    """BatchNorm's backward (with Dropout's and the ReLU's before it) in one launch: dy (N, F)
    becomes dx in place; dgamma, dbeta (F,) written (see :data:`BATCH_NORM_BACKWARD`)."""
    _raw(ctype(dy.dtype), BATCH_NORM_BACKWARD_NAME)(
        *batch_norm_backward_launch(dy, y, mask, xhat, gamma, inv_sigma, dgamma, dbeta, relu)
    )


def batch_norm_backward_launch(dy, y, mask, xhat, gamma, inv_sigma, dgamma, dbeta, relu):
    """``(grid, block, args)`` of the backward kernel: one thread per feature (``xhat`` stands in
    for the mask's pointer when there is none)."""
    n, f = dy.shape
    return (
        ((f + COLUMN_THREADS - 1) // COLUMN_THREADS,),
        (COLUMN_THREADS,),
        (
            dy,
            y,
            xhat if mask is None else mask,
            xhat,
            gamma,
            inv_sigma,
            dgamma,
            dbeta,
            np.int32(n),
            np.int32(f),
            np.int32(mask is not None),
            np.int32(bool(relu)),
        ),
    )
