"""The command line, run for real through its entry points (`python -m gpunet` and the `gpunet`
script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import optional

import gpunet as gn
import gpunet.training  # noqa: F401  (gn.training below)
from gpunet import backend

SCRIPT = Path(sys.executable).with_name("gpunet")


def run(*args, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    env.pop("GPUNET_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "gpunet", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small training run on fake MNIST-format files, shared by the tests below."""
    from conftest import make_fake_mnist

    root = tmp_path_factory.mktemp("cli")
    data = make_fake_mnist(root / "data")
    out = root / "run"
    res = run(
        "train",
        "--data-dir",
        data,
        "--hidden",
        32,
        "--epochs",
        3,
        "--batch-size",
        32,
        "--val-size",
        100,
        "--out",
        out,
        "--seed",
        0,
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    return data, out, res


def test_info_text_and_json():
    res = run("info")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("gpunet ")
    assert "numpy" in res.stdout and "device: " in res.stdout
    if not backend.gpu_available():
        assert "GPU not used: " + backend.gpu_unavailable_reason() in res.stdout
    info = json.loads(run("info", "--json").stdout)
    assert info["versions"]["numpy"] == np.__version__
    assert info["device"] in ("cpu", "gpu") and info["backend"] in ("numpy", "cupy")
    assert "CPU kernels " + info["fast_path"]["cpu_kernels"] in res.stdout
    off = run("info", env_extra={"GPUNET_NUMBA": "0"})
    assert "CPU kernels in-place NumPy (GPUNET_NUMBA=0)" in off.stdout, off.stdout
    assert "fast path: off (GPUNET_FAST=0)" in run("info", env_extra={"GPUNET_FAST": "0"}).stdout


def test_console_script_and_help():
    if not SCRIPT.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    res = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "train" in res.stdout and "predict" in res.stdout
    res = run("train", "--help")
    for flag in (
        "--data-dir",
        "--hidden",
        "--activation",
        "--epochs",
        "--batch-size",
        "--lr",
        "--momentum",
        "--nesterov",
        "--weight-decay",
        "--optimizer",
        "--beta1",
        "--beta2",
        "--eps",
        "--alpha",
        "--centered",
        "--batch-norm",
        "--dropout",
        "--init",
        "--schedule",
        "--val-size",
        "--patience",
        "--target-loss",
        "--seed",
        "--device",
        "--out",
    ):
        assert flag in res.stdout, flag


def test_train_writes_model_metrics_and_pictures(trained):
    _, out, res = trained
    lines = [l for l in res.stdout.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 3  # no TTY here: one line per epoch
    m = json.loads((out / "metrics.json").read_text())
    assert m["device"] == "cpu" and m["backend"] == "numpy"
    assert m["config"]["hidden"] == [32] and m["config"]["epochs"] == 3
    assert len(m["history"]) == 3
    for rec in m["history"]:
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(rec)
    assert m["test_accuracy"] > 0.9  # the fake classes are well separated
    assert len(m["per_class"]["f1"]) == 10 and len(m["confusion_matrix"]) == 10
    assert sum(map(sum, m["confusion_matrix"])) == 200 and m["wall_seconds"] > 0
    assert "numpy" in m["versions"]
    assert (out / "model.npz").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in res.stdout
    else:
        for name in ("curves.png", "confusion.png", "misclassified.png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_text_and_json(trained):
    data, out, _ = trained
    res = run("evaluate", out / "model.npz", "--data-dir", data)
    assert res.returncode == 0, res.stderr
    assert "accuracy: " in res.stdout and "confusion matrix" in res.stdout and "macro" in res.stdout
    rep = json.loads(run("evaluate", out / "model.npz", "--data-dir", data, "--json").stdout)
    assert rep["accuracy"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["test_accuracy"]
    )


def test_predict_images_and_npy(trained, tmp_path):
    from gpunet.data import load_mnist

    Image = optional("PIL.Image", "cli")
    data, out, _ = trained
    _, (x_test, _) = load_mnist(data, download=False)
    big = Image.fromarray((x_test[0].reshape(28, 28) * 255).astype(np.uint8)).resize((56, 56))
    big.save(tmp_path / "digit.png")
    np.save(tmp_path / "three.npy", x_test[1:4].reshape(3, 28, 28))
    res = run(
        "predict", out / "model.npz", tmp_path / "digit.png", tmp_path / "three.npy", "--json"
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["file"].split(os.sep)[-1] for r in rows] == [
        "digit.png",
        "three.npy[0]",
        "three.npy[1]",
        "three.npy[2]",
    ]
    net = gn.load(out / "model.npz", device="cpu")
    expected = gn.to_numpy(gn.training.predict(net, x_test[1:4]))
    assert [r["digit"] for r in rows[1:]] == expected.tolist()
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-4 for r in rows)
    text = run("predict", out / "model.npz", tmp_path / "digit.png")
    assert text.returncode == 0 and text.stdout.startswith(str(tmp_path / "digit.png") + ": ")


def test_predict_keeps_going_past_files_it_cannot_read(trained, tmp_path):
    """One line per file that cannot be read, a result for every other file (in the order given),
    exit 1."""
    from gpunet.data import load_mnist

    data, out, _ = trained
    _, (x_test, _) = load_mnist(data, download=False)
    np.save(tmp_path / "one.npy", x_test[:1])
    np.save(tmp_path / "two.npy", x_test[1:3])
    np.save(tmp_path / "short.npy", x_test[0, :100])  # 100 values: no 28x28 digit
    (tmp_path / "notes.txt").write_text("hello")
    files = [tmp_path / f for f in ("one.npy", "missing.png", "two.npy", "notes.txt", "short.npy")]
    res = run("predict", out / "model.npz", *files)
    assert res.returncode == 1, res.stderr
    errors = res.stderr.splitlines()
    assert len(errors) == 3 and all(e.startswith("gpunet predict: error: ") for e in errors), (
        res.stderr
    )
    for name, line in zip(("missing.png", "notes.txt", "short.npy"), errors):
        assert str(tmp_path / name) in line and "Traceback" not in line
    lines = res.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        str(files[0]),
        f"{files[2]}[0]",
        f"{files[2]}[1]",
    ]
    expected = gn.to_numpy(
        gn.training.predict(gn.load(out / "model.npz", device="cpu"), x_test[:3])
    )
    assert [int(line.split(": ")[1].split()[0]) for line in lines] == expected.tolist()
    js = run("predict", out / "model.npz", *files, "--json")
    assert js.returncode == 1
    rows = json.loads(js.stdout)
    assert [("error" in r, r["file"]) for r in rows] == [
        (False, str(files[0])),
        (True, str(files[1])),
        (False, f"{files[2]}[0]"),
        (False, f"{files[2]}[1]"),
        (True, str(files[3])),
        (True, str(files[4])),
    ]
    assert [r["digit"] for r in rows if "digit" in r] == expected.tolist()
    alone = run("predict", out / "model.npz", tmp_path / "missing.png")
    assert alone.returncode == 1 and alone.stdout == "" and alone.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["info", "evaluate", "predict"])
