"""House rules, checked on the source with ``ast`` (no imports): the layout of a run directory is spelled in
one module, ``raytune_ft/rundir.py``; everything else takes the names from there."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raytune_ft"

# The files and name patterns of a run (or sweep) directory. Prose in docstrings may mention them; code may not.
RUN_DIR_NAMES = ("rtf_spec.yaml", "metrics.jsonl", "final_results.json", "trainer_state.json", "rtf_checkpoint.json",
                 "results.csv", "best.yaml", "sweep_spec.yaml", "checkpoint_manager_snapshot.json", "checkpoint-",
                 "trial-")
RUN_DIR_MODULE = "rundir.py"


def sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def test_run_directory_names_are_spelled_in_one_module():
    found = []
    for rel, tree in sources().items():
        if rel == RUN_DIR_MODULE:
            continue
        skip = docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                found += [f"{rel}:{node.lineno} {name!r}" for name in RUN_DIR_NAMES if name in node.value]
    assert not found, "run-directory names spelled outside raytune_ft/rundir.py:\n" + "\n".join(found)
    rundir = (PACKAGE / RUN_DIR_MODULE).read_text()
    assert all(name in rundir for name in RUN_DIR_NAMES)
