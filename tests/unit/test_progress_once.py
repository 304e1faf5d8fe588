"""One progress printer: ``gpunet train`` shows ``callbacks.Progress`` (the one ``fit(verbose=...)``
uses), and no other module of gpunet words an epoch line of its own."""

import ast
from pathlib import Path

import gpunet as gn
from gpunet import callbacks, cli

GPUNET = Path(gn.__file__).parent


def test_the_train_command_shows_callbacks_progress():
    shown = cli._progress()
    assert type(shown) is callbacks.Progress


def test_no_module_but_callbacks_formats_the_epoch_line():
    pieces = ("val_loss ", "val_acc ")  # the epoch line: "... val_loss 0.1877  val_acc 0.9600"
    writers = set()
    for path in GPUNET.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if any(p in node.value for p in pieces):
                    writers.add(path.relative_to(GPUNET).as_posix())
    assert writers == {"callbacks.py"}, writers
