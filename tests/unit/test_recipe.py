"""The training recipe's optimizer and BatchNorm settings (gpunet/commands/train.py): each
--optimizer builds its rule with the chosen optimizer's defaults or the values given, and a setting
of another optimizer is refused in one line naming it. The full runs are in test_cli.py and
test_long_runs.py."""

import numpy as np
import pytest

import gpunet as gn
from gpunet.commands import train as recipe
from gpunet.commands.train import ConfigError, TrainConfig
from gpunet.optimizers import make_optimizer


def built(**settings):
    config = TrainConfig(**settings)
    recipe.check(config)
    name, options = recipe.optimizer_choice(config)
    return config, make_optimizer(
        name, gn.mlp([3, 4, 2], seed=0, device="cpu").parameters(), **options
    )


@pytest.mark.parametrize(
    "settings, kind, expect",
    [
        ({}, gn.Momentum, dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.0)),
        ({"momentum": 0.0}, gn.SGD, dict(lr=0.05, weight_decay=0.0)),
        ({"optimizer": "sgd", "weight_decay": 1e-3}, gn.SGD, dict(lr=0.05, weight_decay=1e-3)),
        (
            {"optimizer": "adam"},
            gn.Adam,
            dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
        ),
        (
            {"optimizer": "adam", "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "lr": 0.002},
            gn.Adam,
            dict(lr=0.002, betas=(0.8, 0.99), eps=1e-6),
        ),
        ({"optimizer": "adamw"}, gn.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
        (
            {"optimizer": "rmsprop"},
            gn.RMSprop,
            dict(lr=1e-3, alpha=0.99, eps=1e-8, momentum=0.0, centered=False),
        ),
        (
            {"optimizer": "rmsprop", "alpha": 0.9, "momentum": 0.5, "centered": True},
            gn.RMSprop,
            dict(alpha=0.9, momentum=0.5, centered=True),
        ),
    ],
)
def test_each_optimizer_is_built_with_its_defaults_or_the_values_given(settings, kind, expect):
    config, opt = built(**settings)
    assert type(opt) is kind
    for name, value in expect.items():
        assert getattr(opt, name) == value, name


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"optimizer": "nadam"},
            "--optimizer: expected one of sgd, momentum, adam, adamw, rmsprop, got 'nadam'",
        ),
        (
            {"beta1": 0.5},
            "--beta1: a setting of --optimizer adam or adamw, got --optimizer momentum",
        ),
        (
            {"optimizer": "adam", "alpha": 0.9},
            "--alpha: a setting of --optimizer rmsprop, got --optimizer adam",
        ),
        (
            {"optimizer": "adamw", "momentum": 0.9},
            "--momentum: a setting of --optimizer momentum or rmsprop, got --optimizer adamw",
        ),
        (
            {"optimizer": "sgd", "eps": 1e-3},
            "--eps: a setting of --optimizer adam or adamw or rmsprop, got --optimizer sgd",
        ),
        (
            {"optimizer": "adam", "centered": True},
            "--centered: a setting of --optimizer rmsprop, got --optimizer adam",
        ),
        (
            {"optimizer": "rmsprop", "nesterov": True},
            "--nesterov: a setting of --optimizer momentum, got --optimizer rmsprop",
        ),
    ],
)
def test_a_setting_of_another_optimizer_is_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        recipe.check(TrainConfig(**settings))


def test_batch_norm_builds_a_batchnorm_network_which_the_fused_step_names():
    config = TrainConfig(batch_norm=True, hidden=[8], dropout=0.0)
    net, opt, _ = recipe.build(config, 6, 3, "cpu")
    assert [type(l).__name__ for l in net.layers] == ["Linear", "BatchNorm", "ReLU", "Linear"]
    why = gn.fast.why_not(net, gn.SoftmaxCrossEntropy(), opt, np.zeros(4, np.int64))
    assert (
        why
        == "layer 1 is BatchNorm, where a Linear was expected (fused on the GPU only: the CPU runs "
        "the core's step)"
    )


def test_a_checkpoint_from_before_the_optimizer_settings_resumes(tmp_path):
    """A checkpoint written before --optimizer, --beta1, ... existed holds none of them: its run was
    the default momentum run, which resumes; another optimizer is refused, naming the flag."""
    from dataclasses import asdict

    from gpunet import checkpoint

    old = {
        k: v
        for k, v in asdict(TrainConfig()).items()
        if k not in ("optimizer", "beta1", "beta2", "eps", "alpha", "centered", "batch_norm")
    }
    old.update(lr=0.05, momentum=0.9, weight_decay=0.0)
    net = gn.mlp(
        [3, 2], seed=0, device="cpu"
    )  # a whole checkpoint record (files are checked through)
    x, y = np.zeros((8, 3), np.float32), np.arange(8) % 2
    gn.fit(
        net,
        gn.SoftmaxCrossEntropy(),
        gn.SGD(net.parameters(), lr=0.1),
        x,
        y,
        epochs=2,
        checkpoint_path=tmp_path / "fit.npz",
    )
    record, arrays = checkpoint.load(tmp_path / "fit.npz")
    record = {k: v for k, v in record.items() if k not in ("format", "version")}
    checkpoint.save(
        tmp_path / recipe.CHECKPOINT, {**record, "run": {"config": old}, "finished": False}, arrays
    )
    meta = recipe.check_out_folder(tmp_path, TrainConfig(), resume=True, overwrite=False)
    assert meta["epoch"] == 2
    with pytest.raises(
        ConfigError, match="--optimizer: the checkpoint .* was trained with 'momentum', got 'adam'"
    ):
        recipe.check_out_folder(
            tmp_path, TrainConfig(optimizer="adam"), resume=True, overwrite=False
        )
