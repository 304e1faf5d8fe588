"""Benchmark: gpunet against PyTorch (eager) at training MLPs on MNIST, and against the matmul floor.

For each configuration both frameworks train the same network (gpunet's initial weights, copied into
torch with W transposed), with the same learning rate and momentum, on the same batch order (gpunet's
``fit`` permutation, reproduced for torch). Epochs are interleaved so that machine noise hits every side
alike::

    floor, gpunet, torch, floor, gpunet, torch, ...

where the *floor* runs exactly the matrix products one training epoch needs (forward ``x @ W`` for each
layer, ``dW = h.T @ dy`` for each layer, ``dx = dy @ W.T`` for all but the first layer), with the same
shapes and layouts, float32, back to back into preallocated outputs (``out=``), NumPy on the CPU and CuPy
on the GPU. Nothing can train faster than its own matmuls, so ``floor / epoch`` is the fraction of an
epoch spent in useful GEMM work and ``1 - floor / epoch`` the overhead (elementwise passes, Python).

Round 1 is warm-up (first-touch page faults, BLAS thread start-up, CuPy kernel compilation): it is
reported separately and the medians use rounds 2..E (all rounds when ``--epochs 1``).

Peak memory is measured in separate subprocesses (``--_memory-child``) that only load MNIST and train one
epoch, so that nothing else this script allocates counts.

Run ``python benchmarks/bench_mlp.py --help``; see ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_report lives next to this file

# name -> (kind, layer sizes, batch size, devices it runs on)
CONFIGS = {
    "784-512-512-10/b32": ("train", (784, 512, 512, 10), 32, ("cpu", "gpu")),
    "784-512-512-10/b128": ("train", (784, 512, 512, 10), 128, ("cpu", "gpu")),
    "784-512-512-10/b1024": ("train", (784, 512, 512, 10), 1024, ("cpu", "gpu")),
    "784-100-10/b128": ("train", (784, 100, 10), 128, ("cpu", "gpu")),
    "784-512-512-10/b4096": ("train", (784, 512, 512, 10), 4096, ("gpu",)),
    "inference": ("infer", (784, 512, 512, 10), 4096, ("cpu", "gpu")),
}
QUICK_CONFIGS = ("784-512-512-10/b128", "784-100-10/b128", "inference")
MEMORY_SIZES, MEMORY_BATCH = (784, 512, 512, 10), 128


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST files (default: $GPUNET_DATA, else gpunet's cache folder)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: gpunet on CuPy and torch on cuda (exits with a message when no GPU is usable)")
    p.add_argument("--configs", default="all",
                   help=f"comma-separated names, or 'all'; known: {', '.join(CONFIGS)}")
    p.add_argument("--epochs", type=int, default=None,
                   help="rounds (floor, gpunet epoch, torch epoch) per training config; round 1 is warm-up "
                        "(default 3 on the CPU, 5 on the GPU; 2 with --quick)")
    p.add_argument("--inference-runs", type=int, default=7, help="timed runs per side for 'inference'")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of both sides")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="seed of gpunet's initial weights")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (torch.set_num_threads) and, when given, for NumPy's BLAS "
                        "(OPENBLAS_NUM_THREADS etc., set before NumPy is imported); default: the cores "
                        "this process may use")
    p.add_argument("--pause", type=float, default=0.1,
                   help="seconds of sleep before each timed phase, so the other library's idle BLAS/OpenMP "
                        "threads stop spinning")
    p.add_argument("--pixels", choices=("uint8", "float32"), default="uint8",
                   help="how both sides hold the images: uint8 bytes scaled to float32 batch by batch "
                        "(gpunet.Pixels; torch index_select then div), or one float32 array")
    p.add_argument("--no-torch", action="store_true", help="time gpunet alone even when torch is installed")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: 2 rounds, configs {', '.join(QUICK_CONFIGS)}, 3 inference runs")
    p.add_argument("--json", default=None, help="where to write the results (default "
                                                "benchmarks/results/latest-<device>.json)")
    p.add_argument("--markdown", default=None, help="also write a Markdown rendering here")
    p.add_argument("--_memory-child", dest="memory_child", choices=("gpunet", "torch"), default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else (5 if args.device == "gpu" else 3)
    if args.epochs < 1:
        p.error("--epochs: expected a positive integer")
    if args.quick:
        args.inference_runs = min(args.inference_runs, 3)
    if args.configs == "all":
        names = [n for n in (QUICK_CONFIGS if args.quick else CONFIGS) if args.device in CONFIGS[n][3]]
    else:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONFIGS]
        if unknown:
            p.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
        wrong = [n for n in names if args.device not in CONFIGS[n][3]]
        if wrong:
            p.error(f"--configs: {wrong} run only on {CONFIGS[wrong[0]][3]}")
    args.config_names = names
    return args


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads is not None:
    # BLAS libraries read these once, when NumPy/torch load them: set before the imports below.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(ARGS.threads))
# CuPy reads CUPY_TF32 at import: keep float32 matmuls in full float32 on Ampere+ GPUs (the floor and the
# peak-rate measurement must be float32, like gpunet's own products).
os.environ.setdefault("CUPY_TF32", "0")

import numpy as np  # noqa: E402

import gpunet  # noqa: E402
from gpunet import backend  # noqa: E402
from gpunet.fast import ops as fast_ops  # noqa: E402
from gpunet.data import load_mnist  # noqa: E402
from gpunet.training import evaluate, fit, predict  # noqa: E402

torch = F = None
# The gpunet memory child must not import torch (its baseline is "numpy + gpunet"); --no-torch skips it too.
if ARGS is None or not (ARGS.no_torch or ARGS.memory_child == "gpunet"):
    try:
        import torch  # noqa: E402
        import torch.nn.functional as F  # noqa: E402
    except ImportError:  # the benchmark still reports gpunet alone
        torch = F = None


# ------------------------------------------------------------------------------------------- helpers
def _proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), in KiB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib() -> int:
    """Current resident set size in KiB (0 where /proc is missing)."""
    return _proc_status("VmRSS") or 0


def peak_rss_kib() -> int:
    """Peak resident set size of this process so far, KiB.

    VmHWM where Linux has it, else ``ru_maxrss`` (KiB on Linux). Why not ``ru_maxrss`` first: Linux keeps
    it across fork and exec, so a child started from a big parent reports the *parent's* RSS at fork time
    as its own peak (measured here: a 790 MiB parent gave a fresh ``python -c`` child ru_maxrss 789 MiB,
    VmHWM 11 MiB). VmHWM belongs to the process's own address space and starts fresh at exec.
    """
    hwm = _proc_status("VmHWM")
    return hwm if hwm is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def median_after_warmup(values):
    """Median of ``values[1:]`` (round 1 is warm-up), or of all when there is only one."""
    rest = values[1:] if len(values) > 1 else values
    return statistics.median(rest) if rest else None


def settle(pause: float) -> None:
    """Collect garbage and sleep before a timed phase: neither side pays for the other's garbage, and the
    idle threads of the other BLAS/OpenMP pool go to sleep instead of spinning on our cores."""
    gc.collect()
    if pause > 0:
        time.sleep(pause)


class Sync:
    """Device synchronisation for honest clocks: no-op on the CPU."""

    def __init__(self, device):
        self.device = device

    def __call__(self):
        if self.device == "gpu":
            backend.synchronize()
            if torch is not None and torch.cuda.is_available():
                torch.cuda.synchronize()


def machine_info(device: str) -> dict:
    """Hostname-free description of the machine and the software versions."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or None
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu, "cores_usable": _cores(), "cores_total": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "numpy": np.__version__, "gpunet": gpunet.__version__,
        "torch": None if torch is None else torch.__version__,
        "blas_numpy": _numpy_blas(),
        "cpu_kernels": fast_ops.numba_status(),
        "threads_env": {v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                        if os.environ.get(v)},
    }
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_blas"] = "mkl" if torch.backends.mkl.is_available() else "other"
    if device == "gpu":
        info["gpu"] = backend.describe_device("gpu")
        if torch is not None and torch.cuda.is_available():
            info["torch_cuda"] = torch.version.cuda
    return info


