"""gpunet.files.strict: the one JSON rule (NaN and infinities are null), exact for float32, used by
the recipe's files and explain's --json alike."""

import json

import numpy as np

from gpunet import files
from gpunet.commands import train as recipe


def strict_loads(text):
    """json.loads that refuses the non-standard NaN/Infinity tokens Python's json would accept."""

    def refuse(token):
        raise AssertionError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_become_null_everywhere():
    obj = {
        "a": float("nan"),
        "b": [1.5, float("inf"), (-float("inf"), 2)],
        "c": {"d": np.float32("nan")},
        "e": np.array([[1.0, np.nan], [np.inf, -0.0]]),
        "f": np.float64(-np.inf),
        "g": "nan",
        "h": None,
    }
    got = files.strict(obj)
    assert got == {
        "a": None,
        "b": [1.5, None, [None, 2]],
        "c": {"d": None},
        "e": [[1.0, None], [None, -0.0]],
        "f": None,
        "g": "nan",
        "h": None,
    }
    strict_loads(json.dumps(got, allow_nan=False))  # json.dumps would raise on any NaN left


def test_numpy_values_become_plain_and_exact():
    x = np.array([0.1, 1 / 3, 3e-39], dtype=np.float32)  # 3e-39: a float32 subnormal
    got = files.strict(
        {"x": x, "i": np.int64(7), "t": np.bool_(True), "k": np.arange(3, dtype=np.uint8)}
    )
    assert type(got["i"]) is int and type(got["t"]) is bool and got["k"] == [0, 1, 2]
    back = np.array(strict_loads(json.dumps(got))["x"], dtype=np.float32)
    np.testing.assert_array_equal(back, x)  # every float32 reads back bit for bit


def test_recipe_writes_through_the_one_rule(tmp_path):
    path = tmp_path / "metrics.json"
    recipe.write_json(path, {"loss": [0.5, float("nan")], "lr": np.float32(0.25)})
    assert strict_loads(path.read_text()) == {"loss": [0.5, None], "lr": 0.25}
    assert not hasattr(recipe, "strict")  # one sanitizer, in files
