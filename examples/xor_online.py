"""XOR trained online (batch size 1, one instance per update), the notes' first exercise.

    python examples/xor_online.py
"""
import numpy as np

import gpunet as gn
from gpunet.training import fit, predict

x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
y = np.array([0, 1, 1, 0])

net = gn.mlp([2, 4, 2], activation="tanh", seed=1, device="cpu")
opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
history = fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=500, batch_size=1, target_loss=0.01, seed=0)
print(f"stopped after {len(history)} epochs ({history.stop_reason}), last cost {history['loss'][-1]:.4f}")
print("predictions:", predict(net, x).tolist(), "expected:", y.tolist())
print(gn.gradcheck(net, gn.SoftmaxCrossEntropy(), x, y))