def _numpy_blas():
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older NumPy or a changed layout: not worth failing over
        return None


# ------------------------------------------------------------------------------------- batch order
def gpunet_order(device, seed, n, xp=np):
    """The permutation ``fit(..., epochs=1, seed=seed)`` draws for its (only) epoch: NumPy's
    ``default_rng(seed).permutation(n)`` on the host, moved to the device (as ``gpunet.training.fit`` does)."""
    order = np.random.default_rng(seed).permutation(n)
    return order if device == "cpu" else xp.asarray(order)


def batch_bounds(n, bs):
    """(lo, hi) of every batch, the last partial batch kept (as ``fit`` does)."""
    return [(lo, min(n, lo + bs)) for lo in range(0, n, bs)]


# ------------------------------------------------------------------------------------------ floor
def gemm_plan(sizes, n, bs, train=True):
    """The (m, k, n, kind) of every matmul one epoch needs; kind names the layout gpunet uses."""
    plan = []
    for lo, hi in batch_bounds(n, bs):
        rows = hi - lo
        for i, (fin, fout) in enumerate(zip(sizes[:-1], sizes[1:])):
            plan.append((rows, fin, fout, "fwd"))               # h (rows, in) @ W (in, out)
            if train:
                plan.append((fin, rows, fout, "dW"))            # h.T (in, rows) @ dy (rows, out)
                if i > 0:
                    plan.append((rows, fout, fin, "dx"))        # dy (rows, out) @ W.T (out, in)
    return plan


