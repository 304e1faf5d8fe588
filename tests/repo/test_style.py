"""House rules that a reader can check by eye, checked by machine: no function in gpunet/ is longer
than 60 lines (its def line to its last line, docstring and comments included), so each reads on one
screen.

Exempt by name: the command line's argparse declarations (a flat list of flags reads best in one
place). A function of another lane that is still too long while it is being split goes into
``TOO_LONG_FOR_NOW`` with its length, and comes out when it is fixed (the list may only shrink: an
entry that is no longer needed fails too).
"""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gpunet"
LIMIT = 60
ARGPARSE_DECLARATIONS = {("cli.py", "build_parser")}
# (file, function): its length, while its lane splits it. Empty since issue 34's split (fit, train,
# _load, affine_elastic_bilinear); kept for a lane that must land a long function half-split.
TOO_LONG_FOR_NOW: dict[tuple[str, str], int] = {}


def long_functions(package=PACKAGE, limit=LIMIT) -> dict:
    """``{(path under package, qualified name): lines}`` of every function or method over ``limit``
    lines."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()

        def visit(node, prefix=""):
            for child in ast.iter_child_nodes(node):
                name = (
                    prefix + child.name
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    else prefix
                )
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > limit:
                        found[(rel, name)] = lines
                    visit(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, name + ".")
                else:
                    visit(child, prefix)

        visit(ast.parse(path.read_text()))
    return found


def test_no_function_in_gpunet_is_longer_than_60_lines():
    too_long = {
        k: v
        for k, v in long_functions().items()
        if k not in ARGPARSE_DECLARATIONS | set(TOO_LONG_FOR_NOW)
    }
    assert not too_long, "split these (lines today): " + ", ".join(
        f"gpunet/{f}: {n}() {lines}" for (f, n), lines in sorted(too_long.items())
    )


def test_the_exemptions_are_still_needed():
    found = long_functions()
    stale = [k for k in [*ARGPARSE_DECLARATIONS, *TOO_LONG_FOR_NOW] if k not in found]
    assert not stale, f"no longer over {LIMIT} lines, take them off the lists: {stale}"


def test_the_check_finds_a_long_function(tmp_path):
    """The checker itself can fail: a 61-line function (and a long method inside a class) are
    found."""
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    (tmp_path / "m.py").write_text(
        f"def short():\n    pass\n\n\ndef long():\n{body}\n    return 0\n\n\n"
        f"class K:\n    def method(self):\n{body.replace('    ', '        ')}\n"
        f"        return 0\n"
    )
    assert long_functions(tmp_path) == {("m.py", "long"): 61, ("m.py", "K.method"): 61}


# ------------------------------------------------------------------ each optimizer rule written
# once An optimizer's rule is written once, in gpunet/optimizers.py (``update_one``); the fast
# path's kernels for it are generated from it (gpunet/fast/rules.py). What may not appear in the
# back-ends (gpunet/fast/): kernel text that updates a rule's state or scales by a rule's constant,
# and Python functions that do arithmetic with a rule's constants. The one writing each back-end may
# keep, named here: the BLAS update, SGD and momentum as BLAS calls with the bias's product folded
# in (not an elementwise kernel).
RULE_CONSTANTS = {
    "lr",
    "gamma",
    "b1",
    "b2",
    "beta1",
    "beta2",
    "c1",
    "c2",
    "alpha",
    "mu",
    "root_c2",
    "decay",
}
RULE_TEXT = [
    re.compile(p)
    for p in (
        r"\b(gamma|b1|b2|c1|c2|alpha|mu|root_c2)\s*\*(?!\*)",  # a rule's constant scaling a value
        r"(?<![*T])(?<!float)(?<!double)\*\s*(gamma|b1|b2|c1|c2|alpha|mu|root_c2)\b",  # not "T* mu"
        r"\bsqrt\s*\(\s*v\b",
        # a rule's state written
        r"(?<![\w.\[])(vb|vW|velocities|buffer|grad_avg)(\[i\])?\s*[-+*/]?=(?!=)",
    )
]
# the BLAS back-end of SGD and momentum: its W and its bias halves (blas.LinearUpdate)
BACKEND_WRITINGS = {
    ("fast/blas.py", "LinearUpdate._step_w"),
    ("fast/blas.py", "LinearUpdate._step_b"),
}


def rule_writings(package=PACKAGE) -> dict:
    """``{(path under package, where): what}`` of every writing of an optimizer rule in
    ``package``'s
    fast/ back-ends other than the generator (fast/rules.py)."""
    found = {}
    for path in sorted((package / "fast").rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel == "fast/rules.py":
            continue

        def visit(node, prefix=""):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant):
                    continue  # a docstring
                if isinstance(child, ast.Constant) and isinstance(child.value, str):
                    hits = [p.pattern for p in RULE_TEXT if p.search(child.value)]
                    if hits:
                        found[(rel, f"line {child.lineno}")] = f"kernel text {child.value[:60]!r}"
                if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                    name = prefix + child.name
                    if isinstance(child, ast.FunctionDef):
                        args = child.args.args + child.args.kwonlyargs
                        params = {a.arg for a in args} & RULE_CONSTANTS
                        used = {
                            n.id
                            for op in ast.walk(child)
                            if isinstance(op, (ast.BinOp, ast.AugAssign))
                            for n in ast.walk(op)
                            if isinstance(n, ast.Name)
                        }
                        if params & used:
                            found[(rel, name)] = f"arithmetic with {sorted(params & used)}"
                    visit(child, name + ".")
                else:
                    visit(child, prefix)

        visit(ast.parse(path.read_text()))
    return found


def test_each_optimizer_rule_is_written_once_per_back_end():
    stray = {k: v for k, v in rule_writings().items() if k not in BACKEND_WRITINGS}
    assert not stray, "generate these from the rule (gpunet/fast/rules.py): " + "; ".join(
        f"gpunet/{f} {where}: {what}" for (f, where), what in sorted(stray.items())
    )
    stale = BACKEND_WRITINGS - set(rule_writings())
    assert not stale, f"no longer a writing of a rule, take them off BACKEND_WRITINGS: {stale}"


def test_the_rule_check_finds_a_hand_written_kernel(tmp_path):
    """The checker can fail: a numba Adam and a CUDA momentum written by hand in fast/ are found."""
    (tmp_path / "fast").mkdir()
    (tmp_path / "fast" / "kernels.py").write_text(
        "def adam(w, g, m, v, b1, b2, c1, c2, step, root_c2, eps):\n"
        "    for i in range(w.shape[0]):\n"
        "        m[i] = b1 * m[i] + c1 * g[i]\n"
        "LAYER = ('T g, T lr, T gamma', 'T w, T v', 'v = gamma * v + lr * g; w -= v;', 'k')\n"
    )
    found = set(rule_writings(tmp_path))
    assert found == {("fast/kernels.py", "adam"), ("fast/kernels.py", "line 4")}


def test_the_cuda_update_kernels_are_the_generated_ones():
    """Every update kernel in gpunet.fast.cuda is made by gpunet.fast.rules from an optimizer's
    rule:
    the per-parameter ones (RULES) are its kernel_spec, the layer kernels embed its dispatch."""
    from gpunet.fast import cuda, rules

    examples = rules.examples()
    assert set(cuda.RULES) == {name[len("gpunet_") :] for name in examples}
    for name, opt in examples.items():
        assert cuda.RULES[name[len("gpunet_") :]] == rules.kernel_spec(opt)
    for key, kind in (("layer_momentum_given", "momentum"), ("layer_sgd_given", "sgd")):
        assert (
            rules.dispatch(kind, cuda._RUN_TIME, lambda r: {"velocities": "v"}.get(r, r))
            in cuda.ELEMENTWISE[key][2]
        ), key
    # the eager layer kernels are RawKernels (the bias summed block-wide): W's element i, b's j
    on_w = {"w": "w[i]", "g": "g[i]", "velocities": "v[i]"}
    on_b = {"w": "b[j]", "g": "sum", "velocities": "vb[j]"}
    for name, kind in ((cuda.LAYER_MOMENTUM_NAME, "momentum"), (cuda.LAYER_SGD_NAME, "sgd")):
        for names in (on_w, on_b):
            rule = rules.dispatch(kind, cuda._RUN_TIME, lambda r, n=names: n.get(r, r))
            assert rule in cuda.RAW[name], name


def test_every_optimizer_has_a_kernel_for_each_combination_of_its_flags():
    """Adding an optimizer to the fused path is one place (its class in optimizers.OPTIMIZERS): its
    ``examples`` must reach every combination of its flags, so that every kernel is compiled in
    CI."""
    from gpunet.fast import rules
    from gpunet.optimizers import OPTIMIZERS

    for kind in OPTIMIZERS:
        made = [dict(o.flags()) for o in rules.examples().values() if o.kind == kind]
        assert len(made) == 2 ** len(made[0]), f"{kind}: examples reach only {made}"
