"""House rules, checked on the source with ``ast`` (no imports): the layout of a run directory is spelled in
one module, ``raytune_ft/rundir.py``; everything else takes the names from there."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raytune_ft"

# The files and name patterns of a run (or sweep) directory. Prose in docstrings may mention them; code may not.
RUN_DIR_NAMES = ("rtf_spec.yaml", "metrics.jsonl", "final_results.json", "trainer_state.json", "rtf_checkpoint.json",
                 "results.csv", "best.yaml", "sweep_spec.yaml", "checkpoint_manager_snapshot.json", "rtf_stopped.json", "checkpoint-",
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


# --------------------------------------------------------------------------- layers

# Low to high; a module may import its own layer and the ones below, never one above (nor, anywhere, another
# module's private names). Within launch/sweep: launch.trainer < sweep < launch.driver (the driver runs a
# sweep), which the acyclic check below keeps honest.
LAYERS: list[tuple[str, ...]] = [
    ("raytune_ft", "raytune_ft.errors"),
    ("raytune_ft.spec",),
    ("raytune_ft.storage", "raytune_ft.rundir"),
    ("raytune_ft.data", "raytune_ft.checkpoints"),
    ("raytune_ft.plan", "raytune_ft.render_plan", "raytune_ft.estimate"),
    ("raytune_ft.train",),
    ("raytune_ft.launch", "raytune_ft.sweep"),
    ("raytune_ft.tools",),
    ("raytune_ft.cli", "raytune_ft.__main__"),
]
HEAVY = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes")


def module_name(rel: str) -> str:
    parts = ["raytune_ft", *Path(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer of tests/test_layout.py"
    return rank


def imports(module: str, tree: ast.Module, known: set[str]) -> list[tuple[int, str, list[str]]]:
    """(line, imported raytune_ft module, names taken from it) for every import, at any depth."""
    out = []
    package = module if module in known and any(k.startswith(module + ".") for k in known) else \
        module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "raytune_ft"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "raytune_ft":
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                out.append((node.lineno, target, [] if target != base else [a.name]))
    return out


def graph() -> tuple[dict[str, list[tuple[int, str, list[str]]]], dict[str, str]]:
    trees = {module_name(rel): (rel, tree) for rel, tree in sources().items()}
    known = set(trees)
    return {m: imports(m, t, known) for m, (_, t) in trees.items()}, {m: rel for m, (rel, _) in trees.items()}


def test_no_module_imports_a_higher_layer_or_another_modules_private_names():
    edges, files = graph()
    wrong = []
    for module, deps in edges.items():
        for line, target, names in deps:
            if layer(target) > layer(module):
                wrong.append(f"{files[module]}:{line} {module} (layer {layer(module)}) imports {target} "
                             f"(layer {layer(target)})")
            wrong += [f"{files[module]}:{line} {module} imports the private name {target}.{n}"
                      for n in names if n.startswith("_") and target != module]
    assert not wrong, "\n".join(wrong)


def test_the_module_graph_has_no_cycles():
    edges, files = graph()
    succ = {m: sorted({t for _, t, _ in deps if t != m}) for m, deps in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in succ.get(m, []):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(succ):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles (module-level or inside functions):\n" + "\n".join(cycles)


def test_files_and_functions_stay_small():
    """Files under ~600 lines, functions under ~80, except the worker's linear recipe and two long readers."""
    long_ok = {("train/recipe.py", "_run"), ("tools/source.py", "_resolve_on"), ("tools/merge.py", "merge")}
    big = []
    for rel, tree in sources().items():
        n = len((PACKAGE / rel).read_text().splitlines())
        if n > 650:  # "about 600": spec/models.py, the schema, is 625
            big.append(f"{rel}: {n} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, node.name) not in long_ok:
                length = node.end_lineno - node.lineno + 1
                if length > 85:
                    big.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not big, "\n".join(big)


def test_the_driver_starts_and_checks_data_without_torch(tmp_path):
    """`rtf submit` reads every data row before Ray starts; the driver module and that check must not load
    torch, transformers, peft or deepspeed (seconds per submit)."""
    import json
    import subprocess
    import sys

    import yaml

    from tests.specs import base_doc

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(4)))
    doc = base_doc(storage={"path": str(tmp_path / "runs")})
    doc["data"]["train"]["path"] = str(data)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    code = (
        "import sys, raytune_ft.launch.driver, raytune_ft.launch.local\n"
        "from raytune_ft.data.pipeline import check_data\n"
        "from raytune_ft.spec import load_spec\n"
        f"assert check_data(load_spec({str(tmp_path / 's.yaml')!r})) == 0\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the driver imports heavy modules: {out.stdout}"