def plan_flops(plan) -> float:
    return float(sum(2 * m * k * n for m, k, n, _ in plan))


class Floor:
    """The matmuls of one epoch, on preallocated arrays, with ``out=``: a lower bound for the epoch.

    Operands have the layouts gpunet uses (``h.T`` and ``W.T`` are transposed views of C-contiguous
    arrays), so BLAS sees the same transpose flags. The values are random: GEMM speed does not depend on
    them (no denormals: normal(0, 1) scaled like activations).
    """

    def __init__(self, sizes, n, bs, xp, train=True):
        self.xp, self.sizes = xp, sizes
        rng = np.random.default_rng(1)
        self.weights = [xp.asarray(rng.standard_normal((a, b), dtype=np.float32) * 0.05)
                        for a, b in zip(sizes[:-1], sizes[1:])]
        self.grads = [xp.empty_like(w) for w in self.weights]
        self.plan = gemm_plan(sizes, n, bs, train)
        self.flops = plan_flops(self.plan)
        rows_used = sorted({hi - lo for lo, hi in batch_bounds(n, bs)})
        self.acts = {r: [xp.asarray(rng.standard_normal((r, s), dtype=np.float32)) for s in sizes] for r in rows_used}
        self.deltas = {r: [xp.asarray(rng.standard_normal((r, s), dtype=np.float32)) for s in sizes] for r in rows_used}
        self.steps = []  # per step, precomputed (a, b, out) triples: the timed loop is just the matmuls
        for lo, hi in batch_bounds(n, bs):
            r = hi - lo
            h, d = self.acts[r], self.deltas[r]
            calls = []
            for i in range(len(sizes) - 1):
                W, G = self.weights[i], self.grads[i]
                calls.append((h[i], W, h[i + 1]))                 # forward
                if train:
                    calls.append((h[i].T, d[i + 1], G))           # dW
                    if i > 0:
                        calls.append((d[i + 1], W.T, d[i]))       # dx
            self.steps.append(calls)
        assert len(self.calls) == len(self.plan)

    @property
    def calls(self) -> list:
        """Every (a, b, out) triple of the epoch, in order."""
        return [c for calls in self.steps for c in calls]

    def run(self, sync, stamps=None) -> float:
        """Seconds for the epoch's matmuls; ``stamps`` (a list, CPU only) gets the clock after each step."""
        matmul, clock = self.xp.matmul, time.perf_counter
        sync()
        start = clock()
        if stamps is not None:
            stamps.append(start)
        for calls in self.steps:
            for a, b, out in calls:
                matmul(a, b, out=out)
            if stamps is not None:
                stamps.append(clock())
        sync()
        return clock() - start


def step_median(stamps) -> float | None:
    """The median step time from per-step clock stamps (None without them). A burst of noise from other
    tenants of the machine slows a few steps, which the median ignores; an epoch's total keeps it."""
    return float(np.median(np.diff(stamps))) if stamps and len(stamps) > 2 else None


