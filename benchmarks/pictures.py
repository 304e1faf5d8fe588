"""How well saved models read people's digits (issue 25): the re-photographed MNIST test digits and the
typed digits that the image tests build (``tests/support/pictures.py``), read as ``gpunet predict`` reads files
(``gpunet.data.pictures.load_image_file``: the MNIST recipe), for each model given.

    python benchmarks/pictures.py --data-dir /path/to/mnist --digits 2000 MODEL.npz [MODEL.npz ...]

Needs Pillow (the cli extra). The pictures are the same for every model (fixed seeds), written once to a
temporary folder; one line per model, and ``--json`` keeps the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import gpunet as gn
from gpunet.data import load_mnist
from gpunet.data.pictures import load_image_file
from gpunet.training import predict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
import pictures  # noqa: E402  (the tests' picture builders: no picture files are committed)


def picture_sets(data_dir: str, digits: int, folder: Path) -> dict:
    """{"photographed": (inputs (N, 784) float32, labels), "typed": (...)}, read the way predict reads."""
    _, (x_test, y_test) = load_mnist(data_dir, download=False)
    pick = np.random.default_rng(0).choice(len(y_test), digits, replace=False)  # as tests/unit/test_images.py
    chosen = x_test[pick].reshape(-1, 28, 28)  # float32 in [0, 1], as load_mnist hands them over
    photos = pictures.save_set(pictures.photographed(chosen, y_test[pick]), folder / "photos")
    typed = pictures.save_set(pictures.typed(), folder / "typed")
    out = {}
    for name, files in (("photographed", photos), ("typed", typed)):
        x = np.stack([load_image_file(path)[0][0] for path, _ in files]).astype(np.float32)
        out[name] = (x, np.array([label for _, label in files]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model .npz files (gpunet train's model.npz)")
    parser.add_argument("--data-dir", required=True, help="the folder of the four MNIST files")
    parser.add_argument("--digits", type=int, default=2000, help="MNIST test digits to photograph (default 2000)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sets = picture_sets(args.data_dir, args.digits, Path(tmp))
    results = []
    for path in args.models:
        net = gn.load(path, device="cpu")
        row = {"model": path}
        for name, (x, y) in sets.items():
            row[name] = float((gn.to_numpy(predict(net, x)) == y).mean())
            row[f"{name}_count"] = int(len(y))
        results.append(row)
        print(f"{path}: photographed {row['photographed']:.2%} of {row['photographed_count']}, "
              f"typed {row['typed']:.2%} of {row['typed_count']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
