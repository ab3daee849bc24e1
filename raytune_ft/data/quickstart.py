"""A small alpaca dataset built from what every machine has: the Python standard library's own sources.

Each example pairs a documented module-level function's first docstring paragraph (the instruction) with
the function's code without its docstring (the output). Only plain functions qualify: public, undecorated,
3-30 lines of code, a docstring paragraph of 20-300 characters. Files are walked in sorted order (tests,
private modules, site-packages and demos excluded), so the result is deterministic for a given Python installation.

    python -m raytune_ft.data.quickstart OUT_DIR [--max-examples N] [--eval-fraction F]
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

from raytune_ft.data.split import split_file

SKIP_DIRS = {
    "test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__",
    "lib2to3", "turtledemo", "ensurepip", "tkinter", "config",
}  # fmt: skip
MIN_LINES, MAX_LINES = 3, 30
MIN_DOC, MAX_DOC = 20, 300


def stdlib_functions(root: str | Path | None = None) -> Iterator[dict[str, str]]:
    """Alpaca rows ``{instruction, output}`` from the stdlib at ``root`` (this interpreter's by default)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in _python_files(root):
        for row in _functions_in(path):
            if row["output"] not in seen:
                seen.add(row["output"])
                yield row


def build_quickstart_data(
    out_dir: str | Path, max_examples: int = 2000, eval_fraction: float | None = 0.05, seed: int = 0
) -> tuple[Path, Path | None]:
    """Write ``quickstart.train.jsonl`` and ``quickstart.eval.jsonl`` (or only ``quickstart.jsonl`` when
    ``eval_fraction`` is None) into ``out_dir``; returns their paths. More candidates than ``max_examples``
    are thinned evenly across the library."""
    rows = list(stdlib_functions())
    if len(rows) > max_examples:
        rows = [rows[i * len(rows) // max_examples] for i in range(max_examples)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    everything = out / "quickstart.jsonl"
    with open(everything, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if eval_fraction is None:
        return everything, None
    train, evals = split_file(everything, eval_fraction, seed)
    everything.unlink()
    return train, evals


def _python_files(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        for name in sorted(files):
            if name == "__init__.py" or (name.endswith(".py") and not name.startswith(("test_", "_"))):
                yield Path(folder) / name


def _functions_in(path: Path) -> Iterator[dict[str, str]]:
    try:
        raw = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        source = raw.decode(encoding)
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    lines = source.splitlines(keepends=True)
    for node in tree.body:
        row = _example(node, lines)
        if row is not None:
            yield row


def _example(node: ast.stmt, lines: list[str]) -> dict[str, str] | None:
    if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
        return None
    doc = ast.get_docstring(node)
    first = node.body[0]
    if not doc or len(node.body) < 2 or first.lineno == node.lineno or first.end_lineno is None:
        return None
    paragraph = re.sub(r"\s+", " ", doc.split("\n\n")[0]).strip()
    if not MIN_DOC <= len(paragraph) <= MAX_DOC:
        return None
    body = lines[first.end_lineno : node.end_lineno]
    while body and not body[0].strip():
        body = body[1:]
    code_lines = lines[node.lineno - 1 : first.lineno - 1] + body
    code = "".join(code_lines).rstrip() + "\n"
    if not MIN_LINES <= len(code_lines) <= MAX_LINES or "\t" in code:
        return None
    try:
        ast.parse(code)
    except SyntaxError:
        return None
    return {
        "instruction": f"Write a Python function `{node.name}({ast.unparse(node.args)})` that: {paragraph}",
        "output": code,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m raytune_ft.data.quickstart", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir")
    parser.add_argument("--max-examples", type=int, default=2000)
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, evals = build_quickstart_data(args.out_dir, args.max_examples, args.eval_fraction, args.seed)
    print(train)
    if evals is not None:
        print(evals)


if __name__ == "__main__":
    main()