# ---------------------------------------------------------------------------------------- the sides
class GpunetSide:
    """gpunet trained through its own ``fit``, one epoch per call, with seed = round number."""

    def __init__(self, sizes, bs, data, device, args):
        self.device, self.bs = device, bs
        self.net = gpunet.mlp(list(sizes), activation="relu", seed=args.seed, device=device)
        self.initial_state = self.net.state_dict()
        self.loss = gpunet.SoftmaxCrossEntropy()
        self.opt = gpunet.Momentum(self.net.parameters(), lr=args.lr, momentum=args.momentum)
        self.x, self.y, self.xt, self.yt = data

    def epoch(self, seed, sync) -> dict:
        # on the CPU, the clock after each step through fit's on_batch hook (a GPU step is only queued then)
        stamps, on_batch = None, None
        if self.device == "cpu":
            stamps = []

            def on_batch(epoch, done, total, clock=time.perf_counter, stamp=stamps.append):
                stamp(clock())
        sync()
        start = time.perf_counter()
        hist = fit(self.net, self.loss, self.opt, self.x, self.y, epochs=1, batch_size=self.bs,
                   shuffle=True, seed=seed, on_batch=on_batch)
        sync()
        wall = time.perf_counter() - start
        rec = hist.epochs[0]
        # "seconds" is fit's own epoch clock (from the permutation to the last step, synchronised);
        # wall adds fit's per-call set-up (label-range check, buffers), reported for transparency.
        return {"seconds": rec["seconds"], "wall": wall, "train_loss": rec["loss"], "train_acc": rec["accuracy"],
                "step_median": step_median(stamps)}

    def test_accuracy(self) -> float:
        return float(evaluate(self.net, self.loss, self.xt, self.yt)["accuracy"])

    def weights(self):
        return self.net.state_dict()


class TorchSide:
    """PyTorch eager float32: nn.Sequential(Linear, ReLU, ...), SGD with momentum, cross-entropy.

    It does the same per-step work as ``gpunet.training.fit``: gather the batch on the same permutation
    (``index_select``), forward, mean cross-entropy, backward, update, and accumulate the epoch's loss sum
    and correct count on the device (read once per epoch).
    """

    def __init__(self, sizes, bs, data, device, initial_state, args):
        self.bs = bs
        self.device = device
        self.tdev = torch.device("cuda" if device == "gpu" else "cpu")
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers).to(self.tdev)
        with torch.no_grad():
            linears = [m for m in self.model if isinstance(m, torch.nn.Linear)]
            for j, lin in enumerate(linears):
                k = 2 * j  # gpunet names parameters by layer index: Linear layers sit at 0, 2, 4, ...
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(initial_state[f"{k}.W"].T)))
                lin.bias.copy_(torch.from_numpy(initial_state[f"{k}.b"]))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum)
        x, y, xt, yt = data
        # Tensors made once; on the CPU from_numpy shares gpunet's arrays (no copy at all).
        # Pixels: torch holds the same uint8 bytes and scales each batch (_features), as gpunet's fit does
        self.pixels = isinstance(x, gpunet.Pixels)
        self.X, self.Y = self._tensor(x.raw if self.pixels else x), self._tensor(y)
        self.Xt, self.Yt = self._tensor(xt.raw if self.pixels else xt), self._tensor(yt)
        self.n = len(self.X)

    def _tensor(self, a):
        if self.device == "gpu":
            return torch.from_dlpack(a) if not isinstance(a, np.ndarray) else torch.from_numpy(a).to(self.tdev)
        return torch.from_numpy(np.ascontiguousarray(backend.to_numpy(a)))

    def _features(self, xb):
        """A batch of features as float32: uint8 pixels divided by 255 (float32 true division)."""
        return torch.div(xb, 255) if self.pixels else xb

    def _order(self, seed):
        if self.device == "cpu":
            return torch.from_numpy(gpunet_order("cpu", seed, self.n))
        xp = backend.get_array_module(gpunet.to_device(np.zeros(1), "gpu"))
        return torch.from_dlpack(gpunet_order("gpu", seed, self.n, xp))

    def epoch(self, seed, sync) -> dict:
        model, opt, X, Y, bs, n = self.model, self.opt, self.X, self.Y, self.bs, self.n
        model.train()
        sync()
        start = time.perf_counter()
        order = self._order(seed)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.tdev)
        correct = torch.zeros((), dtype=torch.int64, device=self.tdev)
        stamps, clock = ([] if self.device == "cpu" else None), time.perf_counter
        for lo in range(0, n, bs):
            idx = order[lo:lo + bs]
            xb, yb = self._features(X.index_select(0, idx)), Y.index_select(0, idx)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                loss_sum += loss.detach() * len(idx)
                correct += (out.argmax(dim=1) == yb).sum()
            if stamps is not None:
                stamps.append(clock())
        sync()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "wall": seconds, "train_loss": float(loss_sum) / n,
                "train_acc": float(correct) / n, "step_median": step_median(stamps)}

    @torch.no_grad() if torch is not None else (lambda f: f)
    def predict(self, X, batch_size=4096):
        self.model.eval()
        outs = [self.model(self._features(X[lo:lo + batch_size])).argmax(dim=1) for lo in range(0, len(X), batch_size)]
        self.model.train()
        return torch.cat(outs)

    def test_accuracy(self) -> float:
        return float((self.predict(self.Xt) == self.Yt).double().mean())

    def weights(self):
        """Weights in gpunet's naming and layout (W as (in, out))."""
        linears = [m for m in self.model if isinstance(m, torch.nn.Linear)]
        out = {}
        for j, lin in enumerate(linears):
            out[f"{2 * j}.W"] = lin.weight.detach().cpu().numpy().T
            out[f"{2 * j}.b"] = lin.bias.detach().cpu().numpy()
        return out


