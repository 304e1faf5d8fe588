"""``gpunet train``'s flags have one source, :class:`TrainConfig`'s fields (type, default, help and
choices in their metadata): every field is a flag of the same name, the parser's defaults and the
defaults ``--help`` shows are the dataclass's, and ``--preset`` fills in only the flags not given
(one parse, no second look at argv)."""

import re
from dataclasses import fields

import pytest

from gpunet import cli
from gpunet.commands import flags
from gpunet.commands.train import OPTIMIZER_SETTINGS, PRESETS, TrainConfig

# the flags of gpunet train as released (its public interface): none may go or change its name
FLAGS = (
    "--data-dir --download --data --label-column --task --scale --hidden --activation --epochs "
    "--batch-size --optimizer --lr --momentum --nesterov --weight-decay --beta1 --beta2 --eps "
    "--alpha --centered --batch-norm --dropout --init --schedule --step-size --val-size --patience "
    "--target-loss --seed --device --out --no-plots --cuda-graph --log-dir --resume --overwrite "
    "--checkpoint-every --preset --augment --aug-rotation --aug-scale --aug-shear --aug-shift "
    "--aug-sigma --aug-alpha"
).split()
RUN_FLAGS = {
    "--out",
    "--resume",
    "--overwrite",
    "--checkpoint-every",
}  # train()'s arguments, not settings


def train_parser():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return sub.choices["train"]


def flag_of(f):
    return f.metadata.get("name", "--" + f.name.replace("_", "-"))


def test_every_setting_is_a_flag_of_its_name_and_no_other_flag_is():
    options = {s for a in train_parser()._actions for s in a.option_strings} - {"-h", "--help"}
    assert options == set(FLAGS)
    assert {flag_of(f) for f in fields(TrainConfig)} == set(FLAGS) - RUN_FLAGS


def test_the_parsers_defaults_are_the_dataclasss():
    args = cli.build_parser().parse_args(["train"])
    for f in fields(TrainConfig):
        assert getattr(args, f.name) == flags.default_of(f), f.name
    assert cli.train_config(args) == TrainConfig()


def help_text():
    """``gpunet train --help``'s entry of each flag, on one line: {flag: its metavar and help}."""
    found, flag = {}, None
    for line in train_parser().format_help().splitlines():
        entry = re.match(r"  (--[\w-]+)(.*)", line)
        if entry:
            flag, rest = entry.groups()
            found[flag] = rest.strip()
        elif flag and line.startswith(" " * 6):  # the entry goes on
            found[flag] += " " + line.strip()
        else:
            flag = None
    return found


def test_the_defaults_help_shows_are_the_dataclasss():
    shown = help_text()
    for f in fields(TrainConfig):
        default = flags.default_of(f)
        if default is None or isinstance(
            default, bool
        ):  # a flag without a value, or a default in words
            continue
        expect = flags.shown(default)
        text = shown[flag_of(f)]
        assert re.search(rf"\(default: {re.escape(expect)}[);:]", text), (f.name, expect, text)


@pytest.mark.parametrize(
    "flag, setting",
    [
        ("--lr", "lr"),
        ("--beta1", "beta1"),
        ("--beta2", "beta2"),
        ("--alpha", "alpha"),
        ("--weight-decay", "weight_decay"),
        ("--momentum", "momentum"),
        ("--eps", "eps"),
    ],
)
def test_each_optimizers_default_that_help_names_is_its_own(flag, setting):
    """The optimizer-dependent defaults (None in TrainConfig) are written in words; each value in
    them is one of OPTIMIZER_SETTINGS' for that setting, and each of those is written."""
    text = help_text()[flag]
    values = {v for own in OPTIMIZER_SETTINGS.values() for k, v in own.items() if k == setting}
    written = {float(n) for n in re.findall(r"(?<![\w.-])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])", text)}
    assert written == values, (written, values)


def test_a_flag_given_wins_over_the_preset_even_at_the_plain_default():
    """--dropout 0.2 is TrainConfig's default but not best's (0.0): given, it is kept."""
    args = cli.build_parser().parse_args(
        ["train", "--preset", "best", "--dropout", "0.2", "--no-plots"]
    )
    config = cli.train_config(args)
    assert config.dropout == 0.2 and config.plots is False and PRESETS["best"]["dropout"] == 0.0
    assert config.hidden == PRESETS["best"]["hidden"] and config.epochs == PRESETS["best"]["epochs"]


@pytest.mark.parametrize(
    "argv, changed",
    [
        (["--nesterov"], {"nesterov": True}),
        (["--no-plots"], {"plots": False}),
        (["--hidden"], {"hidden": []}),
        (["--batch-size", "full"], {"batch_size": None}),
        (
            ["--activation", "tanh", "relu", "--hidden", "4", "5"],
            {"activation": ["tanh", "relu"], "hidden": [4, 5]},
        ),
        (["--val-size", "0.1", "--seed", "3"], {"val_size": 0.1, "seed": 3}),
    ],
)
def test_each_kind_of_flag_sets_its_field(argv, changed):
    config = cli.train_config(cli.build_parser().parse_args(["train", *argv]))
    assert config == TrainConfig(**changed)


def test_an_augment_setting_without_augment_is_named_in_full_from_the_parse():
    """The parse says which flags were given (an abbreviation too): no second look at argv."""
    args = cli.build_parser().parse_args(["train", "--aug-rot", "5", "--aug-alpha=0"])
    with pytest.raises(
        cli.UserError, match="^--aug-alpha, --aug-rotation: a setting of --augment, got no"
    ):
        cli.train_config(args)
    assert cli.train_config(
        cli.build_parser().parse_args(["train", "--preset", "best", "--aug-rot", "5"])
    )
