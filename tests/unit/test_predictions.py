"""One prediction's JSON object (gpunet/predictions.py), written once: what it holds, checked
against NumPy, and that `gpunet predict --json` and `gpunet serve`'s POST /predict both answer with
it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gpunet as gn
from gpunet import cli, serve
from gpunet.predictions import prediction
from gpunet.training import predict_proba


def test_the_row_against_numpy():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(10)).astype(np.float32)
    row = prediction(p, ["a warning"])
    assert list(row) == ["digit", "top3", "probabilities", "warnings"]
    order = np.argsort(p)[::-1]  # no ties in a random draw: any sort agrees
    assert row["digit"] == int(np.argmax(p)) == int(order[0])
    assert [t["digit"] for t in row["top3"]] == order[:3].tolist()
    # rounded to 6 decimals: float32 probabilities in [0, 1] keep their first 6 decimals (<= 5e-7
    # off)
    np.testing.assert_allclose([t["probability"] for t in row["top3"]], p[order[:3]], atol=5e-7)
    np.testing.assert_allclose(row["probabilities"], p, atol=5e-7)
    assert all(type(v) is float for v in row["probabilities"]) and row["warnings"] == ["a warning"]
    json.dumps(row, allow_nan=False)  # plain JSON types only


def test_ties_go_to_the_first_class_as_argmax_does():
    row = prediction(np.array([0.1, 0.4, 0.4, 0.1]), top=3)
    assert row["digit"] == 1 and [t["digit"] for t in row["top3"]] == [1, 2, 0]
    assert prediction([0.5, 0.5], top=3)["top3"] == [
        {"digit": 0, "probability": 0.5},
        {"digit": 1, "probability": 0.5},
    ]


@pytest.fixture
def net_and_pixels(tmp_path):
    net = gn.mlp([784, 16, 10], seed=1, device="cpu")
    net.save(tmp_path / "model.npz")
    pixels = np.zeros((28, 28), np.float32)
    pixels[4:24, 12:16] = 1.0
    np.save(tmp_path / "digit.npy", pixels)
    return net, pixels, tmp_path


def test_the_command_line_and_the_server_answer_with_it(net_and_pixels, capsys):
    net, pixels, folder = net_and_pixels
    want = prediction(gn.to_numpy(predict_proba(net, pixels.reshape(1, -1)))[0])
    assert (
        cli.main(
            [
                "predict",
                str(folder / "model.npz"),
                str(folder / "digit.npy"),
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    (row,) = json.loads(capsys.readouterr().out)
    assert row == {"file": str(folder / "digit.npy"), **want}
    answer = serve.Predictor(net).from_json(
        json.dumps({"pixels": (pixels * 255).tolist()}).encode()
    )
    assert answer == {**want, "input": pixels.tolist()}