def max_weight_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# ------------------------------------------------------------------------------------------ configs
def run_train_config(name, sizes, bs, data, device, args, xp):
    """Interleave floor, gpunet and torch for ``args.epochs`` rounds; return the config's results."""
    sync = Sync(device)
    n = len(data[0])
    g = GpunetSide(sizes, bs, data, device, args)
    t = TorchSide(sizes, bs, data, device, g.initial_state, args) if torch is not None and not args.no_torch else None
    floor = Floor(sizes, n, bs, xp, train=True)
    rounds = []
    check = {}
    for r in range(args.epochs):
        seed = r  # a fresh seed per epoch: both sides see permutation(seed) for this round
        row, stamps = {}, ([] if device == "cpu" else None)
        settle(args.pause)
        row["floor"] = floor.run(sync, stamps)
        row["floor_step_median"] = step_median(stamps)
        settle(args.pause)
        row["gpunet"] = g.epoch(seed, sync)
        if t is not None:
            settle(args.pause)
            row["torch"] = t.epoch(seed, sync)
        rounds.append(row)
        if r == 0:  # same work on both sides? compare right after the first epoch (outside the clocks)
            check["gpunet_test_acc_epoch1"] = g.test_accuracy()
            if t is not None:
                check["torch_test_acc_epoch1"] = t.test_accuracy()
                check["acc_diff_epoch1"] = abs(check["gpunet_test_acc_epoch1"] - check["torch_test_acc_epoch1"])
                check["max_abs_weight_diff_epoch1"] = max_weight_diff(g.weights(), t.weights())
                check["same_work_ok"] = check["acc_diff_epoch1"] <= 0.005
        line = f"  round {r + 1}/{args.epochs}: floor {row['floor']:.3f}s  gpunet {row['gpunet']['seconds']:.3f}s"
        if t is not None:
            line += f"  torch {row['torch']['seconds']:.3f}s"
        print(line, flush=True)

    res = {"name": name, "kind": "train", "sizes": list(sizes), "batch_size": bs, "device": device,
           "rounds": rounds, "steps_per_epoch": len(batch_bounds(n, bs)), "gemm_flops_per_epoch": floor.flops,
           "gemm_calls_per_epoch": len(floor.calls), **check}
    res["floor_s"] = median_after_warmup([r["floor"] for r in rounds])
    res["gpunet_s"] = median_after_warmup([r["gpunet"]["seconds"] for r in rounds])
    res["gpunet_warmup_s"] = rounds[0]["gpunet"]["seconds"]
    res["gpunet_test_acc"] = g.test_accuracy()
    res["gpunet_train_loss_last"] = rounds[-1]["gpunet"]["train_loss"]
    if t is not None:
        res["torch_s"] = median_after_warmup([r["torch"]["seconds"] for r in rounds])
        res["torch_warmup_s"] = rounds[0]["torch"]["seconds"]
        res["torch_test_acc"] = t.test_accuracy()
        res["torch_train_loss_last"] = rounds[-1]["torch"]["train_loss"]
        res["ratio_gpunet_torch"] = res["gpunet_s"] / res["torch_s"]
        res["floor_over_torch"] = res["floor_s"] / res["torch_s"]
        res["torch_over_floor"] = res["torch_s"] / res["floor_s"]
    res["floor_over_gpunet"] = res["floor_s"] / res["gpunet_s"]
    res["gpunet_over_floor"] = res["gpunet_s"] / res["floor_s"]
    res["us_per_step"] = {"floor": 1e6 * res["floor_s"] / res["steps_per_epoch"],
                          "gpunet": 1e6 * res["gpunet_s"] / res["steps_per_epoch"]}
    if t is not None:
        res["us_per_step"]["torch"] = 1e6 * res["torch_s"] / res["steps_per_epoch"]
    # the same ratios round by round (each round's sides ran seconds apart): their spread shows the noise
    timed = rounds[1:] or rounds
    res["gpunet_over_floor_by_round"] = [r["gpunet"]["seconds"] / r["floor"] for r in timed]
    if t is not None:
        res["gpunet_over_torch_by_round"] = [r["gpunet"]["seconds"] / r["torch"]["seconds"] for r in timed]
    if device == "cpu":  # the same ratios from per-step medians: what they are without the noise's bursts
        res["step_median_over_floor"] = {
            side: median_after_warmup([r[side]["step_median"] / r["floor_step_median"] for r in rounds])
            for side in ("gpunet", "torch") if side in rounds[0]}
        if t is not None:
            res["step_median_gpunet_over_torch"] = median_after_warmup(
                [r["gpunet"]["step_median"] / r["torch"]["step_median"] for r in rounds])
    res["gpunet_gemm_gflops"] = floor.flops / res["gpunet_s"] / 1e9
    res["floor_gflops"] = floor.flops / res["floor_s"] / 1e9
    res["process_peak_rss_mib"] = peak_rss_kib() / 1024  # cumulative for this process (see README)
    if device == "gpu":
        res.update(_gpu_memory(g, t))
    return res