def test_a_closed_pipe_ends_any_command_quietly(trained, tmp_path, command):
    """`gpunet evaluate MODEL --json | head -3` once printed "error: [Errno 32] Broken pipe" and
    exited 2. Here the reader is gone before the command writes anything, so every write meets the
    closed pipe."""
    data, out, _ = trained
    np.save(tmp_path / "x.npy", np.zeros((50, 784), np.float32))
    args = {
        "info": ["info", "--json"],
        "evaluate": ["evaluate", out / "model.npz", "--data-dir", data, "--json"],
        "predict": ["predict", out / "model.npz", tmp_path / "x.npy"],
    }[command]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpunet", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # like head, gone
    err = proc.stderr.read()
    assert (
        proc.wait(timeout=120) == 141 and err == ""
    )  # 128 + SIGPIPE: what a shell reports for such a writer


@pytest.mark.parametrize(
    "flags, optimizer, fused",
    [
        (
            ["--optimizer", "adam", "--batch-norm"],
            gn.Adam,
            "layer 1 is BatchNorm, where a Linear was expected (fused on the GPU only: the CPU "
            "runs the core's step)",
        ),
        (["--optimizer", "adamw", "--beta2", "0.99", "--lr", "0.003"], gn.AdamW, None),
        # RMSprop joined the fused path through its rule (gpunet/fast/rules.py, 1f3e515)
        (["--optimizer", "rmsprop", "--centered"], gn.RMSprop, None),
    ],
)
def test_train_with_each_optimizer_and_batch_norm(tmp_path, flags, optimizer, fused):
    """--optimizer and --batch-norm reach the run: its settings (the optimizer's defaults filled
    in), the model file's layers, and whether the fused step ran, in the log line and
    metrics.json."""
    from conftest import make_fake_mnist

    data = make_fake_mnist(tmp_path / "data", n_train=300, n_test=100)
    res = run(
        "train",
        "--data-dir",
        data,
        "--hidden",
        16,
        "--epochs",
        2,
        "--batch-size",
        32,
        "--val-size",
        50,
        "--out",
        tmp_path / "run",
        "--device",
        "cpu",
        "--no-plots",
        *flags,
    )
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["config"]["optimizer"] == flags[1] and m["config"]["batch_norm"] == (
        "--batch-norm" in flags
    )
    assert m["config"]["lr"] == (0.003 if "--lr" in flags else 0.001)
    assert m["fused_step"] == {"used": fused is None, "why_not": fused}
    assert (f"the core's step runs (no fused step: {fused})" in res.stdout) == (
        fused is not None
    ), res.stdout
    assert m["test_accuracy"] > 0.5  # learns (the fake classes are well separated)
    net = gn.load(tmp_path / "run" / "model.npz", device="cpu")
    assert any(isinstance(l, gn.BatchNorm) for l in net.layers) == ("--batch-norm" in flags)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train", "--data-dir", "/nonexistent/mnist"],
            "data folder not found: /nonexistent/mnist",
        ),
        (["train", "--epochs", "-3"], "argument --epochs: expected a positive integer, got '-3'"),
        (["train", "--lr", "fast"], "argument --lr: expected a positive number, got 'fast'"),
        (
            ["train", "--momentum", "1.5"],
            r"argument --momentum: expected a number in [0, 1), got '1.5'",
        ),
        (
            ["train", "--batch-size", "0"],
            "argument --batch-size: expected a positive integer, got '0'",
        ),
        (["train", "--optimizer", "nadam"], "argument --optimizer: invalid choice: 'nadam'"),
        (
            ["train", "--beta1", "0.5"],
            "--beta1: a setting of --optimizer adam or adamw, got --optimizer momentum",
        ),
        (
            ["train", "--optimizer", "adam", "--centered"],
            "--centered: a setting of --optimizer rmsprop, got --optimizer adam",
        ),
        (
            ["train", "--device", "tpu"],
            "device: expected one of 'cpu', 'gpu', 'cuda', 'cuda:N' or 'auto', got 'tpu'",
        ),
        (
            ["train", "--augment", "--aug-rotation", "200"],
            r"--aug-rotation: expected a number in [0, 180), got 200.0",
        ),
        (
            ["train", "--aug-scale", "1.5"],
            r"argument --aug-scale: expected a number in [0, 1), got '1.5'",
        ),
        (["train", "--preset", "fastest"], "argument --preset: invalid choice: 'fastest'"),
        (
            ["train", "--aug-alpha", "0", "--aug-shift=1"],
            "--aug-alpha, --aug-shift: a setting of --augment, got no --augment",
        ),
        (["evaluate", "/nonexistent/model.npz"], "model file not found: /nonexistent/model.npz"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_mistakes_print_one_line(args, message):
    res = run(*args)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert message in res.stderr, res.stderr


def test_more_user_mistakes(trained, tmp_path):
    data, out, _ = trained
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 100)
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        (["evaluate", garbage, "--data-dir", data], "not a gpunet model file"),
        (
            ["train", "--data-dir", data, "--val-size", "100000", "--out", tmp_path / "o"],
            "--val-size: expected fewer than 600",
        ),
        (["train", "--data-dir", tmp_path, "--out", tmp_path / "o"], "missing"),
        (
            [
                "train",
                "--data-dir",
                data,
                "--hidden",
                "8",
                "8",
                "--activation",
                "relu",
                "tanh",
                "relu",
                "--out",
                tmp_path / "o",
            ],
            "--activation: expected 1 or 2 names",
        ),
    ]
    if not backend.gpu_available():
        cases.append(
            (
                ["train", "--data-dir", data, "--device", "gpu", "--out", tmp_path / "o"],
                "no GPU is usable",
            )
        )
    for args, message in cases:
        res = run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert message in res.stderr, (args, res.stderr)


