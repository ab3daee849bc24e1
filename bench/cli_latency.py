"""Wall time of rtf's quick commands, each a fresh process (subprocess), as a user types them.

``rtf --help``, ``rtf validate jobspecs/quickstart.yaml`` and ``rtf plan jobspecs/quickstart.yaml``
(``plan`` preflights storage by default; ``plan --offline`` does not), run interleaved ``--reps`` times; the
median, min and max are reported, with ``python -c pass`` for the interpreter's own start. Targets:
under 1 s for ``--help`` and ``validate``. One extra run of each command in-process says which heavy
modules it imported (torch, transformers, ray, peft: none should be).

    python bench/cli_latency.py [--reps 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SPEC = "jobspecs/quickstart.yaml"
COMMANDS = {
    "python -c pass": [C.PY, "-c", "pass"],
    "rtf --help": [C.RTF, "--help"],
    f"rtf validate {SPEC}": [C.RTF, "validate", SPEC],
    f"rtf plan {SPEC}": [C.RTF, "plan", SPEC],
    f"rtf plan --offline {SPEC}": [C.RTF, "plan", "--offline", SPEC],
}
TARGETS = {"rtf --help": 1.0, f"rtf validate {SPEC}": 1.0}
HEAVY = ("torch", "transformers", "ray", "peft", "pyarrow", "deepspeed", "bitsandbytes")

_IMPORTS = """
import sys
from raytune_ft.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = [m for m in {heavy!r} if m in sys.modules]
print("RTF_HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def heavy_imports(args: list[str]) -> list[str]:
    _, p = C.run([C.PY, "-c", _IMPORTS.format(heavy=HEAVY), *args], check=False)
    for line in p.stderr.splitlines():
        if line.startswith("RTF_HEAVY="):
            return [m for m in line[len("RTF_HEAVY="):].split(",") if m]
    return ["?"]


def bench(reps: int = 7, log=print) -> dict[str, Any]:
    if not (C.REPO / SPEC).exists():
        raise SystemExit(f"{SPEC} not found in {C.REPO}")
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for cmd in COMMANDS.values():  # warm the page cache once; not counted
        C.run(cmd, check=False)
    for _ in range(reps):
        for name, cmd in COMMANDS.items():
            dt, p = C.run(cmd, check=False)
            if p.returncode != 0:
                raise RuntimeError(f"{name} exited {p.returncode}: {p.stderr[-2000:]}")
            times[name].append(dt)
    out: dict[str, Any] = {"reps": reps, "commands": {}}
    for name, ts in times.items():
        out["commands"][name] = {"median_s": C.median(ts), "min_s": min(ts), "max_s": max(ts), "all_s": ts,
                                 "target_s": TARGETS.get(name)}
        if name.startswith("rtf"):
            out["commands"][name]["heavy_imports"] = heavy_imports(COMMANDS[name][1:])
    return out


def table(result: dict[str, Any]) -> str:
    rows = []
    for name, r in result["commands"].items():
        target = r.get("target_s")
        ok = "-" if target is None else ("yes" if r["median_s"] < target else "NO")
        rows.append([name, r["median_s"], r["min_s"], r["max_s"], f"< {target:g} s: {ok}" if target else "-",
                     ",".join(r.get("heavy_imports", [])) or ("none" if "heavy_imports" in r else "-")])
    return C.fmt_table(["command", "median s", "min s", "max s", "target", "heavy modules imported"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    result = bench(a.reps)
    print(table(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0 if all(r["median_s"] < r["target_s"] for r in result["commands"].values() if r.get("target_s")) else 1


if __name__ == "__main__":
    sys.exit(main())
