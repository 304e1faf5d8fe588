"""One training step of an MNIST network, explained formula by formula in the course notes' notation.

    python examples/explain_mnist.py [--data-dir ../shared/data/mnist] [--model model.npz] [--steps 300]

Notebook-style: run it whole, or cell by cell (``# %%``) in an editor that knows cells. Without
``--model`` it first trains a small 784-32-10 network for a moment (``--steps`` mini-batches of 64, about a
second on a CPU), then explains one SGD step on the first test image, with its true label as y^D.
"""
# %% Setup
import argparse

import numpy as np

import gpunet as gn
from gpunet.data import load_mnist
from gpunet.explain.render import render_markdown, render_text
from gpunet.training import evaluate, fit

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--data-dir", default=None, help="MNIST folder (default: $GPUNET_DATA or the cache)")
p.add_argument("--model", default=None, help="explain a model written by gpunet train instead of a quick one")
p.add_argument("--steps", type=int, default=300, help="mini-batches of 64 for the quick network (default: 300)")
p.add_argument("--index", type=int, default=0, help="which test image to explain (default: 0)")
p.add_argument("--markdown", default=None, help="also write the explanation as markdown with LaTeX to this file")
args = p.parse_args()

# %% Data: float32 pixels in [0, 1], one image per row (N, 784); labels int64
(x_train, y_train), (x_test, y_test) = load_mnist(args.data_dir)

# %% A network: a trained model, or a small one trained for a moment
loss = gn.SoftmaxCrossEntropy()
if args.model:
    net = gn.load(args.model, device="cpu").eval()  # eval: dropout off, the prediction's forward pass
else:
    net = gn.mlp([784, 32, 10], activation="relu", seed=0, device="cpu")
    n = min(args.steps * 64, len(x_train))
    fit(net, loss, gn.Momentum(net.parameters(), lr=0.05, momentum=0.9), x_train[:n], y_train[:n],
        epochs=1, batch_size=64, seed=0)
print(f"test accuracy before the explained step: {evaluate(net, loss, x_test, y_test)['accuracy']:.4f}")

# %% The instance: one test image and its label (the notes' y^D is its one-hot row)
x, label = x_test[args.index:args.index + 1], y_test[args.index:args.index + 1]
cost_before = float(loss.forward(net.forward(x), label))

# %% One step, explained: the network's own layers, cost and optimizer, one call each, every number kept
optimizer = gn.SGD(net.parameters(), lr=0.1)
record = gn.explain_step(net, loss, optimizer, x, label)
print(render_text(record))
if args.markdown:
    with open(args.markdown, "w") as f:
        f.write(render_markdown(record))
    print(f"wrote {args.markdown}")

# %% Reading the record: a few of the notes' statements, checked on these numbers
out = record["stages"][-1]
print(f"label {int(label[0])}, predicted {int(record['prediction'][0])} "
      f"with probability y^L = {record['y_L'][0].max():.4f}")
gap = np.abs(out["delta"] - (record["y_D"] - record["y_L"])).max()
print(f"delta^L = y^D - y^L holds to {gap:.1e}")
W1 = record["layers"][0]["params"]["W"]
moved = np.count_nonzero(W1["change"].any(axis=1))
print(f"W^1 rows that moved: {moved} of 784 (Delta w_ij = alpha x_i delta_j is zero where the pixel x_i is 0; "
      f"{np.count_nonzero(x)} pixels are not)")
cost_after = float(loss.forward(net.forward(x), label))
print(f"cost on this image: before {cost_before:.6f}, after the step {cost_after:.6f}")
