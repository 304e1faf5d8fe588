"""Where does a gpunet CPU training step spend its time outside the matrix products?

Replays the body of ``gpunet.training.fit`` (gather, forward, loss, backward with the fused update where
``fit`` uses it, loss/accuracy accumulation) with a clock around each phase, and counts the time spent in
matrix products by wrapping ``numpy.matmul`` and the BLAS ``gemm`` of the fused update for the duration of
the run (gpunet calls both through attributes, so the wrappers see every product). Phase time minus matmul
time is the non-GEMM cost of the phase. Then it runs cProfile over the same steps and lists the functions
with the largest own time (matmul excluded).

    python benchmarks/profile_step.py --data-dir /work/shared/data/mnist [--batch 128 32] [--steps 300]

Numbers are microseconds per step, means over ``--steps`` steps after ``--warmup`` steps.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np

import gpunet
from gpunet import blas
from gpunet.data import load_mnist


class MatmulClock:
    """Time every matrix product while active: ``numpy.matmul``, and the BLAS ``gemm`` that fit's fused
    update calls through ctypes (``blas.LinearMomentum``); ``seconds`` accumulates."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        self._orig = np.matmul
        self._blas = blas._openblas("s")  # the float32 routines, shared by every LinearMomentum

    def _timed(self, fn):
        clock = time.perf_counter

        def timed(*a, **k):
            t0 = clock()
            r = fn(*a, **k)
            self.seconds += clock() - t0
            self.calls += 1
            return r

        return timed

    def __enter__(self):
        np.matmul = self._timed(self._orig)
        if self._blas is not None:
            self._orig_gemm = self._blas.gemm
            self._blas.gemm = self._timed(self._orig_gemm)
        return self

    def __exit__(self, *exc):
        np.matmul = self._orig
        if self._blas is not None:
            self._blas.gemm = self._orig_gemm


def build(sizes, lr=0.01):
    net = gpunet.mlp(sizes, seed=0, device="cpu")
    return net, gpunet.SoftmaxCrossEntropy(), gpunet.Momentum(net.parameters(), lr=lr, momentum=0.9)


PHASES = ("take", "forward", "loss.forward", "loss.backward", "net.backward", "opt.step", "loss_sum",
          "argmax+correct")


def step_loop(x, y, sizes, bs):
    """The body of ``fit``'s step on a fresh network, replayable: ``run(count, mark)`` runs ``count`` steps
    and calls ``mark(phase)`` after each phase of each step (one of ``PHASES``)."""
    net, loss, opt = build(sizes)
    fused = opt.fused_update(net)  # as in fit: the CPU update folded into backward, where available
    order = np.random.default_rng(0).permutation(len(x))
    xb_buf = np.empty((bs, x.shape[1]), x.dtype)
    yb_buf = np.empty((bs,), y.dtype)
    loss_sum, correct = np.zeros((), np.float64), np.zeros((), np.int64)
    done = 0

    def run(count, mark=lambda phase: None):
        nonlocal loss_sum, correct, done
        for s in range(done, done + count):
            lo = (s * bs) % (len(x) - bs)
            idx = order[lo:lo + bs]
            xb, yb = np.take(x, idx, axis=0, out=xb_buf, mode="clip"), np.take(y, idx, axis=0, out=yb_buf, mode="clip")
            mark("take")
            out = net.forward(xb)
            mark("forward")
            value = loss.forward(out, yb, check=False)
            mark("loss.forward")
            d = loss.backward()
            mark("loss.backward")
            net.backward(d, need_input_grad=False, update=fused)
            mark("net.backward")
            if fused is None:
                opt.step()
            mark("opt.step")
            loss_sum += value * bs
            mark("loss_sum")
            correct += (out.argmax(axis=1) == yb).sum()
            mark("argmax+correct")
        done += count

    return run


def phases(x, y, sizes, bs, steps, warmup):
    """Mean microseconds per step of each phase, and of the matmuls inside it."""
    run = step_loop(x, y, sizes, bs)
    total = dict.fromkeys(PHASES, 0.0)
    gemm = dict.fromkeys(PHASES, 0.0)
    clock = time.perf_counter
    with MatmulClock() as mm:
        run(warmup)
        last = [clock(), mm.seconds]  # the clock and the matmul seconds at the end of the previous phase

        def mark(phase):
            now, g = clock(), mm.seconds
            total[phase] += now - last[0]
            gemm[phase] += g - last[1]
            last[:] = clock(), mm.seconds  # the marks' own cost is left out

        run(steps, mark)
    return {k: (1e6 * total[k] / steps, 1e6 * gemm[k] / steps) for k in PHASES}


def profile(x, y, sizes, bs, steps, top=15):
    """cProfile over ``steps`` steps of ``fit``'s body; the top functions by own time."""
    run = step_loop(x, y, sizes, bs)
    run(steps)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    run(steps)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items():
        where = f"{file.rsplit('/', 2)[-2:][-1] if '/' in file else file}:{line}({fn})"
        rows.append((tt / steps * 1e6, ct / steps * 1e6, nc / steps, where))
    rows.sort(reverse=True)
    return rows[:top]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[128, 32])
    p.add_argument("--sizes", default="784-512-512-10")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split("-")]
    (x, y), _ = load_mnist(args.data_dir, download=False)
    for bs in args.batch:
        res = phases(x, y, sizes, bs, args.steps, args.warmup)
        tot = sum(v[0] for v in res.values())
        gem = sum(v[1] for v in res.values())
        print(f"\n{args.sizes}, batch {bs}: {tot:.0f} us/step, of which matmul {gem:.0f} us, "
              f"outside matmul {tot - gem:.0f} us ({100 * (tot - gem) / tot:.0f}%)")
        print(f"  {'phase':16s} {'total us':>9s} {'matmul us':>9s} {'other us':>9s}")
        for k, (t, g) in res.items():
            print(f"  {k:16s} {t:9.1f} {g:9.1f} {t - g:9.1f}")
        print("  cProfile, top own time per step (us own, us cumulative, calls/step):")
        for tt, ct, nc, where in profile(x, y, sizes, bs, args.steps):
            print(f"    {tt:8.1f} {ct:8.1f} {nc:6.1f}  {where}")


if __name__ == "__main__":
    main()
