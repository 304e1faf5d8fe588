"""MNIST with the Python API: build, train with early stopping, evaluate, save.

    python examples/mnist_api.py --data-dir ../shared/data/mnist [--epochs 10] [--device auto]
"""
import argparse

import numpy as np

import gpunet as gn
from gpunet.data import load_mnist, split_validation
from gpunet.metrics import format_report
from gpunet.schedules import Cosine
from gpunet.training import evaluate, fit


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: $GPUNET_DATA or the cache)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="mnist_model.npz")
    args = p.parse_args()

    # uint8 bytes (a quarter of float32's memory), read as float32 / 255 batch by batch through gn.Pixels
    (x_train, y_train), (x_test, y_test) = load_mnist(args.data_dir, dtype=np.uint8)
    (x_tr, y_tr), (x_val, y_val) = split_validation(x_train, y_train, 5000)
    x_tr, x_val, x_test = gn.Pixels(x_tr), gn.Pixels(x_val), gn.Pixels(x_test)
    net = gn.mlp([784, 256, 128, 10], activation=["relu", "relu"], dropout=0.1, seed=0, device=args.device)
    print(net)
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    loss = gn.SoftmaxCrossEntropy()
    fit(net, loss, opt, x_tr, y_tr, epochs=args.epochs, batch_size=128, validation=(x_val, y_val), patience=3,
        schedule=Cosine(0.05, epochs=args.epochs),
        callback=lambda r: print(f"epoch {r['epoch']}: loss {r['loss']:.4f}, val acc {r['val_accuracy']:.4f}, "
                                 f"{r['seconds']:.1f}s"))
    print(format_report(evaluate(net, loss, x_test, y_test, metrics=True)))
    net.save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
