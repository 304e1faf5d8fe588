"""Rendering of ``bench_mlp`` results: the issue's targets with pass/miss, a text table and Markdown.

Everything here reads the results dict (the same one written as JSON), so a saved JSON file can be
re-rendered: ``python benchmarks/bench_report.py results/latest-cpu.json [--markdown]``.
"""
from __future__ import annotations

import json
import sys

# (device, config, measured key, comparison, threshold, description) -- from the issue
TARGETS = [
    ("cpu", "784-512-512-10/b128", "ratio_gpunet_torch", "<=", 0.85, "gpunet / torch"),
    ("cpu", "784-512-512-10/b128", "gpunet_over_floor", "<=", 1.15, "gpunet / floor"),
    ("cpu", "784-100-10/b128", "ratio_gpunet_torch", "<=", 0.90, "gpunet / torch"),
    ("cpu", "784-512-512-10/b32", "ratio_gpunet_torch", "<=", 0.90, "gpunet / torch"),
    ("gpu", "784-512-512-10/b128", "ratio_gpunet_torch", "<=", 0.50, "gpunet / torch"),
]


def _cmp(value, op, threshold):
    return value <= threshold if op == "<=" else value >= threshold


def evaluate_targets(results) -> list:
    """One row per target that applies to this run; ``measured`` is None when it was not measured."""
    rows = []
    by_name = {c["name"]: c for c in results["configs"]}
    device = results["device"]
    for dev, name, key, op, thr, what in TARGETS:
        if dev != device:
            continue
        value = by_name.get(name, {}).get(key)
        rows.append({"target": f"{dev.upper()} {name}: {what} {op} {thr}", "measured": value,
                     "pass": None if value is None else _cmp(value, op, thr)})
    mem = (results.get("memory") or {}).get("gpunet") or {}
    value = mem.get("ratio_growth_over_reference")
    rows.append({"target": "CPU training peak memory growth / (float32 train set + model) <= 1.5",
                 "measured": value, "pass": None if value is None else value <= 1.5})
    if device == "gpu":
        peak = results.get("gpu_peak") or {}
        value = peak.get("fraction")
        rows.append({"target": "GPU 784-512-512-10/b4096: gpunet GEMM FLOP/s >= 50% of measured sgemm rate",
                     "measured": value, "pass": None if value is None else value >= 0.5})
    for c in results["configs"]:  # the sanity check: both sides must do the same work
        if "acc_diff_epoch1" in c:
            rows.append({"target": f"{device.upper()} {c['name']}: |test acc gpunet - torch| after epoch 1 <= 0.005",
                         "measured": c["acc_diff_epoch1"], "pass": c["acc_diff_epoch1"] <= 0.005})
    return rows


# ------------------------------------------------------------------------------------------- tables
def _f(v, fmt="{:.3f}", none="-"):
    return none if v is None else fmt.format(v)


