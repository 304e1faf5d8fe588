"""The report: every median and ratio of ``speed.py`` and ``memory.py`` results, computed here from the
raw seconds and bytes those scripts store, with the issue's targets, as text or Markdown.

    python benchmarks/report.py RESULTS.json [--markdown]            # one run: tables and targets
    python benchmarks/report.py --compare A.json B.json ... [--markdown]   # the main ratios, side by side

A speed file holds, per config, one entry per round: ``floor`` (seconds), ``gpunet`` and ``torch``
(seconds, or for training a dict with ``seconds`` and ``step_median``) and ``floor_step_median``. Round 1
is warm-up: medians are over rounds 2..E (all rounds when there is one). Older files (``bench_mlp.py``'s,
up to 2026-11-28) hold the same raw rounds and are read the same way.
"""
from __future__ import annotations

import json
import statistics
import sys

# (device, config, ratio, threshold, description): lower is better, from the issue
TARGETS = [
    ("cpu", "784-512-512-10/b128", "gpunet/torch", 0.85),
    ("cpu", "784-512-512-10/b128", "gpunet/floor", 1.15),
    ("cpu", "784-100-10/b128", "gpunet/torch", 0.90),
    ("cpu", "784-512-512-10/b32", "gpunet/torch", 0.90),
    ("gpu", "784-512-512-10/b128", "gpunet/torch", 0.50),
]
MEMORY_TARGET = 1.5  # CPU training growth / (float32 train set + model)
SAME_WORK = 0.005    # |test accuracy gpunet - torch| after epoch 1


def median_after_warmup(values):
    """Median of ``values[1:]`` (round 1 is warm-up), or of all when there is only one; None if empty."""
    rest = values[1:] if len(values) > 1 else values
    return statistics.median(rest) if rest else None


def seconds(entry):
    """A side's seconds in one round: a training round stores a dict, an inference run a number."""
    return entry["seconds"] if isinstance(entry, dict) else entry


def side_seconds(config, side):
    """Median seconds of ``side`` ("floor", "gpunet", "torch") over the timed rounds; None if not timed."""
    rounds = config["rounds"]
    return median_after_warmup([seconds(r[side]) for r in rounds]) if side in rounds[0] else None


def interval(values, draws=2000, seed=0):
    """A 95% bootstrap interval (low, high) of the median of ``values`` (None for fewer than 3): a
    change of the code shows when its ratio's interval leaves the other's."""
    if len(values) < 3:
        return None
    import random

    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def _ratio(a, b):
    return None if a is None or b is None else a / b


def ratios(config) -> dict:
    """Every ratio of one config, from its raw rounds: medians' ratios, the same round by round, and the
    ratios of each round's median step times (CPU training)."""
    floor, g, t = (side_seconds(config, s) for s in ("floor", "gpunet", "torch"))
    out = {"floor_s": floor, "gpunet_s": g, "torch_s": t, "gpunet/torch": _ratio(g, t),
           "gpunet/floor": _ratio(g, floor), "torch/floor": _ratio(t, floor)}
    rounds = config["rounds"]
    timed = rounds[1:] or rounds
    out["gpunet/floor by round"] = [seconds(r["gpunet"]) / r["floor"] for r in timed]
    out["gpunet/torch by round"] = [seconds(r["gpunet"]) / seconds(r["torch"]) for r in timed if "torch" in r]
    if isinstance(rounds[0]["gpunet"], dict) and rounds[0].get("floor_step_median"):
        step = {s: median_after_warmup([r[s]["step_median"] / r["floor_step_median"] for r in rounds])
                for s in ("gpunet", "torch") if s in rounds[0]}
        out["step gpunet/floor"], out["step torch/floor"] = step.get("gpunet"), step.get("torch")
        if "torch" in rounds[0]:
            out["step gpunet/torch"] = median_after_warmup([r["gpunet"]["step_median"] / r["torch"]["step_median"]
                                                            for r in rounds])
    out["gpunet/floor 95% interval"] = interval(out["gpunet/floor by round"])
    if "handicapped" in rounds[0]:  # the known slowdown, as the run measures it
        by_round = [seconds(r["handicapped"]) / seconds(r["gpunet"]) for r in timed]
        out["handicapped/gpunet by round"] = by_round
        out["handicapped/gpunet"] = statistics.median(by_round)
        out["handicapped/gpunet 95% interval"] = interval(by_round)
    if "dense" in rounds[0]:  # speed.py --dense: gpunet with every product dense, same rounds
        for name, by_round in (
            ("gpunet/dense", [seconds(r["gpunet"]) / seconds(r["dense"]) for r in timed]),
            ("dense/floor", [seconds(r["dense"]) / r["floor"] for r in timed]),
        ):
            out[f"{name} by round"] = by_round
            out[name] = statistics.median(by_round)
            out[f"{name} 95% interval"] = interval(by_round)
    flops = config.get("gemm_flops_per_epoch") or config.get("gemm_flops")
    if flops and g:
        out["gpunet GFLOP/s"], out["floor GFLOP/s"] = flops / g / 1e9, flops / floor / 1e9
    return out


