"""The package's shape: imports flow one way (no cycles), the CLI starts light, importing or calling the
library leaves the caller's process alone, and impossible recipe/model combinations are clear errors."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import foldercnn

PACKAGE = Path(foldercnn.__file__).parent
# lower layers never import higher ones: base < data < models < evaluation < training < deploy < entry points
LAYERS = {
    "version": 0,
    "errors": 0,
    "files": 0,
    "run_folder": 0,
    "runtime": 0,
    "plots": 0,
    "events": 0,
    "data": 1,
    "models": 2,
    "evaluation": 3,
    "training": 4,
    "deploy": 5,
    "cli": 6,
    "cli_parser": 6,
    "demo": 6,
    "__init__": 6,
    "__main__": 7,
}


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path):
    """foldercnn modules imported anywhere in a file (top level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("foldercnn")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("foldercnn"):
                for a in node.names:  # `from . import runtime` imports the module foldercnn.runtime
                    sub = f"{target}.{a.name}"
                    found.add(
                        sub
                        if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir()
                        else target
                    )
    return found - {name}


def module_graph():
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_imports():
    import importlib

    for name in module_graph():
        if name != "foldercnn.__main__":
            importlib.import_module(name)


def test_no_import_cycles():
    graph = module_graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "active"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "active":
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def layer(name):
    parts = name.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_imports_flow_one_way():
    wrong = [
        f"{a} imports {b}"
        for a, targets in module_graph().items()
        for b in targets
        if a != "foldercnn" and b != "foldercnn" and layer(b) > layer(a)
    ]
    assert not wrong, wrong


PROBE = """
import json, sys
from foldercnn.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib', 'sklearn', 'fastapi'})
print(json.dumps(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["train", "--help"]])
def test_version_and_help_import_no_heavy_library(argv):
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert json.loads(r.stderr.strip().splitlines()[-1]) == []
    assert "foldercnn" in r.stdout


LIBRARY_PROBE = """
import json, sys
import matplotlib
matplotlib.use("svg")
import torch
torch.set_num_threads(1)
import foldercnn
foldercnn.inspect(sys.argv[1], out_dir=sys.argv[2] + "/inspect")
foldercnn.train(sys.argv[1], sys.argv[2] + "/run", epochs=1, image_size=16, log=lambda *a: None)
print(json.dumps({"backend": matplotlib.get_backend(), "threads": torch.get_num_threads(),
                  "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


@pytest.mark.slow
def test_importing_and_calling_the_library_changes_nothing_in_the_callers_process(shapes_dirs, tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", LIBRARY_PROBE, str(shapes_dirs[0]), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"backend": "svg", "threads": 1, "pyplot": False}


COMBINATIONS = [
    (["--recipe", "transfer", "--model", "fast-cnn"], "fast-cnn has none"),
    (["--recipe", "transfer", "--model", "tutorial-cnn"], "tutorial-cnn has none"),
    (["--recipe", "seed", "--image-size", "40"], "between 46 and 1024, got 40"),
    (["--recipe", "fast", "--image-size", "4"], "between 8 and 1024, got 4"),
    (["--recipe", "transfer", "--image-size", "16"], "between 32 and 1024, got 16"),
    (["--image-size", "5000"], "got 5000"),
    (["--recipe", "fast", "--fine-tune"], "follows a linear probe"),
    (["--recipe", "seed", "--model", "effnet-lite0", "--fine-tune"], "follows a linear probe"),
    (["--recipe", "fast", "--model", "hand-landmarks"], "not trained on pixels"),
    (["--recipe", "transfer", "--refit"], "--refit is for recipes trained by the loop"),
    (["--recipe", "probe", "--refit"], "--refit is for recipes trained by the loop"),
    (["--recipe", "fast", "--no-fine-tune", "--fine-tune"], "follows a linear probe"),
    (["--refit", "--time-budget", "30"], "--refit cannot be combined with a time budget"),
    (["--refit", "--val", "."], "a validation folder holds none out"),
    (
        ["--model", "resnet-9000"],
        "unknown model 'resnet-9000' (available: effnet-lite0, effnet-lite1, effnet-lite2, fast-cnn, hand-landmarks, "
        "tutorial-cnn)",
    ),
    (["--recipe", "turbo"], "unknown recipe 'turbo' (available: seed, fast, transfer, probe, robust, hands)"),
]  # out-of-range numbers (--epochs 0, --uncertain-below 1.5) are the parser's: tests/test_hostile.py

MAIN_PROBE = """
import contextlib, io, json, sys, traceback
from foldercnn.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException:
            code, err = "traceback", io.StringIO(traceback.format_exc())
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def test_impossible_recipe_and_model_combinations_are_one_clear_line(shapes_dirs, tmp_path):
    """Each refused with exit code 2 and one line naming the valid choices, before anything is written.
    (Run through cli.main in one process; test_cli runs the real command for such errors too.)"""
    argvs = [["train", str(shapes_dirs[0]), "--out", str(tmp_path / "run"), *options] for options, _ in COMBINATIONS]
    r = subprocess.run(
        [sys.executable, "-c", MAIN_PROBE, json.dumps(argvs)], capture_output=True, text=True, timeout=300
    )
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for (options, message), (code, err) in zip(COMBINATIONS, results):
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (options, code, err)
    assert not (tmp_path / "run").exists()
