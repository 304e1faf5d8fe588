"""Exact resume through the API: fit interrupted at a step (or after an epoch) and resumed from its
checkpoint ends with the very bits of an uninterrupted run, weights, velocities and history (all but
``seconds``), with and without dropout, with each schedule and with early stopping, with every
optimizer (Adam's moments and step count) and with BatchNorm (its running statistics), and a
divergence after the resume. Each planned stop is asserted to have happened at its step (``run``),
so an interrupt that never fires cannot pass for an exact resume; the random stop steps come from
fixed seeds. Plus the state dicts, divergence and damaged checkpoint files. About 10 s in all."""

import json

import numpy as np
import pytest

import gpunet as gn
from gpunet import checkpoint, schedules
from gpunet.training import Interrupted, fit

SCHEDULES = {
    "none": lambda: None,
    "constant": lambda: schedules.Constant(0.05),
    "step": lambda: schedules.Step(0.05, step_size=2),
    "cosine": lambda: schedules.Cosine(0.05, epochs=5),
}


def data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.random((4, 20), dtype=np.float32)
    y = rng.integers(0, 4, size=n)
    x = (protos[y] + 0.3 * rng.random((n, 20), dtype=np.float32)).astype(np.float32)
    return x[:250], y[:250], x[250:], y[250:]