def memory_ratio(side: dict):
    """Training growth (peak - baseline RSS) over the float32 training set plus the model."""
    if "error" in side:
        return None
    return (side["peak_kib"] - side["baseline_kib"]) * 1024 / (side["train_set_bytes"] + side["model_bytes"])


def gpu_rate(results):
    """(measured sgemm TFLOP/s, gpunet's batch-4096 GEMM TFLOP/s) from the raw seconds, or None."""
    mm = results.get("gpu_matmul")
    big = next((c for c in results["configs"] if c["name"] == "784-512-512-10/b4096"), None)
    if not mm or big is None:
        return None
    peak = 2 * mm["n"] ** 3 / statistics.median(mm["seconds"]) / 1e12
    return peak, big["gemm_flops_per_epoch"] / side_seconds(big, "gpunet") / 1e12


def evaluate_targets(results) -> list:
    """One row per target that applies: {"target", "measured" (None if not measured), "pass"}."""
    rows, device = [], results.get("device")
    by_name = {c["name"]: c for c in results.get("configs", [])}
    for dev, name, key, thr in TARGETS:
        if dev == device:
            value = ratios(by_name[name])[key] if name in by_name else None
            rows.append({"target": f"{dev.upper()} {name}: {key} <= {thr}", "measured": value,
                         "pass": None if value is None else value <= thr})
    for side, m in memory_sides(results).items():
        if side == "gpunet":
            value = memory_ratio(m)
            rows.append({"target": f"CPU training peak memory growth / (float32 train set + model) <= {MEMORY_TARGET}",
                         "measured": value, "pass": None if value is None else value <= MEMORY_TARGET})
    if device == "gpu" and (rate := gpu_rate(results)):
        rows.append({"target": "GPU 784-512-512-10/b4096: gpunet GEMM FLOP/s >= 50% of measured sgemm rate",
                     "measured": rate[1] / rate[0], "pass": rate[1] / rate[0] >= 0.5})
    for c in by_name.values():  # both sides must do the same work
        if "torch_test_acc_epoch1" in c:
            diff = abs(c["gpunet_test_acc_epoch1"] - c["torch_test_acc_epoch1"])
            rows.append({"target": f"{c['name']}: |test acc gpunet - torch| after epoch 1 <= {SAME_WORK}",
                         "measured": diff, "pass": diff <= SAME_WORK})
    return rows


def memory_sides(results) -> dict:
    """side -> raw memory figures, from a memory.py file ("sides") or an older speed file ("memory")."""
    return results.get("sides") or results.get("memory") or {}