def run_inference(name, sizes, bs, data, device, args, xp):
    """Predict the 10,000 test images: gpunet ``predict`` vs torch ``no_grad`` forward, alternating."""
    sync = Sync(device)
    x, y, xt, yt = data
    g = GpunetSide(sizes, bs, data, device, args)
    t = TorchSide(sizes, bs, data, device, g.initial_state, args) if torch is not None and not args.no_torch else None
    floor = Floor(sizes, len(xt), bs, xp, train=False)
    runs = []
    for r in range(args.inference_runs + 1):  # +1: the first run is warm-up
        row = {}
        settle(args.pause)
        row["floor"] = floor.run(sync)
        settle(args.pause)
        sync()
        start = time.perf_counter()
        pg = predict(g.net, xt, batch_size=bs)
        sync()
        row["gpunet"] = time.perf_counter() - start
        if t is not None:
            settle(args.pause)
            sync()
            start = time.perf_counter()
            pt = t.predict(t.Xt, batch_size=bs)
            sync()
            row["torch"] = time.perf_counter() - start
        runs.append(row)
    res = {"name": name, "kind": "infer", "sizes": list(sizes), "batch_size": bs, "device": device,
           "images": len(xt), "rounds": runs, "gemm_flops": floor.flops}
    res["floor_s"] = median_after_warmup([r["floor"] for r in runs])
    res["gpunet_s"] = median_after_warmup([r["gpunet"] for r in runs])
    res["floor_over_gpunet"] = res["floor_s"] / res["gpunet_s"]
    res["gpunet_over_floor"] = res["gpunet_s"] / res["floor_s"]
    pg = backend.to_numpy(pg)
    res["gpunet_test_acc"] = float(np.mean(pg == backend.to_numpy(yt)))  # untrained net: a consistency check
    if t is not None:
        res["torch_s"] = median_after_warmup([r["torch"] for r in runs])
        res["ratio_gpunet_torch"] = res["gpunet_s"] / res["torch_s"]
        res["floor_over_torch"] = res["floor_s"] / res["torch_s"]
        res["torch_over_floor"] = res["torch_s"] / res["floor_s"]
        pt = pt.cpu().numpy()
        res["torch_test_acc"] = float(np.mean(pt == backend.to_numpy(yt)))
        res["prediction_agreement"] = float(np.mean(pg == pt))
    print(f"  gpunet {res['gpunet_s'] * 1e3:.1f} ms" + (f"  torch {res['torch_s'] * 1e3:.1f} ms" if t else "")
          + f"  floor {res['floor_s'] * 1e3:.1f} ms", flush=True)
    return res


