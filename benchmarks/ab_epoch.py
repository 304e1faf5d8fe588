"""One process: warm-up epoch, then R rounds of (floor: the epoch's products alone; gpunet epoch),
784-512-512-10 ReLU, dropout 0.2 (as the default recipe), momentum 0.9 lr 0.05, batch 128, the
first 55,000 MNIST images as float32. Prints JSON: the epochs', floors' seconds."""
import json, sys, time
import numpy as np
import gpunet as gn
from gpunet.training import fit
try:
    from gpunet.data.datasets import load_mnist
except ImportError:
    from gpunet.data import load_mnist
(x, y), _ = load_mnist(sys.argv[1], download=False)
x, y = np.ascontiguousarray(x[:55000], dtype=np.float32), y[:55000]
rounds = int(sys.argv[2])
net = gn.mlp([784, 512, 512, 10], activation="relu", dropout=0.2, seed=0)
opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
loss = gn.SoftmaxCrossEntropy()
sizes = [784, 512, 512, 10]
rng = np.random.default_rng(1)
Ws = [rng.standard_normal((a, b), dtype=np.float32) * 0.05 for a, b in zip(sizes[:-1], sizes[1:])]
Gs = [np.empty_like(w) for w in Ws]
def floor():
    h = {r: [rng.standard_normal((r, s), dtype=np.float32) for s in sizes] for r in (128, 55000 % 128)}
    d = {r: [rng.standard_normal((r, s), dtype=np.float32) for s in sizes] for r in h}
    steps = [128] * (55000 // 128) + [55000 % 128]
    t = time.perf_counter()
    for r in steps:
        a, b = h[r], d[r]
        for i in range(3):
            np.matmul(a[i], Ws[i], out=a[i + 1])
        for i in (2, 1, 0):
            np.matmul(a[i].T, b[i + 1], out=Gs[i])
            if i > 0:
                np.matmul(b[i + 1], Ws[i].T, out=b[i])
    return time.perf_counter() - t
fit(net, loss, opt, x, y, epochs=1, batch_size=128, seed=0)
floor()
out = {"floor": [], "epoch": []}
for r in range(rounds):
    out["floor"].append(floor())
    t = time.perf_counter()
    fit(net, loss, opt, x, y, epochs=1, batch_size=128, seed=r + 1)
    out["epoch"].append(time.perf_counter() - t)
print(json.dumps(out))