def _tables(results):
    """(title, header, rows) of every table, as strings."""
    tables = []
    train = [c for c in results["configs"] if c["kind"] == "train"]
    infer = [c for c in results["configs"] if c["kind"] == "infer"]
    if train:
        header = ["config", "gpunet s/ep", "torch s/ep", "gpunet/torch", "floor s/ep", "floor/gpunet",
                  "floor/torch", "gpunet/floor", "torch/floor", "warm-up gpunet / torch s"]
        rows = [[c["name"], _f(c["gpunet_s"]), _f(c.get("torch_s")), _f(c.get("ratio_gpunet_torch"), "{:.2f}"),
                 _f(c["floor_s"]), _f(c["floor_over_gpunet"], "{:.2f}"), _f(c.get("floor_over_torch"), "{:.2f}"),
                 _f(c["gpunet_over_floor"], "{:.2f}"), _f(c.get("torch_over_floor"), "{:.2f}"),
                 f"{_f(c['gpunet_warmup_s'])} / {_f(c.get('torch_warmup_s'))}"] for c in train]
        tables.append(("Training: median seconds per epoch (rounds 2..E)", header, rows))
        header = ["config", "steps", "us/step gpunet", "us/step torch", "us/step floor", "test acc gpunet",
                  "test acc torch", "ep1 acc gpunet / torch", "max abs dW ep1", "GEMM GFLOP/s gpunet / floor"]
        rows = []
        for c in train:
            us = c["us_per_step"]
            rows.append([c["name"], str(c["steps_per_epoch"]), _f(us["gpunet"], "{:.0f}"),
                         _f(us.get("torch"), "{:.0f}"), _f(us["floor"], "{:.0f}"),
                         _f(c["gpunet_test_acc"], "{:.4f}"), _f(c.get("torch_test_acc"), "{:.4f}"),
                         f"{_f(c.get('gpunet_test_acc_epoch1'), '{:.4f}')} / {_f(c.get('torch_test_acc_epoch1'), '{:.4f}')}",
                         _f(c.get("max_abs_weight_diff_epoch1"), "{:.2e}"),
                         f"{_f(c['gpunet_gemm_gflops'], '{:.1f}')} / {_f(c['floor_gflops'], '{:.1f}')}"])
        tables.append(("Training: per step, accuracy after the last epoch, same-work check after epoch 1",
                       header, rows))
        header = ["config", "gpunet/floor by round", "gpunet/torch by round"]
        rows = [[c["name"], " ".join(f"{v:.2f}" for v in c.get("gpunet_over_floor_by_round", [])),
                 " ".join(f"{v:.2f}" for v in c.get("gpunet_over_torch_by_round", []))] for c in train]
        tables.append(("Training: the ratios round by round (rounds 2..E), for the spread of the noise",
                       header, rows))
        if any("step_median_over_floor" in c for c in train):
            header = ["config", "gpunet/floor", "torch/floor", "gpunet/torch"]
            rows = [[c["name"], _f(c["step_median_over_floor"].get("gpunet"), "{:.2f}"),
                     _f(c["step_median_over_floor"].get("torch"), "{:.2f}"),
                     _f(c.get("step_median_gpunet_over_torch"), "{:.2f}")]
                    for c in train if "step_median_over_floor" in c]
            tables.append(("Training: the same ratios from each epoch's median step time (median over rounds "
                           "2..E); a burst of noise slows a few steps, which a median step ignores",
                           header, rows))
    if infer:
        header = ["config", "images", "gpunet ms", "torch ms", "gpunet/torch", "floor ms", "floor/gpunet",
                  "floor/torch", "predictions agree"]
        rows = [[f"{c['name']} ({'-'.join(map(str, c['sizes']))}, batch {c['batch_size']})", str(c["images"]),
                 _f(c["gpunet_s"] * 1e3, "{:.1f}"), _f(None if c.get("torch_s") is None else c["torch_s"] * 1e3, "{:.1f}"),
                 _f(c.get("ratio_gpunet_torch"), "{:.2f}"), _f(c["floor_s"] * 1e3, "{:.1f}"),
                 _f(c["floor_over_gpunet"], "{:.2f}"), _f(c.get("floor_over_torch"), "{:.2f}"),
                 _f(c.get("prediction_agreement"), "{:.4f}")] for c in infer]
        tables.append(("Inference over the test set: median of the timed runs", header, rows))
    mem = results.get("memory") or {}
    if mem:
        header = ["side", "peak RSS MiB", "baseline MiB", "after load MiB", "growth MiB", "train set + model MiB",
                  "growth / (train set + model)"]
        rows = []
        for side, m in mem.items():
            if "error" in m:
                rows.append([side, "error", "", "", "", "", m["error"].splitlines()[-1][:60] if m["error"] else ""])
                continue
            rows.append([side, _f(m["peak_kib"] / 1024, "{:.0f}"), _f(m["baseline_kib"] / 1024, "{:.0f}"),
                         _f(m["after_load_kib"] / 1024, "{:.0f}"), _f(m["growth_kib"] / 1024, "{:.0f}"),
                         _f(m["reference_bytes"] / 2**20, "{:.0f}"), _f(m["ratio_growth_over_reference"], "{:.2f}")])
        tables.append(("Peak memory: one CPU epoch of 784-512-512-10, batch 128, in a fresh process", header, rows))
    peak = results.get("gpu_peak")
    if peak:
        header = ["sgemm n", "measured TFLOP/s", "gpunet b4096 TFLOP/s", "fraction"]
        rows = [[str(peak["n"]), _f(peak["tflops"], "{:.1f}"), _f(peak["gpunet_b4096_tflops"], "{:.2f}"),
                 _f(peak["fraction"], "{:.0%}")]]
        tables.append(("GPU float32 matmul rate (CuPy, TF32 off)", header, rows))
    if results.get("targets"):
        header = ["target (from the issue)", "measured", "result"]
        rows = [[t["target"], _f(t["measured"], "{:.3f}"),
                 {True: "pass", False: "MISS", None: "not measured"}[t["pass"]]] for t in results["targets"]]
        tables.append(("Targets", header, rows))
    return tables


def _describe(results) -> str:
    m, s = results["machine"], results["settings"]
    dev = results["device"]
    gpu = f", GPU {m['gpu'].get('gpu_name')}" if dev == "gpu" and m.get("gpu") else ""
    return (f"{m['date']}; {m['cpu_model']} ({m['cores_usable']} cores usable){gpu}; Python {m['python']}, "
            f"NumPy {m['numpy']} ({m.get('blas_numpy')}), torch {m['torch']}, gpunet {m['gpunet']} "
            f"(CPU kernels: {m.get('cpu_kernels', 'NumPy twins')}); "
            f"device {dev}, {s['threads']} threads, {s['epochs']} rounds per config (round 1 warm-up), "
            f"lr {s['lr']}, momentum {s['momentum']}, images held as {s.get('pixels', 'float32')}")


def render_text(results) -> str:
    out = [_describe(results)]
    for title, header, rows in _tables(results):
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        out.append("")
        out.append(title)
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        out.append("  ".join("-" * w for w in widths))
        out.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)
    return "\n".join(out)


def render_markdown(results) -> str:
    out = [f"### gpunet vs PyTorch, {results['device'].upper()}", "", _describe(results) + ".", ""]
    for title, header, rows in _tables(results):
        out.append(f"**{title}**")
        out.append("")
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out.extend("| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in rows)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: bench_report.py RESULTS.json [--markdown]")
    data = json.loads(open(sys.argv[1]).read())
    print(render_markdown(data) if "--markdown" in sys.argv[2:] else render_text(data))
