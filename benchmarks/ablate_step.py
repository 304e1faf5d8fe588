"""What would a CPU training step without Python cost, and which of its parts take the time beyond the floor?

An experiment for the batch-128 floor target (issue 4), not part of gpunet. It compiles one whole training
epoch of a Linear/ReLU MLP with numba: the same operations as ``fit``'s fused CPU path (gather, forward
GEMM + bias + ReLU, softmax cross-entropy with the loss sum and correct count, backward GEMMs + ReLU mask,
the velocity GEMM and GEMV, ``w -= v``), calling the same OpenBLAS routines, with no Python between them.
Switches leave parts out, so each part's cost is measured inside a real step:

    gemm       the matrix products only (the dW products go into the velocities, as in fit)
    +gather    + the batch gather from the shuffled training set
    +elem      + bias/ReLU, softmax cross-entropy, ReLU backward
    full       + bias-velocity GEMV and w -= v: the whole step

Each round times, one after the other: the floor (``bench_mlp.Floor``), one ``fit`` epoch, and the four
variants; ratios are to the floor of the same round. First the compiled ``full`` epoch and a ``fit``
epoch run from the same weights on the same batch order, and their weights are compared: the experiment
measures the same work as ``fit``.

    python benchmarks/ablate_step.py --data-dir ../shared/data/mnist [--rounds 9] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mlp  # noqa: E402  (Floor, the batch order, medians, settle, machine_info)

import gpunet  # noqa: E402
from gpunet.fast import blas  # noqa: E402
from gpunet.data import load_mnist  # noqa: E402
from gpunet.training import fit  # noqa: E402

_B = blas._openblas("s")  # the compiled epoch calls these very routines, as fit's fused path does
_gemm, _gemv, _axpy = (_B.gemm, _B.gemv, _B.axpy) if _B is not None else (None, None, None)
_RM, _N, _T = 101, 111, 112  # CBLAS: row-major, no transpose, transpose
VARIANTS = (("gemm", False, False, False), ("+gather", True, False, False),
            ("+elem", True, True, False), ("full", True, True, True))


@numba.njit(nogil=True)
def epoch(x, y, order, bs, Ws, bias, vWs, vbs, wbs, vwbs, hs, ds, ones, lr, gamma, gather, elem, update, acc):
    """One epoch of steps; acc[0] += loss sum, acc[1] += correct. hs/ds: (bs, width) work arrays per layer."""
    n, L, one, zero = x.shape[0], len(Ws), np.float32(1.0), np.float32(0.0)
    loss_sum, correct = 0.0, 0
    for lo in range(0, n, bs):
        r = min(n, lo + bs) - lo
        if gather:
            for k in range(r):
                hs[0][k, :] = x[order[lo + k], :]
        for i in range(L):  # forward
            W, h, o, b = Ws[i], hs[i], hs[i + 1], bias[i]
            fi, fo = W.shape
            _gemm(_RM, _N, _N, r, fo, fi, one, h.ctypes, fi, W.ctypes, fo, zero, o.ctypes, fo)
            if elem:
                for a in range(r):
                    for j in range(fo):
                        t = o[a, j] + b[j]
                        o[a, j] = t if (t > zero or i == L - 1) else zero
        if elem:  # softmax cross-entropy: gradient (softmax - onehot) / r, loss and argmax
            z, g, inv = hs[L], ds[L], np.float32(1.0 / r)
            for a in range(r):
                m, arg = z[a, 0], 0
                for j in range(1, z.shape[1]):
                    if z[a, j] > m:
                        m, arg = z[a, j], j
                s = zero
                for j in range(z.shape[1]):
                    e = np.exp(z[a, j] - m)
                    g[a, j] = e
                    s += e
                for j in range(z.shape[1]):
                    g[a, j] *= inv / s
                t = y[order[lo + a]]
                g[a, t] -= inv
                loss_sum += np.log(s) + m - z[a, t]
                correct += arg == t
        for i in range(L - 1, -1, -1):  # backward and update, last layer first
            W, h, dy = Ws[i], hs[i], ds[i + 1]
            fi, fo = W.shape
            if i > 0:  # dx from the old W, then the ReLU mask
                dx = ds[i]
                _gemm(_RM, _N, _T, r, fi, fo, one, dy.ctypes, fo, W.ctypes, fo, zero, dx.ctypes, fi)
                if elem:
                    for a in range(r):
                        for j in range(fi):
                            if not h[a, j] > zero:
                                dx[a, j] = zero
            _gemm(_RM, _T, _N, fi, fo, r, lr, h.ctypes, fi, dy.ctypes, fo, gamma, vWs[i].ctypes, fo)
            if update:
                _gemv(_RM, _T, r, fo, lr, dy.ctypes, fo, ones.ctypes, 1, gamma, vbs[i].ctypes, 1)
                _axpy(wbs[i].shape[0], np.float32(-1.0), vwbs[i].ctypes, 1, wbs[i].ctypes, 1)
    acc[0] += loss_sum
    acc[1] += correct


class Compiled:
    """The network's weights in one flat buffer laid out like the optimizer's (W then b per layer)."""

    def __init__(self, sizes, bs, state, lr, momentum):
        self.sizes, self.bs = sizes, bs
        total = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        self.w, self.v = np.empty(total, np.float32), np.zeros(total, np.float32)
        Ws, bias, vWs, vbs, wbs, vwbs, off = [], [], [], [], [], [], 0
        for a, b in zip(sizes[:-1], sizes[1:]):
            end = off + a * b
            Ws.append(self.w[off:end].reshape(a, b))
            vWs.append(self.v[off:end].reshape(a, b))
            bias.append(self.w[end:end + b])
            vbs.append(self.v[end:end + b])
            wbs.append(self.w[off:end + b])
            vwbs.append(self.v[off:end + b])
            off = end + b
        self.Ws, self.bias = Ws, bias
        self.load(state)
        hs = tuple(np.zeros((bs, s), np.float32) for s in sizes)
        ds = tuple(np.zeros((bs, s), np.float32) for s in sizes)
        self.arrays = (tuple(Ws), tuple(bias), tuple(vWs), tuple(vbs), tuple(wbs), tuple(vwbs), hs, ds,
                       np.ones(bs, np.float32), np.float32(lr), np.float32(momentum))

    def load(self, state):
        """Weights from a gpunet ``state_dict`` (Linear layers at 0, 2, 4, ...); velocities back to zero."""
        for k, (W, b) in enumerate(zip(self.Ws, self.bias)):
            W[...] = state[f"{2 * k}.W"]
            b[...] = state[f"{2 * k}.b"]
        self.v[:] = 0

    def state(self):
        return {f"{2 * k}.{name}": arr.copy() for k, (W, b) in enumerate(zip(self.Ws, self.bias))
                for name, arr in (("W", W), ("b", b))}

    def run(self, x, y, order, gather=True, elem=True, update=True):
        acc = np.zeros(2)
        start = time.perf_counter()
        epoch(x, y, order, self.bs, *self.arrays, gather, elem, update, acc)
        return time.perf_counter() - start, acc


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sizes", default="784-512-512-10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (after one warm-up round)")
    p.add_argument("--pause", type=float, default=0.1, help="sleep before each timed phase (see bench_mlp)")
    p.add_argument("--json", default=None, help="write the per-round times and medians here")
    args = p.parse_args()
    if _B is None:
        sys.exit("ablate_step.py needs the OpenBLAS inside NumPy's PyPI wheel (gpunet.fast.blas found none)")
    sizes, bs = [int(s) for s in args.sizes.split("-")], args.batch
    (x, y), _ = load_mnist(args.data_dir, download=False)
    n = len(x)

    net = gpunet.mlp(sizes, activation="relu", seed=0, device="cpu")
    state0 = net.state_dict()
    loss = gpunet.SoftmaxCrossEntropy()
    opt = gpunet.Momentum(net.parameters(), lr=0.01, momentum=0.9)
    comp = Compiled(sizes, bs, state0, 0.01, 0.9)

    # Same work: one epoch each from the same weights on fit's batch order (seed 0), weights compared.
    t0 = time.perf_counter()
    _, acc = comp.run(x, y, bench_mlp.gpunet_order("cpu", 0, n))
    compile_s = time.perf_counter() - t0
    rec = fit(net, loss, opt, x, y, epochs=1, batch_size=bs, seed=0).epochs[0]
    diff = max(float(np.max(np.abs(comp.state()[k] - v))) for k, v in net.state_dict().items())
    print(f"compiled epoch (incl. numba compile {compile_s:.1f}s): loss {acc[0] / n:.5f} acc {acc[1] / n:.4f}; "
          f"fit: loss {rec['loss']:.5f} acc {rec['accuracy']:.4f}; max |weight difference| {diff:.2e}")
    if not diff < 1e-4:
        sys.exit("the compiled epoch does not do fit's work: stopping")

    floor = bench_mlp.Floor(sizes, n, bs, np, train=True)
    names = ["fit"] + [v[0] for v in VARIANTS]
    rounds = []
    for r in range(args.rounds + 1):
        order = bench_mlp.gpunet_order("cpu", r + 1, n)  # the order fit draws below, with seed r + 1
        row = {}
        bench_mlp.settle(args.pause)
        row["floor"] = floor.run(lambda: None)
        bench_mlp.settle(args.pause)
        row["fit"] = fit(net, loss, opt, x, y, epochs=1, batch_size=bs, seed=r + 1).epochs[0]["seconds"]
        for name, g, e, u in VARIANTS:
            comp.load(state0)  # every variant starts from the same weights: no drift into odd values
            bench_mlp.settle(args.pause)
            row[name] = comp.run(x, y, order, g, e, u)[0]
        rounds.append(row)
        print(f"round {r + 1}{' (warm-up)' if r == 0 else ''}: floor {row['floor']:.3f}s  "
              + "  ".join(f"{k} {row[k] / row['floor']:.3f}" for k in names), flush=True)
    medians = {k: bench_mlp.median_after_warmup([row[k] / row["floor"] for row in rounds]) for k in names}
    steps = len(bench_mlp.batch_bounds(n, bs))
    # fit minus the compiled full step, same round: what Python costs per step (same BLAS calls, same bits)
    python_us = bench_mlp.median_after_warmup([1e6 * (row["fit"] - row["full"]) / steps for row in rounds])
    print("median over rounds of time / floor: " + "  ".join(f"{k} {v:.3f}" for k, v in medians.items()))
    floor_us = 1e6 * bench_mlp.median_after_warmup([row["floor"] for row in rounds]) / steps
    print(f"median fit - full: {python_us:.0f} us per step (floor: {floor_us:.0f} us per step)")
    if args.json:
        out = {"machine": bench_mlp.machine_info("cpu"), "sizes": sizes, "batch": bs, "rounds": rounds,
               "median_over_floor": medians, "median_fit_minus_full_us_per_step": python_us,
               "same_work_max_weight_diff": diff,
               "numba": numba.__version__}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
