"""benchmarks/inference.py times what it says: every side labels the same images alike (gpunet at
each batch size and ONNX Runtime, when installed, on the exported network), the rounds keep raw
seconds only, and the summary's ratios come from them. No speed is asserted."""

import json
import subprocess
import sys

from conftest import ROOT, make_fake_mnist


def test_every_side_labels_alike_and_rounds_are_raw(tmp_path):
    data = make_fake_mnist(tmp_path / "mnist", n_train=20, n_test=300)
    out = tmp_path / "inference.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inference.py"), "--data-dir", str(data),
         "--rounds", "3", "--batch-sizes", "64,4096", "--floor-block", "128", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert len(res["rounds"]) == 4 and res["images"] == 300  # a warm-up round, then 3
    sides = {"floor", "gpunet b64", "gpunet b4096"} | (
        {"onnxruntime"} if "onnxruntime" in res["rounds"][0] else set()
    )
    assert all(set(r) == sides and min(r.values()) > 0 for r in res["rounds"])
    assert set(res["labels_agree_with_first"]) == sides - {"floor"}
    assert all(v == 1.0 for v in res["labels_agree_with_first"].values())
    assert res["gemm_flops"] == 2.0 * 300 * (784 * 512 + 512 * 512 + 512 * 10)
    assert "gpunet b64:" in proc.stdout and "/floor" in proc.stdout
