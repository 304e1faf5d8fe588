"""The one optimizer factory, ``gpunet.optimizers.make_optimizer``: every rule by its name with its
own defaults or the settings given, a setting of another rule refused by name, and no module of
gpunet but optimizers.py building an optimizer itself (the train command, explain and the sklearn
estimators call it)."""

import ast
import inspect
from pathlib import Path

import pytest

import gpunet as gn
from gpunet.optimizers import OPTIMIZERS, SETTINGS, make_optimizer

GPUNET = Path(gn.__file__).parent


def params():
    return gn.mlp([3, 4, 2], seed=0, device="cpu").parameters()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_rule_by_name_with_its_class_defaults(name):
    opt = make_optimizer(name, params(), lr=0.01)
    assert type(opt) is OPTIMIZERS[name]
    for arg, p in inspect.signature(OPTIMIZERS[name]).parameters.items():
        if p.default is not inspect.Parameter.empty and arg != "lr":
            assert getattr(opt, arg) == p.default, arg


@pytest.mark.parametrize(
    "name, settings, attrs",
    [
        ("sgd", {"lr": 0.3, "weight_decay": 0.1}, {"lr": 0.3, "weight_decay": 0.1}),
        (
            "momentum",
            {"lr": 0.2, "momentum": 0.5, "nesterov": True},
            {"momentum": 0.5, "nesterov": True},
        ),
        ("momentum", {"lr": 0.2, "momentum": 0.0}, {"momentum": 0.0}),
        ("adam", {"beta1": 0.8}, {"betas": (0.8, 0.999)}),
        (
            "adamw",
            {"beta2": 0.9, "eps": 1e-5},
            {"betas": (0.9, 0.9), "eps": 1e-5, "weight_decay": 1e-2},
        ),
        (
            "rmsprop",
            {"alpha": 0.9, "momentum": 0.3, "centered": True},
            {"alpha": 0.9, "momentum": 0.3, "centered": True},
        ),
        (
            "adam",
            {"lr": None, "eps": None, "weight_decay": None},
            {"lr": 1e-3, "eps": 1e-8, "weight_decay": 0.0},
        ),
    ],
)
def test_the_settings_given_reach_the_rule(name, settings, attrs):
    opt = make_optimizer(name, params(), **settings)
    for arg, value in attrs.items():
        assert getattr(opt, arg) == value, arg


@pytest.mark.parametrize(
    "name, settings, message",
    [
        (
            "nadam",
            {},
            "optimizer: expected one of sgd, momentum, adam, adamw, rmsprop, got 'nadam'",
        ),
        (
            "sgd",
            {"lr": 0.1, "momentum": 0.9},
            (
                r"momentum: expected a setting of sgd \(lr, weight_decay\), "
                r"got momentum=0.9"
            ),
        ),
        ("adam", {"centered": True}, "centered: expected a setting of adam"),
        ("rmsprop", {"beta1": 0.5}, "beta1: expected a setting of rmsprop"),
    ],
)
def test_a_name_or_setting_that_is_not_the_rules_is_refused(name, settings, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(name, params(), **settings)


def test_the_settings_table_names_each_rules_own_arguments():
    """SETTINGS is what each class takes (betas as beta1 and beta2): a new argument shows up
    here."""
    for name, cls in OPTIMIZERS.items():
        args = set(inspect.signature(cls).parameters) - {"params"}
        flat = (args - {"betas"}) | ({"beta1", "beta2"} if "betas" in args else set())
        assert set(SETTINGS[name]) == flat, name


def test_no_module_but_optimizers_builds_an_optimizer():
    """The train command, explain and the sklearn estimators go through make_optimizer."""
    built = []
    for path in GPUNET.rglob("*.py"):
        if path.name == "optimizers.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = (
                    node.func.attr
                    if isinstance(node.func, ast.Attribute)
                    else getattr(node.func, "id", "")
                )
                if fn in {cls.__name__ for cls in OPTIMIZERS.values()}:
                    built.append(f"{path.relative_to(GPUNET)}:{node.lineno} {fn}(...)")
    assert built == []