def _gpu_memory(g, t) -> dict:
    """GPU memory held after training: CuPy's pool (gpunet) and torch's peak allocation."""
    out = {}
    try:
        import cupy
        out["gpunet_gpu_pool_mib"] = cupy.get_default_memory_pool().total_bytes() / 2**20
    except Exception:
        pass
    if t is not None:
        out["torch_gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def gpu_matmul_rate(n=8192, repeats=5) -> dict:
    """The GPU's own float32 matmul rate: median of ``repeats`` (n x n) @ (n x n) CuPy products, TF32 off."""
    import cupy
    a = cupy.random.default_rng(0).standard_normal((n, n), dtype=cupy.float32)
    b = cupy.random.default_rng(1).standard_normal((n, n), dtype=cupy.float32)
    c = cupy.empty((n, n), dtype=cupy.float32)
    cupy.matmul(a, b, out=c)  # warm-up (cuBLAS handle, heuristics)
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cupy.matmul(a, b, out=c)
        cupy.cuda.get_current_stream().synchronize()
        times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    return {"n": n, "seconds": sec, "tflops": 2 * n ** 3 / sec / 1e12, "cupy_tf32": os.environ.get("CUPY_TF32")}


# ------------------------------------------------------------------------------------------- memory
def memory_child(side: str, data_dir, pixels: str) -> dict:
    """Runs in its own process: load MNIST and train one epoch (784-512-512-10, batch 128); RSS figures.

    The baseline is the RSS right after the imports (``numpy``, ``gpunet`` and, for torch, ``torch``) and,
    for gpunet with numba, the load of its compiled kernels,
    so the growth counts only the data set, the model, the optimizer state and the training temporaries.
    """
    if side == "torch" and torch is None:
        return {"side": side, "error": "torch is not installed"}
    before_jit = rss_kib()
    if side == "gpunet":
        # numba, when installed, is one of gpunet's libraries as torch is torch's: its import and the one-time
        # load of the compiled float32 kernels (a fixed ~70 MB of LLVM, whatever the data) go in the baseline;
        # "baseline_before_jit_kib" keeps the figure without them
        z, labels = np.zeros((2, 2), np.float32), np.zeros(2, np.int64)
        fast_ops.bias_relu(z, z[0])
        fast_ops.relu_backward(z, z.copy())
        fast_ops.softmax_xent(z, labels, np.empty_like(z), np.empty(2, np.float32))
        fast_ops.gather_scaled(np.zeros((2, 2), np.uint8), labels, np.empty_like(z), 255)
    base = rss_kib()
    base_peak = peak_rss_kib()
    x, y, xt, yt = load_data(argparse.Namespace(data_dir=data_dir, pixels=pixels), "cpu")
    after_load = rss_kib()
    args = argparse.Namespace(seed=0, lr=0.01, momentum=0.9)
    g = GpunetSide(MEMORY_SIZES, MEMORY_BATCH, (x, y, xt, yt), "cpu", args)
    params = sum(v.nbytes for v in g.initial_state.values())
    if side == "gpunet":
        g.epoch(0, Sync("cpu"))
    else:
        t = TorchSide(MEMORY_SIZES, MEMORY_BATCH, (x, y, xt, yt), "cpu", g.initial_state, args)
        del g  # only torch's model stays (the gpunet net was a few MB of initial weights)
        gc.collect()
        t.epoch(0, Sync("cpu"))
    peak = peak_rss_kib()
    ru_maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # for the record: see peak_rss_kib
    train_bytes = len(x) * x.shape[1] * 4  # the float32 training set, however the images are held
    reference = train_bytes + params
    growth = peak - base
    return {"side": side, "baseline_before_jit_kib": before_jit, "baseline_kib": base, "baseline_peak_kib": base_peak,
            "after_load_kib": after_load, "peak_kib": peak, "ru_maxrss_kib": ru_maxrss, "growth_kib": growth,
            "train_set_bytes": train_bytes, "pixels": pixels, "model_bytes": int(params),
            "reference_bytes": int(reference),
            "ratio_growth_over_reference": growth * 1024 / reference}


def run_memory(args) -> dict:
    """Start one child per side; each prints its JSON as the last line of stdout."""
    out = {}
    sides = ["gpunet"] + (["torch"] if torch is not None and not args.no_torch else [])
    for side in sides:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", side, "--pixels", args.pixels]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            out[side] = {"side": side, "error": proc.stderr.strip()[-2000:]}
        else:
            out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        m = out[side]
        if "error" not in m:
            print(f"  {side}: peak {m['peak_kib'] / 1024:.0f} MiB, baseline {m['baseline_kib'] / 1024:.0f} MiB, "
                  f"growth {m['growth_kib'] / 1024:.0f} MiB = {m['ratio_growth_over_reference']:.2f} x "
                  f"(train set + model)", flush=True)
        else:
            print(f"  {side}: failed: {m['error'].splitlines()[-1] if m['error'] else '?'}", flush=True)
    return out


# --------------------------------------------------------------------------------------------- main
def load_data(args, device):
    """MNIST through gpunet's own data setting (``--data-dir``, else ``$GPUNET_DATA``), on ``device``:
    (x, y, x_test, y_test), the images as ``gpunet.Pixels`` with ``--pixels uint8``."""
    try:
        (x, y), (xt, yt) = load_mnist(args.data_dir, download=False,
                                      dtype=np.uint8 if args.pixels == "uint8" else np.float32)
    except Exception as exc:
        sys.exit(f"bench_mlp: cannot load MNIST: {exc}")
    if device == "gpu":
        # moved once: fit's own to_device is then a no-op, so no epoch pays a host-to-device copy
        x, y, xt, yt = (gpunet.to_device(a, "gpu") for a in (x, y, xt, yt))
    if args.pixels == "uint8":
        x, xt = gpunet.Pixels(x), gpunet.Pixels(xt)
    return x, y, xt, yt


def main(args) -> int:
    device = args.device
    if device == "gpu":
        if not backend.gpu_available():
            sys.exit(f"bench_mlp: --device gpu, but no GPU is usable: {backend.gpu_unavailable_reason()}")
        if torch is not None and not args.no_torch and not torch.cuda.is_available():
            print("bench_mlp: torch has no CUDA here: gpunet is timed alone", file=sys.stderr)
            args.no_torch = True
    threads = args.threads or _cores()
    if torch is not None:
        torch.set_num_threads(threads)
        if device == "gpu":
            torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, like gpunet's
            torch.backends.cudnn.allow_tf32 = False
    xp = backend.get_array_module(backend.to_device(np.zeros(1), device))
    data = load_data(args, device)
    results = {"machine": machine_info(device), "device": device,
               "settings": {"epochs": args.epochs, "warmup_rounds": 1 if args.epochs > 1 else 0,
                            "inference_runs": args.inference_runs, "lr": args.lr, "momentum": args.momentum,
                            "seed": args.seed, "threads": threads, "pixels": args.pixels, "pause_s": args.pause,
                            "quick": args.quick,
                            "torch": torch is not None and not args.no_torch},
               "configs": [], "memory": None, "gpu_peak": None}
    print(f"bench_mlp: device {device}, {threads} threads, {args.epochs} rounds per config "
          f"(round 1 = warm-up), torch {'on' if results['settings']['torch'] else 'off'}", flush=True)
    for name in args.config_names:
        kind, sizes, bs, _ = CONFIGS[name]
        print(f"[{name}]", flush=True)
        fn = run_train_config if kind == "train" else run_inference
        results["configs"].append(fn(name, sizes, bs, data, device, args, xp))
    if device == "gpu" and "784-512-512-10/b4096" in args.config_names:
        print("[gpu matmul rate]", flush=True)
        rate = gpu_matmul_rate()
        big = next(c for c in results["configs"] if c["name"] == "784-512-512-10/b4096")
        achieved = big["gemm_flops_per_epoch"] / big["gpunet_s"] / 1e12
        rate.update({"gpunet_b4096_tflops": achieved, "fraction": achieved / rate["tflops"]})
        results["gpu_peak"] = rate
        print(f"  sgemm {rate['n']}^3: {rate['tflops']:.1f} TFLOP/s; gpunet b4096 {achieved:.2f} TFLOP/s "
              f"= {100 * rate['fraction']:.0f}%", flush=True)
    if not args.no_memory:
        print("[peak memory, CPU training in subprocesses]", flush=True)
        results["memory"] = run_memory(args)

    from bench_report import evaluate_targets, render_markdown, render_text
    results["targets"] = evaluate_targets(results)
    print()
    print(render_text(results))
    json_path = Path(args.json) if args.json else HERE / "results" / f"latest-{device}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"\nresults: {json_path}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render_markdown(results))
        print(f"markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    if ARGS.memory_child:
        if ARGS.threads and torch is not None:
            torch.set_num_threads(ARGS.threads)
        elif torch is not None:
            torch.set_num_threads(_cores())
        print(json.dumps(memory_child(ARGS.memory_child, ARGS.data_dir, ARGS.pixels)))
        sys.exit(0)
    sys.exit(main(ARGS))
