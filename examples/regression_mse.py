"""A small regression with MSE: learn y = sin(3x) * x from noisy samples, with a tanh network.

    python examples/regression_mse.py
"""
import numpy as np

import gpunet as gn
from gpunet.training import fit

rng = np.random.default_rng(0)
x = rng.uniform(-2, 2, size=(512, 1)).astype(np.float32)
t = (np.sin(3 * x) * x + rng.normal(scale=0.05, size=x.shape)).astype(np.float32)

net = gn.mlp([1, 32, 32, 1], activation="tanh", seed=0, device="cpu")
opt = gn.Momentum(net.parameters(), lr=0.02, momentum=0.9)
history = fit(net, gn.MSELoss(), opt, x, t, epochs=300, batch_size=32)
grid = np.linspace(-2, 2, 9, dtype=np.float32).reshape(-1, 1)
net.eval()
pred = gn.to_numpy(net(grid))
print(f"final training MSE {history['loss'][-1]:.4f} (noise variance 0.0025)")
for g, p in zip(grid[:, 0], pred[:, 0]):
    print(f"x = {g:+.2f}: predicted {p:+.3f}, true {np.sin(3 * g) * g:+.3f}")