# ------------------------------------------------------------------------------------------- tables
def _interval(pair):
    return "-" if pair is None else f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def _train_tables(train):
    rows = []
    for c in train:
        q = ratios(c)
        rows.append([c["name"], _f(q["gpunet_s"]), _f(q["torch_s"]), _f(q["gpunet/torch"], "{:.2f}"), _f(q["floor_s"]),
                     _f(q["gpunet/floor"], "{:.2f}"), _f(q["torch/floor"], "{:.2f}"),
                     f"{_f(c.get('gpunet_test_acc'), '{:.4f}')} / {_f(c.get('torch_test_acc'), '{:.4f}')}",
                     _f(c.get("max_abs_weight_diff_epoch1"), "{:.1e}")])
    header = ["config", "gpunet s/ep", "torch s/ep", "gpunet/torch", "floor s/ep", "gpunet/floor", "torch/floor",
              "test acc gpunet / torch", "max abs dW ep1"]
    tables = [("Training: median seconds per epoch (rounds 2..E) and their ratios", header, rows)]
    rows = [[c["name"], " ".join(f"{v:.2f}" for v in ratios(c)["gpunet/floor by round"]),
             " ".join(f"{v:.2f}" for v in ratios(c)["gpunet/torch by round"]),
             _f(ratios(c).get("step gpunet/floor"), "{:.2f}"), _f(ratios(c).get("step gpunet/torch"), "{:.2f}")]
            for c in train]
    rows = [r + [_interval(ratios(c).get("gpunet/floor 95% interval")),
                 _f(ratios(c).get("handicapped/gpunet"), "{:.3f}")
                 + f" {_interval(ratios(c).get('handicapped/gpunet 95% interval'))}"]
            for r, c in zip(rows, train)]
    header = ["config", "gpunet/floor by round", "gpunet/torch by round", "step medians: gpunet/floor",
              "gpunet/torch", "gpunet/floor: 95% interval", "handicapped/gpunet (--handicap) and interval"]
    tables.append(("Training: the ratios round by round (rounds 2..E), and from each round's median step "
                   "time (a burst of noise slows a few steps, which a median step ignores)", header, rows))
    dense = [c for c in train if "dense/floor" in ratios(c)]
    if dense:
        rows = [[c["name"]] + [_f(ratios(c)[k]) + f" {_interval(ratios(c)[k + ' 95% interval'])}"
                               for k in ("gpunet/floor", "dense/floor", "gpunet/dense")] for c in dense]
        tables.append(("Training: gpunet with its zero-column skipping (gpunet.fast.columns) and with every product "
                       "dense (--dense), in the same rounds; medians and 95% intervals",
                       ["config", "gpunet/floor", "dense/floor", "gpunet/dense"], rows))
    return tables


def _other_tables(results):
    tables = []
    infer = [c for c in results.get("configs", []) if c["kind"] == "infer"]
    if infer:
        rows = [[f"{c['name']} ({'-'.join(map(str, c['sizes']))}, batch {c['batch_size']}, {c['images']} images)",
                 _f(1e3 * ratios(c)["gpunet_s"], "{:.1f}"),
                 _f(None if ratios(c)["torch_s"] is None else 1e3 * ratios(c)["torch_s"], "{:.1f}"),
                 _f(ratios(c)["gpunet/torch"], "{:.2f}"), _f(1e3 * ratios(c)["floor_s"], "{:.1f}"),
                 _f(ratios(c)["gpunet/floor"], "{:.2f}"), _f(c.get("prediction_agreement"), "{:.4f}")] for c in infer]
        header = ["config", "gpunet ms", "torch ms", "gpunet/torch", "floor ms", "gpunet/floor", "predictions agree"]
        tables.append(("Inference: median of the timed runs", header, rows))
    if mem := memory_sides(results):
        rows = [[side, "error", "", "", "", (m["error"].splitlines() or [""])[-1][:60]] if "error" in m else
                [side, f"{m['peak_kib'] / 1024:.0f}", f"{m['baseline_kib'] / 1024:.0f}",
                 f"{(m['peak_kib'] - m['baseline_kib']) / 1024:.0f}",
                 f"{(m['train_set_bytes'] + m['model_bytes']) / 2**20:.0f}", _f(memory_ratio(m), "{:.2f}")]
                for side, m in mem.items()]
        header = ["side", "peak RSS MiB", "baseline MiB", "growth MiB", "float32 train set + model MiB",
                  "growth / (train set + model)"]
        tables.append(("Peak memory: one CPU epoch in a fresh process", header, rows))
    if rate := gpu_rate(results):
        tables.append(("GPU float32 matmul rate (CuPy, TF32 off)", ["sgemm TFLOP/s", "gpunet b4096 TFLOP/s", "share"],
                       [[f"{rate[0]:.1f}", f"{rate[1]:.2f}", f"{rate[1] / rate[0]:.0%}"]]))
    if targets := evaluate_targets(results):
        rows = [[t["target"], _f(t["measured"]), {True: "pass", False: "MISS", None: "not measured"}[t["pass"]]]
                for t in targets]
        tables.append(("Targets", ["target (from the issue)", "measured", "result"], rows))
    return tables