def test_committee_writes_one_model_whose_outputs_are_the_members_mean(trained, tmp_path):
    """Two members (the trained model and a copy with other weights) joined by ``gpunet committee``:
    the file it writes loads as one network whose logits are the members' mean (float32, summed
    in another order: 1e-5 of the largest logit), and gpunet evaluate reads it as any model."""
    data, out, _ = trained
    first = gn.load(out / "model.npz")
    second = gn.load(out / "model.npz")
    rng = np.random.default_rng(0)
    for p in second.parameters():
        noise = rng.normal(0, 0.01, p.data.shape).astype(p.data.dtype)
        p.data[...] = p.data * np.float32(0.5) + noise
    second.save(tmp_path / "second.npz")
    res = run("committee", out / "model.npz", tmp_path / "second.npz", "--out", tmp_path / "c.npz")
    assert res.returncode == 0, res.stderr
    assert "the mean of 2 models' outputs" in res.stdout, res.stdout
    x = rng.random((20, first.in_features), dtype=np.float32)
    want = (first.eval().forward(x) + second.eval().forward(x)) / 2
    got = gn.load(tmp_path / "c.npz").eval().forward(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    res = run("evaluate", tmp_path / "c.npz", "--data-dir", data, "--json")
    assert res.returncode == 0 and 0.0 <= json.loads(res.stdout)["accuracy"] <= 1.0, res.stderr


def test_committee_mistakes_print_one_line(trained, tmp_path):
    _, out, _ = trained
    model = out / "model.npz"
    gn.mlp([gn.load(model).in_features, 8, 8, 10], seed=1).save(tmp_path / "deeper.npz")
    cases = [
        (["committee", model, "--out", tmp_path / "c.npz"], "expected two or more model files"),
        (
            ["committee", model, tmp_path / "deeper.npz", "--out", tmp_path / "c.npz"],
            f"MODEL {tmp_path / 'deeper.npz'}: expected the chain",
        ),
        (["committee", model, model, "--out", model], "--out: expected a new file"),
        (["committee", model, model, "--out", tmp_path / "no" / "c.npz"], "does not exist"),
        (["committee", model, tmp_path / "missing.npz", "--out", tmp_path / "c.npz"], "not found"),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert message in res.stderr, (args, res.stderr)
    assert not (tmp_path / "c.npz").exists()


# --- gpunet train --data FILE.npz|.csv: one's own data, scaled, the scaling kept in the model file
# -------
@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """scikit-learn's digits-like data without scikit-learn: 8x8 class patterns 0..16 plus noise."""
    root = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 17, size=(4, 64))
    y = rng.integers(0, 4, size=400)
    x = np.clip(protos[y] + rng.integers(-3, 4, size=(400, 64)), 0, 16).astype(np.float64)
    np.savez(root / "d.npz", x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])
    header = ",".join([f"p{i}" for i in range(32)] + ["digit"] + [f"p{i}" for i in range(32, 64)])
    rows = [",".join(map(str, [*r[:32], k, *r[32:]])) for r, k in zip(x[:300].astype(int), y[:300])]
    (root / "d.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root, x, y


def test_train_on_an_npz_file_keeps_the_scaling_in_the_model(own_data, tmp_path):
    root, x, y = own_data
    res = run(
        "train",
        "--data",
        root / "d.npz",
        "--val-size",
        50,
        "--hidden",
        16,
        "--epochs",
        3,
        "--out",
        tmp_path / "run",
        "--device",
        "cpu",
        "--no-plots",
    )
    assert res.returncode == 0, res.stderr
    assert "250 train / 50 validation / 100 test examples" in res.stdout
    net = gn.load(tmp_path / "run" / "model.npz", device="cpu")
    first = net.layers[0]
    assert isinstance(first, gn.Standardize) and net.classifies is True
    (rows, _), _ = gn.data.split_validation(
        x[:300], y[:300], 50, seed=0
    )  # --data draws its validation rows
    np.testing.assert_allclose(
        first.shift, rows.mean(axis=0), rtol=1e-12
    )  # the training rows' statistics
    np.testing.assert_allclose(
        first.scale, np.where(rows.std(axis=0) > 0, rows.std(axis=0), 1), rtol=1e-12
    )
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    raw = gn.evaluate(
        net, gn.SoftmaxCrossEntropy(), x[300:], y[300:]
    )  # the model takes the features as they are
    assert abs(m["test_accuracy"] - raw["accuracy"]) < 1e-12 and m["test_accuracy"] > 0.9
    np.save(tmp_path / "rows.npy", x[300:305])
    pred = run("predict", tmp_path / "run" / "model.npz", tmp_path / "rows.npy", "--json")
    assert pred.returncode == 0, pred.stderr
    assert [r["class"] for r in json.loads(pred.stdout)] == gn.to_numpy(
        gn.predict(net, x[300:305])
    ).tolist()
    ev = run("evaluate", tmp_path / "run" / "model.npz", "--data", root / "d.npz", "--json")
    assert ev.returncode == 0, ev.stderr
    assert (
        json.loads(ev.stdout)["accuracy"] == m["test_accuracy"]
    )  # the file's test set, read as it is


def test_train_on_a_csv_file_with_minmax_scaling(own_data, tmp_path):
    root, x, y = own_data
    res = run(
        "train",
        "--data",
        root / "d.csv",
        "--label-column",
        "digit",
        "--scale",
        "minmax",
        "--val-size",
        60,
        "--hidden",
        16,
        "--epochs",
        3,
        "--out",
        tmp_path / "run",
        "--device",
        "cpu",
        "--no-plots",
    )
    assert res.returncode == 0, res.stderr
    assert (
        "holds no test set (x_test, y_test): the test figures are the validation set's"
        in res.stdout
    )
    net = gn.load(tmp_path / "run" / "model.npz", device="cpu")
    (rows, _), _ = gn.data.split_validation(x[:300], y[:300], 60, seed=0)
    lo, hi = rows.min(axis=0), rows.max(axis=0)
    np.testing.assert_array_equal(net.layers[0].shift, lo)
    np.testing.assert_array_equal(net.layers[0].scale, np.where(hi > lo, hi - lo, 1))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["test_accuracy"] == m["history"][-1]["val_accuracy"]  # the validation set, tested
    pred = run("predict", tmp_path / "run" / "model.npz", root / "d.csv", "--label-column", "digit")
    assert pred.returncode == 0 and len(pred.stdout.splitlines()) == 300, pred.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "/nonexistent/d.npz"], "data file not found: /nonexistent/d.npz"),
        (
            ["--data", "{root}/d.npz", "--data-dir", "{root}"],
            "--data: a file of your own replaces the MNIST folder",
        ),
        (["--data", "{root}/d.csv"], "no column named 'label' for the labels (--label-column)"),
        (
            ["--data", "{root}/d.csv", "--label-column", "digit", "--val-size", "0"],
            "--val-size: expected at least 1: {root}/d.csv holds no test set",
        ),
    ],
)
def test_train_data_file_mistakes_print_one_line(own_data, tmp_path, flags, message):
    root = own_data[0]
    res = run(
        "train", *[f.format(root=root) for f in flags], "--out", tmp_path / "o", "--device", "cpu"
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert message.format(root=root) in res.stderr, res.stderr


def test_preset_best_sets_the_recipe_and_flags_given_win():
    """--preset best is train_command.PRESETS["best"] as train's defaults; a flag given beside it is
    kept."""
    from gpunet import cli
    from gpunet.commands import train as train_command

    best = train_command.PRESETS["best"]
    args = cli.build_parser().parse_args(["train", "--preset", "best", "--epochs", "3"])
    config = cli.train_config(args)
    assert config.preset == "best" and config.augment and config.epochs == 3
    assert all(getattr(config, k) == v for k, v in best.items() if k != "epochs")
    plain = cli.train_config(cli.build_parser().parse_args(["train"]))
    assert not plain.augment and plain.hidden == [512, 512] and plain.preset is None


def test_augment_defaults_are_one_set_everywhere():
    """``gpunet train --augment``, ``commands.train.TrainConfig`` (train() from Python, and the
    settings a checkpoint from before the --aug-* flags resumes with) and ``Augment`` itself distort
    alike by default."""
    from gpunet.augment import Augment
    from gpunet.cli import build_parser
    from gpunet.commands.train import TrainConfig

    parsed, config, aug = build_parser().parse_args(["train"]), TrainConfig(), Augment()
    for name in ("rotation", "scale", "shear", "shift", "sigma", "alpha"):
        assert (
            getattr(parsed, f"aug_{name}") == getattr(config, f"aug_{name}") == getattr(aug, name)
        ), name
