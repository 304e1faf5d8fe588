"""Speed: gpunet against the matmul floor, and against PyTorch (eager) when it is installed, at training
MLPs on MNIST and at inference.

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

The results file holds raw measurements only (seconds per round and side, per-step clock medians, the
same-work check's accuracies and weight difference); ``benchmarks/report.py`` computes every median and
ratio from them. Peak memory is ``benchmarks/memory.py``'s job.

Run ``python benchmarks/speed.py --help``; see ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # report.py lives next to this file

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
    p.add_argument("--optimizer", choices=("momentum", "adam"), default="momentum",
                   help="both sides' rule: SGD with --momentum, or Adam (PyTorch's defaults but --lr); "
                        "benchmarks/optim_speed.py times both rules in one run")
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
    p.add_argument("--handicap", type=float, default=0.0,
                   help="also time gpunet with every step made (1 + H) times as long (CPU training; e.g. 0.05): "
                        "report.py then shows whether the run resolves a change of that size")
    p.add_argument("--dense", action="store_true",
                   help="CPU: also time gpunet with its zero-column skipping off (GPUNET_SKIP_ZEROS=0 around "
                        "that side's epochs), the same network from the same start, in the same rounds")
    p.add_argument("--no-torch", action="store_true", help="time gpunet alone even when torch is installed")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: 2 rounds, configs {', '.join(QUICK_CONFIGS)}, 3 inference runs")
    p.add_argument("--json", default=None, help="where to write the results (default "
                                                "benchmarks/results/latest-<device>.json)")
    p.add_argument("--markdown", default=None, help="also write report.py's Markdown rendering here")
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
# memory.py's gpunet child must not import torch (its baseline is "numpy + gpunet"); --no-torch skips it too.
if os.environ.get("GPUNET_BENCH_NO_TORCH") != "1" and (ARGS is None or not ARGS.no_torch):
    try:
        import torch  # noqa: E402
        import torch.nn.functional as F  # noqa: E402
    except ImportError:  # the benchmark still reports gpunet alone
        torch = F = None


# ------------------------------------------------------------------------------------------- helpers
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
        if getattr(args, "optimizer", "momentum") == "adam":
            self.opt = gpunet.Adam(self.net.parameters(), lr=args.lr)
        else:
            self.opt = gpunet.Momentum(self.net.parameters(), lr=args.lr, momentum=args.momentum)
        self.x, self.y, self.xt, self.yt = data

    def epoch(self, seed, sync, handicap=0.0) -> dict:
        # on the CPU, the clock after each step through fit's on_batch hook (a GPU step is only queued then);
        # a handicap h makes every step (1 + h) times as long: a busy wait of h times its own length, so
        # that the benchmark's sensitivity shows as a known slowdown among the measured ones
        stamps, on_batch = None, None
        if self.device == "cpu":
            stamps = []

            def on_batch(epoch, done, total, clock=time.perf_counter, stamp=stamps.append):
                now = clock()
                if handicap and stamps:
                    until = now + handicap * (now - stamps[-1])
                    while clock() < until:
                        pass
                    now = clock()
                stamp(now)
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
        if getattr(args, "optimizer", "momentum") == "adam":
            self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        else:
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
def same_work(g, t) -> dict:
    """After the first epoch, outside the clocks: both sides' test accuracies and their largest weight
    difference (float32 rounding drifts by ~1e-3 in an epoch; a different update rule by ~0.1)."""
    check = {"gpunet_test_acc_epoch1": g.test_accuracy()}
    if t is not None:
        check["torch_test_acc_epoch1"] = t.test_accuracy()
        check["max_abs_weight_diff_epoch1"] = max_weight_diff(g.weights(), t.weights())
    return check


def run_train_config(name, sizes, bs, data, device, args, xp):
    """Interleave floor, gpunet and torch for ``args.epochs`` rounds; the raw seconds of every round."""
    sync = Sync(device)
    n = len(data[0])
    g = GpunetSide(sizes, bs, data, device, args)
    t = TorchSide(sizes, bs, data, device, g.initial_state, args) if torch is not None and not args.no_torch else None
    floor = Floor(sizes, n, bs, xp, train=True)
    h = GpunetSide(sizes, bs, data, device, args) if getattr(args, "handicap", 0.0) else None
    dense = GpunetSide(sizes, bs, data, device, args) if getattr(args, "dense", False) else None
    rounds, check = [], {}
    for r in range(args.epochs):
        seed = r  # a fresh seed per epoch: both sides see permutation(seed) for this round
        row, stamps = {}, ([] if device == "cpu" else None)
        settle(args.pause)
        row["floor"] = floor.run(sync, stamps)
        row["floor_step_median"] = step_median(stamps)
        settle(args.pause)
        row["gpunet"] = g.epoch(seed, sync)
        if h is not None:  # the same training, each step made (1 + handicap) times as long
            settle(args.pause)
            row["handicapped"] = h.epoch(seed, sync, args.handicap)
        if dense is not None:  # every product dense: what skipping the zero columns buys
            settle(args.pause)
            os.environ["GPUNET_SKIP_ZEROS"] = "0"
            try:
                row["dense"] = dense.epoch(seed, sync)
            finally:
                del os.environ["GPUNET_SKIP_ZEROS"]
        if t is not None:
            settle(args.pause)
            row["torch"] = t.epoch(seed, sync)
        rounds.append(row)
        if r == 0:
            check = same_work(g, t)
        print(f"  round {r + 1}/{args.epochs}: floor {row['floor']:.3f}s  gpunet {row['gpunet']['seconds']:.3f}s"
              + (f"  torch {row['torch']['seconds']:.3f}s" if t is not None else ""), flush=True)
    res = {"name": name, "kind": "train", "sizes": list(sizes), "batch_size": bs, "device": device,
           "rounds": rounds, "steps_per_epoch": len(batch_bounds(n, bs)), "gemm_calls_per_epoch": len(floor.calls),
           "gemm_flops_per_epoch": floor.flops,
           **check, "gpunet_test_acc": g.test_accuracy()}
    if t is not None:
        res["torch_test_acc"] = t.test_accuracy()
    if device == "gpu":
        res.update(_gpu_memory(t))
    return res


def run_inference(name, sizes, bs, data, device, args, xp):
    """Predict the 10,000 test images: gpunet ``predict`` vs torch ``no_grad`` forward, alternating."""
    sync = Sync(device)
    x, y, xt, yt = data
    g = GpunetSide(sizes, bs, data, device, args)
    t = TorchSide(sizes, bs, data, device, g.initial_state, args) if torch is not None and not args.no_torch else None
    floor = Floor(sizes, len(xt), bs, xp, train=False)

    def timed(call):
        settle(args.pause)
        sync()
        start = time.perf_counter()
        out = call()
        sync()
        return time.perf_counter() - start, out

    runs = []
    for _ in range(args.inference_runs + 1):  # +1: the first run is warm-up
        row = {"floor": floor.run(sync)}
        row["gpunet"], pg = timed(lambda: predict(g.net, xt, batch_size=bs))
        if t is not None:
            row["torch"], pt = timed(lambda: t.predict(t.Xt, batch_size=bs))
        runs.append(row)
    res = {"name": name, "kind": "infer", "sizes": list(sizes), "batch_size": bs, "device": device,
           "images": len(xt), "rounds": runs, "gemm_flops": floor.flops}
    pg, labels = backend.to_numpy(pg), backend.to_numpy(yt)
    res["gpunet_test_acc"] = float(np.mean(pg == labels))  # untrained net: a consistency check only
    if t is not None:
        pt = pt.cpu().numpy()
        res["torch_test_acc"] = float(np.mean(pt == labels))
        res["prediction_agreement"] = float(np.mean(pg == pt))
    print(f"  last run: gpunet {row['gpunet'] * 1e3:.1f} ms" + (f"  torch {row['torch'] * 1e3:.1f} ms" if t else "")
          + f"  floor {row['floor'] * 1e3:.1f} ms", flush=True)
    return res


def _gpu_memory(t) -> dict:
    """GPU memory held after training: CuPy's pool (gpunet) and torch's peak allocation, MiB."""
    out = {}
    try:
        import cupy
        out["gpunet_gpu_pool_mib"] = cupy.get_default_memory_pool().total_bytes() / 2**20
    except Exception:
        pass
    if t is not None:
        out["torch_gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def gpu_matmul_seconds(n=8192, repeats=5) -> dict:
    """The GPU's own float32 matmul: seconds of ``repeats`` (n x n) @ (n x n) CuPy products, TF32 off."""
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
    return {"n": n, "seconds": times, "cupy_tf32": os.environ.get("CUPY_TF32")}