def tables(results):
    """(title, header, rows) of every table for one results file, as strings."""
    train = [c for c in results.get("configs", []) if c["kind"] == "train"]
    return (_train_tables(train) if train else []) + _other_tables(results)


def compare_table(named):
    """One table of the main ratios of several speed files, ``[(label, results), ...]``, side by side."""
    names = list(dict.fromkeys(c["name"] for _, r in named for c in r["configs"]))
    header = ["config"] + [f"{label}: gpunet/torch, gpunet/floor" for label, _ in named]
    rows = []
    for name in names:
        row = [name]
        for _, results in named:
            c = next((c for c in results["configs"] if c["name"] == name), None)
            q = ratios(c) if c else {}
            row.append(f"{_f(q.get('gpunet/torch'), '{:.2f}')}, {_f(q.get('gpunet/floor'), '{:.2f}')}")
        rows.append(row)
    return [("The ratios of each run (medians over rounds 2..E)", header, rows)]


def describe(results) -> str:
    m, s, dev = results["machine"], results.get("settings", {}), results.get("device", "cpu")
    gpu = f", GPU {m['gpu'].get('gpu_name')}" if dev == "gpu" and m.get("gpu") else ""
    return (f"{m['date']}; {m['cpu_model']} ({m['cores_usable']} cores usable){gpu}; Python {m['python']}, "
            f"NumPy {m['numpy']} ({m.get('blas_numpy')}), torch {m['torch']}, gpunet {m['gpunet']} "
            f"(CPU kernels: {m.get('cpu_kernels', 'NumPy twins')}); device {dev}, {s.get('threads')} threads, "
            f"{s.get('epochs')} rounds per config (round 1 warm-up), images held as {s.get('pixels', 'float32')}")


def render_text(results, title_tables=None) -> str:
    out = [describe(results)]
    for title, header, rows in title_tables or tables(results):
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        out += ["", title, "  ".join(h.ljust(w) for h, w in zip(header, widths)),
                "  ".join("-" * w for w in widths)]
        out.extend("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)
    return "\n".join(out)


def render_markdown(results, title_tables=None) -> str:
    out = [f"### gpunet, {results.get('device', 'cpu').upper()}", "", describe(results) + ".", ""]
    for title, header, rows in title_tables or tables(results):
        out += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out.extend("| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in rows)
        out.append("")
    return "\n".join(out)


def main(argv) -> int:
    markdown = "--markdown" in argv
    files = [a for a in argv if not a.startswith("--")]
    if not files:
        sys.exit("usage: report.py RESULTS.json [--markdown] | report.py --compare A.json B.json ... [--markdown]")
    loaded = [(path, json.loads(open(path).read())) for path in files]
    chosen = compare_table(loaded) if "--compare" in argv else None
    render = render_markdown if markdown else render_text
    print(render(loaded[0][1], chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