OPTIMIZERS = {
    "momentum": lambda p: gn.Momentum(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "sgd": lambda p: gn.SGD(p, lr=0.05),
    "adam": lambda p: gn.Adam(p, lr=0.01, weight_decay=1e-4),
    "adamw": lambda p: gn.AdamW(p, lr=0.01),
    "rmsprop": lambda p: gn.RMSprop(p, lr=0.01, momentum=0.5, centered=True),
}


STEPS = 16  # per epoch: 250 rows in batches of 16


def run(
    tmp_path,
    dropout,
    schedule,
    patience,
    stops=(),
    optimizer="momentum",
    fast=True,
    epochs=5,
    device="cpu",
    batch_norm=False,
):
    """One run, stopped at each global step in ``stops`` (counted from the run's start, increasing)
    and resumed from its checkpoint each time. Every planned stop must happen, at its step: the
    Interrupted exception and the checkpoint both name the epoch and step reached, and a run that
    ends with stops still planned fails (else an interrupt that never fired would pass as an exact
    resume)."""
    x, y, xv, yv = data()
    name = getattr(schedule, "__name__", schedule)
    path = tmp_path / f"ck-{dropout}-{name}-{patience}-{optimizer}-{fast}.npz"
    assert list(stops) == sorted(set(stops)) and all(s >= 1 for s in stops), stops

    def make():
        net = gn.mlp([20, 16, 12, 4], dropout=dropout, seed=7, device=device, batch_norm=batch_norm)
        return net, OPTIMIZERS[optimizer](net.parameters())

    kwargs = dict(
        epochs=epochs,
        batch_size=16,
        validation=(xv, yv),
        seed=3,
        patience=patience,
        fast=fast,
        schedule=SCHEDULES[schedule]() if isinstance(schedule, str) else schedule,
        checkpoint_path=path,
    )
    planned, done = list(stops), 0  # done: global steps finished before this process started
    while True:
        net, opt = make()
        asked = [0]

        def interrupt():
            asked[0] += 1
            return bool(planned) and done + asked[0] == planned[0]

        try:
            hist = fit(
                net,
                gn.SoftmaxCrossEntropy(),
                opt,
                x,
                y,
                resume=done > 0,
                interrupt=interrupt,
                **kwargs,
            )
        except Interrupted as exc:
            at = planned.pop(0)
            where = (
                (at - 1) // STEPS,
                (at - 1) % STEPS + 1,
            )  # epochs done, steps of the next (the last: 16)
            meta = checkpoint.read_meta(path)
            assert (exc.epoch, exc.step) == where == (meta["epoch"], meta["step"]), (
                at,
                exc,
                meta["step"],
            )
            assert exc.checkpoint == path and not meta["finished"]
            done = at
            continue
        assert not planned, f"planned stops at steps {planned} never happened (the run ended first)"
        return net, opt, hist, path


def test_resume_mid_epoch_is_bit_exact_on_each_device(tmp_path, device):
    """The GPU twin: same device, same bits (dropout keys are host draws, checkpointed with the
    run)."""
    same_run(
        run(tmp_path / "a", 0.3, "cosine", None, device=device),
        run(tmp_path / "b", 0.3, "cosine", None, [21, 51], device=device),
    )


def same_run(a, b):
    (net_a, opt_a, hist_a, _), (net_b, opt_b, hist_b, _) = a, b
    for (k, va), vb in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert np.array_equal(va, vb), f"{k} differs"
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    arrays_a, arrays_b = state_a.pop("arrays"), state_b.pop("arrays")
    assert state_a == state_b  # Adam's step count too
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:  # velocities, moments
        assert all(np.array_equal(va, vb) for va, vb in zip(arrays_a[name], arrays_b[name])), (
            f"{name} differs"
        )
    nan = lambda v: (
        "nan" if isinstance(v, float) and v != v else v
    )  # a diverged epoch's loss equals itself
    strip = lambda h: [{k: nan(v) for k, v in e.items() if k != "seconds"} for e in h.epochs]
    assert strip(hist_a) == strip(hist_b)
    assert (hist_a.stop_reason, hist_a.best_epoch, hist_a.diverged_epoch) == (
        hist_b.stop_reason,
        hist_b.best_epoch,
        hist_b.diverged_epoch,
    )


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_resume_mid_epoch_is_bit_exact(tmp_path, dropout, schedule):
    # the same two steps in every process and every run (hash() of a tuple of floats is not:
    # PYTHONHASHSEED)
    rng = np.random.default_rng([int(dropout * 10), sorted(SCHEDULES).index(schedule)])
    stops = sorted(rng.choice(np.arange(1, 5 * STEPS + 1), size=2, replace=False).tolist())
    same_run(
        run(tmp_path / "a", dropout, schedule, None),
        run(tmp_path / "b", dropout, schedule, None, stops),
    )


@pytest.mark.parametrize("optimizer, fast", [("sgd", True), ("momentum", False)])
def test_resume_is_bit_exact_with_sgd_and_with_the_core_step(tmp_path, optimizer, fast):
    same_run(
        run(tmp_path / "a", 0.3, "cosine", None, optimizer=optimizer, fast=fast),
        run(tmp_path / "b", 0.3, "cosine", None, [23], optimizer=optimizer, fast=fast),
    )


@pytest.mark.parametrize(
    "optimizer, fast", [("adam", True), ("adam", False), ("adamw", True), ("rmsprop", True)]
)
def test_resume_is_bit_exact_with_adam_adamw_and_rmsprop(tmp_path, optimizer, fast, device):
    """Adam's and AdamW's fused step (and RMSprop's core step, the fast path does not cover it) from
    a checkpoint mid-epoch: moments and step count restored, so the bias corrections continue
    exactly."""
    a = run(tmp_path / "a", 0.3, "none", None, optimizer=optimizer, fast=fast, device=device)
    assert a[1].state_dict().get("t", 80) == 80  # 16 steps per epoch, 5 epochs
    same_run(
        a,
        run(
            tmp_path / "b",
            0.3,
            "none",
            None,
            [23, 40],
            optimizer=optimizer,
            fast=fast,
            device=device,
        ),
    )


def test_resume_is_bit_exact_with_batchnorm_on_each_device(tmp_path, device):
    """BatchNorm's running statistics travel in the checkpoint (they are only read in eval mode, by
    each epoch's validation, so a lost update would change val_loss in the history)."""
    a = run(tmp_path / "a", 0.3, "none", None, optimizer="adam", device=device, batch_norm=True)
    b = run(
        tmp_path / "b",
        0.3,
        "none",
        None,
        [21, 51],
        optimizer="adam",
        device=device,
        batch_norm=True,
    )
    assert any(k.endswith("running_var") for k in b[0].state_dict())
    same_run(a, b)


def test_resume_with_early_stopping_is_bit_exact(tmp_path):
    full = run(tmp_path / "a", 0.3, "constant", 1, epochs=12)
    assert full[2].stop_reason == "early_stopping", "the test needs a run that stops early"
    stop_epoch = len(full[2])
    same_run(full, run(tmp_path / "b", 0.3, "constant", 1, [16 * (stop_epoch - 2) + 5], epochs=12))


def test_a_stopped_run_cannot_pass_as_a_finished_one(tmp_path):
    """The check can fail: resuming from another step's checkpoint (a lost step) gives other
    bits."""
    a = run(tmp_path / "a", 0.3, "cosine", None)
    net, opt, hist, path = run(tmp_path / "b", 0.3, "cosine", None, [30])
    meta, arrays = checkpoint.load(path)
    assert meta["finished"] and meta["epoch"] == 5
    x, y, xv, yv = data()
    net2 = gn.mlp([20, 16, 12, 4], dropout=0.3, seed=7, device="cpu")
    opt2 = gn.Momentum(net2.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    with pytest.raises(
        Interrupted
    ):  # stop at step 30, then skip one step by editing the checkpoint
        fit(
            net2,
            gn.SoftmaxCrossEntropy(),
            opt2,
            x,
            y,
            epochs=5,
            batch_size=16,
            validation=(xv, yv),
            seed=3,
            schedule=SCHEDULES["cosine"](),
            checkpoint_path=path,
            interrupt=iter([False] * 29 + [True]).__next__,
        )
    meta, arrays = checkpoint.load(path)
    meta["step"] += 1
    checkpoint.save(path, {k: v for k, v in meta.items() if k not in ("format", "version")}, arrays)
    net3 = gn.mlp([20, 16, 12, 4], dropout=0.3, seed=7, device="cpu")
    opt3 = gn.Momentum(net3.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    hist3 = fit(
        net3,
        gn.SoftmaxCrossEntropy(),
        opt3,
        x,
        y,
        epochs=5,
        batch_size=16,
        validation=(xv, yv),
        seed=3,
        schedule=SCHEDULES["cosine"](),
        checkpoint_path=path,
        resume=True,
    )
    with pytest.raises(AssertionError):
        same_run(a, (net3, opt3, hist3, path))


def test_optimizer_state_dicts_round_trip():
    net = gn.mlp([5, 4, 3], seed=0, device="cpu")
    opt = gn.Momentum(net.parameters(), lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01)
    for v in opt.velocities:
        v[...] = np.random.default_rng(0).random(v.shape)
    state = opt.state_dict()
    net2 = gn.mlp([5, 4, 3], seed=1, device="cpu")
    opt2 = gn.Momentum(net2.parameters(), lr=0.5)
    opt2.load_state_dict(state)
    assert (opt2.lr, opt2.momentum, opt2.nesterov, opt2.weight_decay) == (0.1, 0.8, True, 0.01)
    assert all(np.array_equal(a, b) for a, b in zip(opt.velocities, opt2.velocities))
    with pytest.raises(ValueError, match="momentum optimizer, got 'sgd'"):
        opt2.load_state_dict(gn.SGD(net.parameters(), lr=0.1).state_dict())
    sgd = gn.SGD(net2.parameters(), lr=0.3)
    sgd.load_state_dict(gn.SGD(net.parameters(), lr=0.2, weight_decay=0.1).state_dict())
    assert (sgd.lr, sgd.weight_decay) == (0.2, 0.1)


def test_divergence_restores_the_last_finished_epoch(tmp_path):
    x, y, xv, yv = data()
    net = gn.mlp([20, 16, 12, 4], seed=7, device="cpu")
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=1, batch_size=16, seed=3)
    good = net.state_dict()
    opt.lr = 1e38  # certain to overflow within the next epoch
    hist = fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=3, batch_size=16, seed=4)
    assert hist.stop_reason == "diverged" and hist.diverged_epoch == 1 and len(hist) == 1
    assert not np.isfinite(hist.epochs[0]["loss"])
    for k, v in net.state_dict().items():
        assert np.array_equal(v, good[k]), k


def diverging(epoch):
    return 0.05 if epoch < 2 else 1e38  # certain to overflow within epoch 3


def test_divergence_after_a_resume_falls_back_to_the_epochs_start(tmp_path):
    """The divergence guard's fallback (the state at the start of the diverging epoch) travels in a
    mid-epoch checkpoint: interrupted inside that epoch and resumed, the run puts back the same
    weights and velocities as an uninterrupted one (not those of the step it resumed at); an
    epoch-end checkpoint carries no copy."""
    a = run(tmp_path / "a", 0.0, diverging, None)
    assert a[2].stop_reason == "diverged" and a[2].diverged_epoch == 3 and len(a[2]) == 3
    b = run(tmp_path / "b", 0.0, diverging, None, [2 * STEPS + 5])
    same_run(a, b)
    c = run(
        tmp_path / "c", 0.0, diverging, None, [2 * STEPS]
    )  # epoch 2's last step: a fallback replaced at its end
    same_run(a, c)
    meta, arrays = checkpoint.load(b[3])  # written as the run stopped, at an epoch's end
    assert meta["callbacks"]["DivergenceGuard"] == {"mid_epoch": False, "arrays": {}}
    assert not [k for k in arrays if k.startswith("callbacks/")]


@pytest.mark.parametrize(
    "content, says",
    [
        (
            b"not a zip file at all",
            "not a readable gpunet checkpoint .a checkpoint is a .npz archive",
        ),
        ("model", "not a gpunet checkpoint .*a model file"),
        ("foreign", "expected a gpunet-checkpoint version 2 file, got 'other'"),
    ],
)
def test_damaged_or_foreign_checkpoints_are_named(tmp_path, content, says):
    path = tmp_path / "checkpoint.npz"
    if content == "model":  # a model file is a valid npz, but not a checkpoint
        gn.mlp([3, 2], seed=0, device="cpu").save(path)
    elif content == "foreign":
        np.savez(path, __checkpoint__=np.frombuffer(b'{"format": "other", "version": 1}', np.uint8))
    else:
        path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=says):
        checkpoint.load(path)


def test_checkpoint_of_another_network_is_refused(tmp_path):
    x, y, xv, yv = data()
    net, opt = gn.mlp([20, 8, 4], seed=0, device="cpu"), None
    opt = gn.SGD(net.parameters(), lr=0.1)
    fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=1, checkpoint_path=tmp_path / "c.npz")
    other = gn.mlp([20, 9, 4], seed=0, device="cpu")
    with pytest.raises(checkpoint.CheckpointError, match="different network"):
        fit(
            other,
            gn.SoftmaxCrossEntropy(),
            gn.SGD(other.parameters(), lr=0.1),
            x,
            y,
            epochs=2,
            checkpoint_path=tmp_path / "c.npz",
            resume=True,
        )
    meta = checkpoint.read_meta(tmp_path / "c.npz")
    json.dumps(meta)  # the record is plain JSON data