# --------------------------------------------------------------------------------------------- main
def load_data(data_dir, pixels, device):
    """MNIST through gpunet's own data setting (``data_dir``, else ``$GPUNET_DATA``), on ``device``:
    (x, y, x_test, y_test), the images as ``gpunet.Pixels`` when ``pixels`` is "uint8"."""
    try:
        (x, y), (xt, yt) = load_mnist(data_dir, download=False, dtype=np.uint8 if pixels == "uint8" else np.float32)
    except Exception as exc:
        sys.exit(f"speed.py: cannot load MNIST: {exc}")
    if device == "gpu":
        # moved once: fit's own to_device is then a no-op, so no epoch pays a host-to-device copy
        x, y, xt, yt = (gpunet.to_device(a, "gpu") for a in (x, y, xt, yt))
    if pixels == "uint8":
        x, xt = gpunet.Pixels(x), gpunet.Pixels(xt)
    return x, y, xt, yt


def prepare(args) -> tuple:
    """Check the device, set the threads and TF32 off; (threads, xp)."""
    device = args.device
    if device == "gpu":
        if not backend.gpu_available():
            sys.exit(f"speed.py: --device gpu, but no GPU is usable: {backend.gpu_unavailable_reason()}")
        if torch is not None and not args.no_torch and not torch.cuda.is_available():
            print("speed.py: torch has no CUDA here: gpunet is timed alone", file=sys.stderr)
            args.no_torch = True
    threads = args.threads or _cores()
    if torch is not None:
        torch.set_num_threads(threads)
        if device == "gpu":
            torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, like gpunet's
            torch.backends.cudnn.allow_tf32 = False
    return threads, backend.get_array_module(backend.to_device(np.zeros(1), device))


