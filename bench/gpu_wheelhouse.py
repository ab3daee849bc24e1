"""The wheelhouse for the GPU check (``make gpu-wheelhouse``): what the GPU test machine lacks, as wheels.

The GPU test machine (Python 3.12, torch + CUDA, transformers, peft, accelerate, triton, pyarrow, ...; see
bench/gpu_check.py) has no ray, deepspeed, bitsandbytes, pydantic, liger-kernel or jsonschema, and reaches
no package index. What it lacks travels with the checkout, at most 64 MiB per run *including* the checkout
(about 1 MiB), so the wheels are split into two git-ignored folders of at most 60 MiB each, one per run:

  .whl1/  part 1 (embedded Ray, LoRA, ZeRO-2/3, Liger): ray (rebuilt without ``ray/jars/``, the Java
          workers' 31 MiB jar, ``ray/dashboard/client/build``, the web UI, and RLlib, Serve and Ray LLM),
          the pydantic stack, the jsonschema stack (a ray core requirement), tensorboardX (ray.train/tune's),
          hjson (deepspeed's), liger-kernel, transformers (the project's version; the machine's is older)
          and deepspeed, built here from its source distribution with DS_BUILD_OPS=0: a pure-Python wheel
          (no op compiled ahead of time; DeepSpeed detects CUDA at run time and JIT-builds an op with the
          machine's nvcc only if one is used), so the GPU machine spends no time building it.
  .whl2/  part 2 (QLoRA, no Ray): bitsandbytes (its wheel carries the CUDA 13.0 library), the pydantic
          stack, liger-kernel and transformers.

Versions are the ones this project's .venv resolves (``PINS``; ``make gpu-wheelhouse`` says where the .venv
differs), so the GPU machine runs what the CPU tests ran. Nothing else on the GPU machine is replaced.

    python bench/gpu_wheelhouse.py            # download, rebuild ray, lay out .whl1/ and .whl2/
    python bench/gpu_wheelhouse.py --plan     # print the planned contents; downloads nothing
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
LIMIT_MIB = 60  # per folder: the run tool carries at most 64 MiB together with the ~1 MiB checkout
PYTHON_VERSION = "3.12"  # the GPU machine's python3 (3.12.3); --python-version for a local rehearsal

# Versions as resolved in the project's .venv (ray also matches docker/Dockerfile's RAY_VERSION).
# liger-kernel is not a project dependency: the newest release, which supports transformers 5.
PINS: dict[str, str] = {
    "ray": "2.60.0",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",
    "jsonschema": "4.26.0",
    "referencing": "0.37.0",
    "rpds-py": "2026.9.1",
    "jsonschema-specifications": "2025.9.1",
    "tensorboardX": "2.6.5",
    "hjson": "3.1.0",
    "deepspeed": "0.19.8",
    "bitsandbytes": "0.50.2",
    "liger-kernel": "0.8.5",
    # The GPU machine has transformers 5.17; rtf's recipe uses 5.2x's TrainingArguments
    # (activation_checkpointing), so the project's own version travels too (pure Python, 13 MiB).
    "transformers": "5.24.0",
}
PYDANTIC_STACK = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"]
FOLDERS: dict[str, list[str]] = {
    ".whl1": ["ray", *PYDANTIC_STACK, "jsonschema", "referencing", "rpds-py", "jsonschema-specifications",
              "tensorboardX", "hjson", "liger-kernel", "deepspeed", "transformers"],
    ".whl2": ["bitsandbytes", *PYDANTIC_STACK, "liger-kernel", "transformers"],
}
SDISTS = {"deepspeed"}  # no wheel on PyPI: the sdist is built into a wheel here (build_sdist_wheel)
# Parts of the ray wheel that rtf never uses: the Java workers' jar, the dashboard's web client, RLlib, Serve
# and Ray LLM (ray.tune imports RLlib only inside a try/except ImportError; nothing in ray.train imports them).
RAY_DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/llm/")
# pip matches each manylinux tag exactly; the GPU machine is Ubuntu 24.04 (glibc 2.39).
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]

SITE = "/tmp/site"
INSTALL_SCRIPT = "bench/gpu_install.sh"


def install_line(folder: str) -> str:
    """The command a GPU run starts with (bench/gpu_install.sh spells out the same pip calls)."""
    return f"bash {INSTALL_SCRIPT} {folder} && export PYTHONPATH={SITE}:$PWD"


# --------------------------------------------------------------------------- the ray wheel, rebuilt


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def rebuild_wheel(src: Path, dst: Path, drop: tuple[str, ...]) -> dict[str, int]:
    """Copy the wheel ``src`` to ``dst`` without the entries under the ``drop`` prefixes.

    Entries keep their ZipInfo (name, date, compression, and ``external_attr``: the executable bits of
    raylet and gcs_server, which pip restores from it); their contents are unchanged, so every kept line of
    ``RECORD`` stays valid, and ``RECORD`` loses the dropped files' lines, so pip's install and uninstall
    stay consistent. Returns counts of dropped files and bytes.
    """
    dropped = {"files": 0, "bytes": 0}
    with zipfile.ZipFile(src) as zin:
        # the wheel's own RECORD: top-level (ray vendors packages that carry their own dist-info)
        records = [i for i in zin.infolist() if i.filename.endswith(".dist-info/RECORD") and i.filename.count("/") == 1]
        if len(records) != 1:
            raise ValueError(f"{src.name}: expected one .dist-info/RECORD, found {len(records)}")
        record_name = records[0].filename
        tmp = dst.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w") as zout:
            for info in zin.infolist():
                if info.filename.startswith(drop):
                    dropped["files"] += 1
                    dropped["bytes"] += info.file_size
                    continue
                if info.filename == record_name:
                    continue  # written last, rewritten
                with zin.open(info) as fsrc, zout.open(_clone(info), "w") as fdst:
                    shutil.copyfileobj(fsrc, fdst, 1 << 20)
            lines = zin.read(record_name).decode().splitlines()
            kept = [ln for ln in lines if ln and not ln.split(",", 1)[0].startswith(drop)]
            rec_info = _clone(records[0])
            zout.writestr(rec_info, "\n".join(kept) + "\n")
    os.replace(tmp, dst)
    return dropped


def _clone(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    out = zipfile.ZipInfo(info.filename, info.date_time)
    out.compress_type = info.compress_type
    out.external_attr = info.external_attr
    out.create_system = info.create_system
    return out


def check_wheel(path: Path) -> None:
    """Every file a wheel's RECORD lists is in the wheel with that hash, and nothing else is (a broken
    rebuild fails here, not on the GPU machine)."""
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        rec = next(n for n in names if n.endswith(".dist-info/RECORD") and n.count("/") == 1)
        listed = set()
        for line in z.read(rec).decode().splitlines():
            if not line:
                continue
            name, digest, _size = line.rsplit(",", 2)
            listed.add(name)
            if name not in names:
                raise ValueError(f"{path.name}: RECORD lists {name}, which is not in the wheel")
            if digest and _record_hash(z.read(name)) != digest:
                raise ValueError(f"{path.name}: {name} does not match its RECORD hash")
        extra = names - listed - {n for n in names if n.endswith("/")}
        if extra:
            raise ValueError(f"{path.name}: files not in RECORD: {sorted(extra)[:5]}")


# --------------------------------------------------------------------------- downloading


def pip_download(name: str, version: str, dest: Path, python: str = sys.executable,
                 python_version: str = PYTHON_VERSION) -> Path:
    """Download one distribution for the GPU machine (cp312, manylinux x86_64) with pip, no dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    if name in SDISTS:
        # pip prepares an sdist's metadata even for a download; deepspeed's setup imports torch, which
        # this interpreter (the project's venv) has.
        cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:", "--no-build-isolation",
               "-d", str(dest), f"{name}=={version}"]
    else:
        cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp",
               *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), f"{name}=={version}"]
    env = dict(os.environ, DS_BUILD_OPS="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"pip download {name}=={version} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    new = set(dest.iterdir()) - before
    found = [p for p in (new or dest.iterdir()) if _dist_name(p.name) == _norm(name)]
    if not found:
        raise RuntimeError(f"pip download {name}=={version}: no file for it in {dest}")
    return found[0]


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _dist_name(filename: str) -> str:
    if filename.endswith(".whl"):
        return _norm(filename.split("-", 1)[0])
    if filename.endswith(".tar.gz"):
        return _norm(filename[: -len(".tar.gz")].rsplit("-", 1)[0])
    return ""


def build_sdist_wheel(sdist: Path, dest: Path, python: str = sys.executable) -> Path:
    """``pip wheel`` an sdist here with DS_BUILD_OPS=0 (deepspeed: a py3-none-any wheel, no ops compiled).
    --no-build-isolation: deepspeed's setup imports torch, which this interpreter (the .venv) has."""
    dest.mkdir(parents=True, exist_ok=True)
    name = _dist_name(sdist.name)
    version = sdist.name[: -len(".tar.gz")].rsplit("-", 1)[1]
    have = [p for p in dest.glob("*.whl") if _dist_name(p.name) == name and f"-{version}-" in p.name]
    if have:
        return have[0]
    env = dict(os.environ, DS_BUILD_OPS="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
                        str(sdist)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"pip wheel {sdist.name} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    built = [p for p in dest.glob("*.whl") if _dist_name(p.name) == name and f"-{version}-" in p.name]
    if not built or not built[0].name.endswith("-py3-none-any.whl"):
        raise RuntimeError(f"pip wheel {sdist.name}: expected a pure py3-none-any wheel, got {built}")
    return built[0]


def _fits(filename: str, python_version: str) -> bool:
    """A cached file serves this Python: an sdist, a pure wheel, or a cpXY wheel of that version."""
    if not filename.endswith(".whl"):
        return True
    tag = filename[:-4].split("-")[-3]
    return not tag.startswith("cp") or tag == "cp" + python_version.replace(".", "")


def venv_versions(python: Path) -> dict[str, str | None]:
    """What the project's venv has installed, for the names in PINS (None: not installed there)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\n"
            "print(json.dumps(out))")
    r = subprocess.run([str(python), "-c", code, *PINS], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def folder_report(folder: Path) -> dict[str, object]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "MANIFEST.json")
    size = sum(p.stat().st_size for p in files)
    return {"folder": folder.name, "files": {p.name: p.stat().st_size for p in files}, "bytes": size,
            "mib": round(size / MIB, 2), "limit_mib": LIMIT_MIB, "ok": size < LIMIT_MIB * MIB}


def plan() -> dict[str, object]:
    return {"pins": PINS, "folders": FOLDERS, "ray_drop": list(RAY_DROP), "limit_mib": LIMIT_MIB,
            "install": {f: install_line(f) for f in FOLDERS}}


def build(root: Path = REPO, cache: Path | None = None, venv_python: Path | None = None,
          python_version: str = PYTHON_VERSION) -> dict[str, object]:
    cache = cache or root / ".whl-cache"
    venv_python = venv_python or root / ".venv" / "bin" / "python"
    notes = []
    if venv_python.exists():
        have = venv_versions(venv_python)
        for n, v in PINS.items():
            if have.get(n) and have[n] != v:
                notes.append(f"{n}: the .venv has {have[n]}, the wheelhouse pins {v} (update PINS to match)")
    files: dict[str, Path] = {}
    for name, version in PINS.items():
        have_file = [p for p in cache.glob("*") if _dist_name(p.name) == _norm(name) and f"-{version}" in p.name
                     and _fits(p.name, python_version)]
        files[name] = have_file[0] if have_file else pip_download(name, version, cache, sys.executable,
                                                                  python_version)
        print(f"  {files[name].name}: {files[name].stat().st_size / MIB:.2f} MiB", flush=True)
    for name in SDISTS:
        files[name] = build_sdist_wheel(files[name], cache / "built")
        print(f"  {files[name].name}: built here with DS_BUILD_OPS=0, {files[name].stat().st_size / MIB:.2f} MiB",
              flush=True)
    ray_src = files["ray"]
    ray_out = cache / "rebuilt" / ray_src.name
    ray_out.parent.mkdir(parents=True, exist_ok=True)
    dropped = rebuild_wheel(ray_src, ray_out, RAY_DROP)
    check_wheel(ray_out)
    print(f"  ray rebuilt without {', '.join(RAY_DROP)}: {ray_src.stat().st_size / MIB:.1f} → "
          f"{ray_out.stat().st_size / MIB:.1f} MiB ({dropped['files']} files dropped)", flush=True)
    files["ray"] = ray_out
    reports = []
    for folder, names in FOLDERS.items():
        out = root / folder
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        for n in names:
            shutil.copy2(files[n], out / files[n].name)
        rep = folder_report(out)
        rep["install"] = install_line(folder)
        (out / "MANIFEST.json").write_text(json.dumps({**rep, "pins": {n: PINS[n] for n in names}}, indent=2))
        reports.append(rep)
    return {"folders": reports, "notes": notes, "ray_dropped": dropped}


# --------------------------------------------------------------------------- the CUDA image's pins


DOCKERFILE = REPO / "docker" / "Dockerfile"


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """``ARG NAME=default`` values of a Dockerfile (quotes stripped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("ARG ") and "=" in line:
            k, v = line[4:].split("=", 1)
            out[k.strip()] = v.strip().strip('"')
    return out


def image_pins(path: Path = DOCKERFILE) -> dict[str, str]:
    """The image's Python packages and versions, by distribution name."""
    a = dockerfile_args(path)
    return {"torch": a["TORCH_VERSION"], "ray": a["RAY_VERSION"], "flash-attn": a["FLASH_ATTN_VERSION"],
            "bitsandbytes": a["BITSANDBYTES_VERSION"], "deepspeed": a["DEEPSPEED_VERSION"],
            "liger-kernel": a["LIGER_KERNEL_VERSION"]}


def resolve(name: str, version: str, python_version: str = PYTHON_VERSION) -> dict[str, object]:
    """Does a binary of name==version exist for cpXY manylinux x86_64 on the index? pip resolves it from the
    index's metadata (``install --dry-run --report``), downloading no wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-deps", "--ignore-installed",
               "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
               *[a for p in PLATFORMS for a in ("--platform", p)], "--target", str(Path(tmp) / "t"),
               "--report", str(report), f"{name}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not report.exists():
            return {"name": name, "version": version, "binary": False,
                    "why": (r.stderr.strip().splitlines() or ["?"])[-1]}
        item = json.loads(report.read_text())["install"][0]
        reqs = item["metadata"].get("requires_dist") or []
        return {"name": name, "version": version, "binary": True,
                "file": item["download_info"]["url"].rsplit("/", 1)[-1],
                "cuda": [q.split(";")[0] for q in reqs if q.startswith(("cuda-toolkit", "nvidia-cuda-runtime"))]}


def check_pins() -> int:
    """The image's pins, resolved for its Python (Ubuntu 24.04: 3.12) against PyPI (the only index here)."""
    a = dockerfile_args()
    print(f"docker/Dockerfile: CUDA {a['CUDA_VERSION']}, torch {a['TORCH_VERSION']}+{a['TORCH_CUDA']} (PyTorch "
          f"index, not reachable from here), Python {PYTHON_VERSION} (Ubuntu {a['UBUNTU_VERSION']})")
    bad = 0
    for name, version in image_pins().items():
        r = resolve(name, version)
        if r["binary"]:
            extra = f"; requires {', '.join(r['cuda'])}" if r["cuda"] else ""  # type: ignore[arg-type]
            print(f"  {name}=={version}: wheel {r['file']}{extra}")
        elif name in ("flash-attn", "deepspeed"):
            # PyPI has only their sources: the image builds them (flash-attn compiles against the image's
            # torch with nvcc, MAX_JOBS and TORCH_CUDA_ARCH_LIST; deepspeed is pure Python, ops JIT-built)
            print(f"  {name}=={version}: no wheel on PyPI (sdist only): built in the image's devel stage")
        else:
            print(f"  {name}=={version}: NOT FOUND for cp{PYTHON_VERSION.replace('.', '')}: {r['why']}")
            bad += 1
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", action="store_true", help="print the planned contents; download nothing")
    ap.add_argument("--check-pins", action="store_true",
                    help="resolve docker/Dockerfile's pins for its Python on the index (no wheel downloaded)")
    ap.add_argument("--root", type=Path, default=REPO, help="where .whl1/ and .whl2/ go (the repo root)")
    ap.add_argument("--cache", type=Path, default=None, help="download cache (default ROOT/.whl-cache)")
    ap.add_argument("--python-version", default=PYTHON_VERSION,
                    help="target Python (3.12 for the GPU machine; another for a rehearsal on this machine)")
    a = ap.parse_args(argv)
    if a.plan:
        print(json.dumps(plan(), indent=2))
        return 0
    if a.check_pins:
        return check_pins()
    res = build(a.root, a.cache, python_version=a.python_version)
    bad = False
    for rep in res["folders"]:
        flag = "ok" if rep["ok"] else f"OVER the {LIMIT_MIB} MiB limit"
        print(f"{rep['folder']}/: {len(rep['files'])} files, {rep['mib']:.2f} MiB ({flag})")
        for name, size in rep["files"].items():
            print(f"    {size / MIB:7.2f} MiB  {name}")
        print(f"  install there: {rep['install']}")
        bad |= not rep["ok"]
    for n in res["notes"]:
        print(f"note: {n}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