def main(args) -> int:
    device = args.device
    threads, xp = prepare(args)
    data = load_data(args.data_dir, args.pixels, device)
    timed_torch = torch is not None and not args.no_torch
    results = {"machine": machine_info(device), "device": device,
               "settings": {"epochs": args.epochs, "inference_runs": args.inference_runs, "lr": args.lr,
                            "momentum": args.momentum, "optimizer": args.optimizer, "seed": args.seed, "threads": threads, "pixels": args.pixels,
                            "pause_s": args.pause, "quick": args.quick, "torch": timed_torch},
               "configs": [], "gpu_matmul": None}
    print(f"speed.py: device {device}, {threads} threads, {args.epochs} rounds per config "
          f"(round 1 = warm-up), torch {'on' if timed_torch else 'off'}", flush=True)
    for name in args.config_names:
        kind, sizes, bs, _ = CONFIGS[name]
        print(f"[{name}]", flush=True)
        fn = run_train_config if kind == "train" else run_inference
        results["configs"].append(fn(name, sizes, bs, data, device, args, xp))
    if device == "gpu" and "784-512-512-10/b4096" in args.config_names:
        print("[gpu matmul rate]", flush=True)
        results["gpu_matmul"] = gpu_matmul_seconds()
    json_path = Path(args.json) if args.json else HERE / "results" / f"latest-{device}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, default=float) + "\n")
    from report import render_markdown, render_text

    print("\n" + render_text(results) + f"\n\nresults: {json_path}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(render_markdown(results))
        print(f"markdown: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
