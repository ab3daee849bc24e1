"""The GPU readiness check (bench/gpu_check.py, bench/gpu_wheelhouse.py, bench/gpu_install.sh) on CPU:
the dry run end to end, and the pieces that need no GPU. Nothing here downloads anything."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check as GC  # noqa: E402
import gpu_wheelhouse as W  # noqa: E402

# --------------------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("dry")
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return r, out


def _row(text: str, name: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no table row for {name}:\n{text}")


def test_dry_run_lists_every_subcheck_with_its_plan(dry):
    from raytune_ft.plan import memory_estimate
    from raytune_ft.spec import spec_from_dict

    r, out = dry
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    assert "1,235,814,400 parameters" in text  # the Llama-3.2-1B shape
    assert "== part 1" in text and "== part 2" in text
    for part in (1, 2):
        names = [n for n, _, _ in GC.subchecks(part)]
        for name in names:
            _row(text, name)
        doc = json.loads((out / f"gpu_check_part{part}.dry.json").read_text())
        assert set(doc["plans"]) == set(names) - {"fixture"}
        assert doc["tolerances"] == GC.TOL
    # LoRA r 16 on every linear layer of the 1B shape; full fine-tuning trains every parameter
    assert _row(text, "lora_rtf")[2] == "11,272,192"
    assert _row(text, "zero2")[2] == "1,235,814,400"
    assert _row(text, "zero3")[1] == "full ZeRO-3"
    # the plan column is rtf's own memory estimate of the very spec the GPU run submits
    ns = GC.parser().parse_args([], namespace=GC.Config())
    for name, kind, ds in (("lora_rtf", "lora", None), ("zero3", "full", 3), ("qlora", "qlora", None)):
        spec = spec_from_dict(GC.spec_doc(kind, GC.PLACEHOLDER_FX, "/tmp/x", ns, deepspeed=ds))
        est = memory_estimate(spec, arch=GC.G.arch()).gib()["total"]
        assert float(_row(text, name)[4]) == pytest.approx(est, abs=0.01)
    # GFLOP/token: 4N + 6N_trainable + A for LoRA, 6N + A for full (N = 1,235,814,400 incl. the tied head)
    lora, full = float(_row(text, "lora_rtf")[3]), float(_row(text, "zero_plain")[3])
    assert full > lora > 4 * 1.2358144e9 / 1e9
    assert "install there: bash bench/gpu_install.sh .whl1" in text
    assert re.search(r"wheelhouse \.whl1/: (not built here|\d+ files, [\d.]+ MiB \(limit 60 MiB: ok\))", text)


def test_dry_run_specs_validate_for_every_subcheck():
    from raytune_ft.plan import deepspeed_config
    from raytune_ft.spec import spec_from_dict

    ns = GC.parser().parse_args([], namespace=GC.Config())
    for stage in (2, 3):
        spec = spec_from_dict(GC.spec_doc("full", GC.PLACEHOLDER_FX, "/tmp/x", ns, deepspeed=stage))
        cfg = deepspeed_config(spec)
        assert cfg["zero_optimization"]["stage"] == stage and cfg["bf16"]["enabled"] is True
        assert spec.training.gradient_checkpointing is True
    q = spec_from_dict(GC.spec_doc("qlora", GC.PLACEHOLDER_FX, "/tmp/x", ns))
    assert q.training.optimizer == "paged_adamw_8bit"
    assert (q.method.quantization.quant_type, q.method.quantization.double_quant) == ("nf4", True)
    lora = spec_from_dict(GC.spec_doc("lora", GC.PLACEHOLDER_FX, "/tmp/x", ns))
    assert lora.compute.gpus_per_worker == 1 and lora.training.max_steps == 60 and lora.data.packing
    with pytest.raises(ValueError, match="unknown overrides"):
        GC.spec_doc("lora", GC.PLACEHOLDER_FX, "/tmp/x", ns, bogus=1)


def test_without_a_gpu_the_real_check_refuses_clearly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--part", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == GC.NO_GPU_EXIT
    assert "needs an NVIDIA GPU" in r.stderr and "--dry-run" in r.stderr


# --------------------------------------------------------------------------- bookkeeping and the table


def test_subchecks_record_ok_failed_broken_and_skipped(tmp_path):
    res = GC.Results(tmp_path / "r.json", {"part": 1})
    far = GC.time.time() + 1000

    def failing():
        a = GC.Asserts()
        a.check("loss falls", False, first5=11.8, last5=11.9)
        return a.done({"tokens_per_s": 1234.0})

    GC.run_sub(res, "lora_rtf", lambda: {"tokens_per_s": 50_000.0, "mfu": 0.41, "loss_first5": 11.8,
                                        "loss_last5": 9.2}, 1, far)
    GC.run_sub(res, "hf_baseline", failing, 1, far)
    GC.run_sub(res, "attention", lambda: 1 / 0, 1, far)
    GC.run_sub(res, "zero3", lambda: {}, 100, GC.time.time() + 5)
    doc = json.loads((tmp_path / "r.json").read_text())  # written after every sub-check
    by = {c["name"]: c for c in doc["checks"]}
    assert by["lora_rtf"]["ok"] is True
    assert by["hf_baseline"]["ok"] is False and by["hf_baseline"]["tokens_per_s"] == 1234.0
    assert by["hf_baseline"]["assertions"][0]["what"] == "loss falls"
    assert by["attention"]["ok"] is False and "ZeroDivisionError" in by["attention"]["error"]
    assert by["zero3"]["ok"] is None and "out of time budget" in by["zero3"]["skipped"]
    assert not res.ok
    t = GC.table(res)
    lines = t.splitlines()
    assert lines[0].split("|")[1].strip() == "sub-check" and len(lines) == 2 + 4
    assert "50,000 tok/s" in t and "MFU 41.0%" in t and "loss 11.800->9.200" in t
    assert "| FAILED" in t and "| skipped" in t


def test_tolerance_helpers():
    a = GC.Asserts()
    GC.loss_falls([11.8] * 5 + [10.0] * 5, a)
    GC.compare_losses([11.0, 10.0, 9.0], [11.01, 10.1, 9.1], 5e-3, 2e-2, "x", a)
    assert all(x["ok"] for x in a.items)
    b = GC.Asserts()
    GC.loss_falls([11.8] * 10, b)
    GC.compare_losses([11.0, 10.0], [11.2, 10.0], 5e-3, 2e-2, "x", b)
    GC.memory_vs_plan(30.0, {"total": 20.0, "total_without_overhead": 18.5}, b)
    assert [x["ok"] for x in b.items] == [False, True, False, True, False]
    with pytest.raises(GC.CheckFailed) as e:
        b.done({"k": 1})
    assert e.value.data["k"] == 1 and "loss falls" in str(e.value)


# --------------------------------------------------------------------------- attention on CPU


def _tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def _examples(n: int = 10):
    import torch

    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(1, 128, (4 + (i * 7) % 23,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


@pytest.fixture
def eager_compile(monkeypatch):
    """transformers wraps flex_attention and its BlockMask builder in torch.compile; on CPU that is minutes of
    C++ builds per shape for a tiny model. Here the same functions run uncompiled: same masks, same math."""
    import transformers.integrations.flex_attention as tfa
    import transformers.masking_utils as tmu
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    monkeypatch.setattr(tfa.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    monkeypatch.setattr(tmu, "create_block_mask", lambda *a, **k: create_block_mask(*a, **{**k, "_compile": False}))


def test_attention_variants_give_the_same_loss_on_cpu(eager_compile):
    """The check's own comparison (padded SDPA, packed SDPA, packed flex_attention), on a tiny fp32 model:
    packed rows padded to a fixed width carry the same targets and the same loss as padded batches."""
    import torch

    from raytune_ft.data.packing import PaddedCollator, collate_packed, pack_examples

    model = _tiny_model()
    ex = _examples()
    width = 48
    padded = [(PaddedCollator(0)(ex[i:i + 4]), GC._ntok(ex[i:i + 4])) for i in range(0, len(ex), 4)]
    rows = pack_examples(ex, width)
    packed = [(GC.pad_rows(collate_packed(rows[i:i + 2], pad_token_id=0), width, 0), GC._ntok(rows[i:i + 2]))
              for i in range(0, len(rows), 2)]
    assert all(b["input_ids"].shape[1] == width for b, _ in packed)
    assert sum(n for _, n in packed) == sum(n for _, n in padded) == GC._ntok(ex)
    res = {}
    for name, impl, batches in (("sdpa_padded", "sdpa", padded), ("sdpa_packed", "sdpa", packed),
                                ("flex_packed", "flex_attention", packed)):
        model.set_attn_implementation(impl)  # flex_attention has no backward on CPU: losses only
        res[name] = GC.run_attention_variant(model, batches, torch.device("cpu"), timed=0 if "flex" in impl else 1)
    n = res["sdpa_padded"]["targets"]
    assert n == sum(len(e["input_ids"]) - 3 for e in ex)  # labels[1:] that are not -100
    for name in ("sdpa_packed", "flex_packed"):
        assert res[name]["targets"] == n
        assert res[name]["mean_loss"] == pytest.approx(res["sdpa_padded"]["mean_loss"], rel=1e-5)
    assert res["sdpa_padded"]["tokens_per_s"] > 0 and res["sdpa_packed"]["tokens_per_s"] > 0
    assert res["flex_packed"]["tokens_per_s"] is None
    assert torch.allclose(res["sdpa_packed"]["ce"], res["flex_packed"]["ce"], atol=1e-5)


def test_pad_rows_pads_as_a_separate_block():
    import torch

    b = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[-100, 6, 7]]),
         "position_ids": torch.tensor([[0, 1, 2]])}
    p = GC.pad_rows(b, 6, 0)
    assert p["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0]]
    assert p["labels"].tolist() == [[-100, 6, 7, -100, -100, -100]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2]]
    assert GC.pad_rows(b, 3, 0) is b


# --------------------------------------------------------------------------- the wheelhouse


def _record_line(name: str, data: bytes) -> str:
    h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={h},{len(data)}"


def _make_wheel(path: Path) -> Path:
    """A tiny wheel shaped like ray's: a package, a 'jar' to drop, an executable binary, a vendored dist-info."""
    files = {
        "demo/__init__.py": b"VALUE = 42\n",
        "demo/jars/big.jar": b"J" * 5000,
        "demo/dashboard/client/build/index.html": b"<html/>",
        "demo/dashboard/head.py": b"HEAD = 1\n",
        "demo/core/bin/raylet": b"#!/bin/sh\necho raylet\n",
        "demo/thirdparty/x-1.0.dist-info/RECORD": b"x,,\n",
        "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(n, d) for n, d in files.items()] + ["demo-1.0.dist-info/RECORD,,"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in files.items():
            info = zipfile.ZipInfo(n, (2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100755 if n.endswith("raylet") else 0o100644) << 16
            z.writestr(info, d)
        z.writestr("demo-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_rebuild_wheel_drops_prefixes_fixes_record_keeps_modes(tmp_path):
    src = _make_wheel(tmp_path / "demo-1.0-py3-none-any.whl")
    W.check_wheel(src)
    dst = tmp_path / "out" / src.name
    dst.parent.mkdir()
    dropped = W.rebuild_wheel(src, dst, ("demo/jars/", "demo/dashboard/client/build/"))
    assert dropped == {"files": 2, "bytes": 5000 + len(b"<html/>")}
    W.check_wheel(dst)  # every RECORD line matches, nothing unlisted
    with zipfile.ZipFile(dst) as z:
        names = z.namelist()
        assert "demo/jars/big.jar" not in names and "demo/dashboard/head.py" in names
        record = z.read("demo-1.0.dist-info/RECORD").decode()
        assert "jars" not in record and "client/build" not in record and "demo/dashboard/head.py" in record
        assert (z.getinfo("demo/core/bin/raylet").external_attr >> 16) & 0o111
    # pip (offline, this interpreter) installs the rebuilt wheel, executable bit included
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), str(dst)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not (site / "demo" / "jars").exists()
    assert os.stat(site / "demo" / "core" / "bin" / "raylet").st_mode & stat.S_IXUSR
    assert (site / "demo" / "__init__.py").read_text() == "VALUE = 42\n"


def test_check_wheel_catches_a_bad_rebuild(tmp_path):
    src = _make_wheel(tmp_path / "demo-1.0-py3-none-any.whl")
    bad = tmp_path / "bad-1.0-py3-none-any.whl"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, b"VALUE = 0\n" if info.filename == "demo/__init__.py" else data)
    with pytest.raises(ValueError, match="does not match its RECORD hash"):
        W.check_wheel(bad)


def test_install_script_installs_a_folder_offline(tmp_path):
    wh = tmp_path / ".whlX"
    wh.mkdir()
    _make_wheel(wh / "demo-1.0-py3-none-any.whl")
    site = tmp_path / "site"
    env = {**os.environ, "RTF_SITE": str(site), "RTF_GPU_PYTHON": sys.executable}
    r = subprocess.run(["bash", str(BENCH / "gpu_install.sh"), str(wh)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 wheel(s) and 0 sdist(s)" in r.stderr
    assert (site / "demo" / "__init__.py").exists()
    r = subprocess.run(["bash", str(BENCH / "gpu_install.sh"), str(tmp_path / "missing")], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and "make gpu-wheelhouse" in r.stderr


def test_wheelhouse_plan_and_limits(tmp_path):
    assert set(W.FOLDERS) == {".whl1", ".whl2"}
    assert "ray" in W.FOLDERS[".whl1"] and "deepspeed" in W.FOLDERS[".whl1"]
    assert "bitsandbytes" in W.FOLDERS[".whl2"] and "ray" not in W.FOLDERS[".whl2"]
    for names in W.FOLDERS.values():
        assert set(W.PYDANTIC_STACK) <= set(names) and all(n in W.PINS for n in names)
    assert W.install_line(".whl2") == "bash bench/gpu_install.sh .whl2 && export PYTHONPATH=/tmp/site:$PWD"
    assert W._dist_name("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl") == "pydantic_core"
    assert W._dist_name("deepspeed-0.19.8.tar.gz") == "deepspeed"
    assert W._fits("rpds_py-1-cp312-cp312-manylinux2014_x86_64.whl", "3.12")
    assert not W._fits("rpds_py-1-cp311-cp311-manylinux2014_x86_64.whl", "3.12")
    assert W._fits("hjson-3.1.0-py3-none-any.whl", "3.12")
    f = tmp_path / ".whl1"
    f.mkdir()
    (f / "a.whl").write_bytes(b"x" * 1000)
    (f / "MANIFEST.json").write_text("{}")
    rep = W.folder_report(f)
    assert rep["ok"] and rep["bytes"] == 1000 and list(rep["files"]) == ["a.whl"]
    with open(f / "big.whl", "wb") as fh:  # sparse: 61 MiB without writing them
        fh.truncate(61 * W.MIB)
    assert not W.folder_report(f)["ok"]


def test_built_wheelhouse_folders_fit_when_present():
    """After `make gpu-wheelhouse` (not in CI): each folder is under the limit and holds its pinned files."""
    present = [f for f in W.FOLDERS if (REPO / f).is_dir()]
    if not present:
        pytest.skip("make gpu-wheelhouse has not been run here")
    for folder in present:
        rep = W.folder_report(REPO / folder)
        assert rep["ok"], rep
        for name in W.FOLDERS[folder]:
            assert any(W._dist_name(f) == W._norm(name) and f"-{W.PINS[name]}" in f for f in rep["files"]), name
        if folder == ".whl1":
            ray = next(REPO / folder / f for f in rep["files"] if f.startswith("ray-"))
            W.check_wheel(ray)
            with zipfile.ZipFile(ray) as z:
                assert not any(n.startswith(W.RAY_DROP) for n in z.namelist())


# --------------------------------------------------------------------------- the CUDA image's pins agree


def test_dockerfile_pyproject_and_wheelhouse_pins_agree():
    """One version of each GPU package everywhere: the CUDA image, pyproject's requirements and gpu extra,
    and the wheelhouse the GPU check ran with (files only; `gpu_wheelhouse.py --check-pins` resolves them)."""
    import tomllib
    from packaging.requirements import Requirement

    args = W.dockerfile_args()
    pins = W.image_pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    gpu = {Requirement(r).name.lower(): Requirement(r) for r in project["optional-dependencies"]["gpu"]}
    for name in ("ray", "bitsandbytes", "deepspeed", "liger-kernel"):
        assert pins[name] == W.PINS[name], f"{name}: Dockerfile {pins[name]} vs wheelhouse {W.PINS[name]}"
    for name in ("ray", "bitsandbytes", "deepspeed", "torch"):
        assert reqs[name].specifier.contains(pins[name]), f"{name} {pins[name]} outside pyproject's {reqs[name]}"
    for name in ("flash-attn", "liger-kernel"):
        assert gpu[name].specifier.contains(pins[name]), f"{name} {pins[name]} outside the gpu extra's {gpu[name]}"
    assert pins["torch"] == (REPO / "constraints.txt").read_text().split("==")[1].strip()
    cuda = args["CUDA_VERSION"].split(".")
    assert args["TORCH_CUDA"] == f"cu{cuda[0]}{cuda[1]}", "torch's CUDA build must match the base image's CUDA"
    assert args["UBUNTU_VERSION"] == "24.04" and W.PYTHON_VERSION == "3.12"  # noble's python3 is 3.12
    runs = (REPO / "docker" / "Dockerfile").read_text()
    for arg in ("BITSANDBYTES_VERSION", "DEEPSPEED_VERSION", "LIGER_KERNEL_VERSION", "FLASH_ATTN_VERSION"):
        assert "${" + arg + "}" in runs, f"{arg} is declared but not installed"


def test_bitsandbytes_pin_ships_the_images_cuda_library():
    """bitsandbytes loads libbitsandbytes_cudaXYZ for the CUDA torch runs on: the pinned wheel must have the
    image's (12.8) and the GPU machine's (13.0). Needs the wheel (make gpu-wheelhouse); skipped without."""
    whl = [p for p in (REPO / ".whl2").glob("bitsandbytes-*.whl")] if (REPO / ".whl2").is_dir() else []
    if not whl:
        pytest.skip("make gpu-wheelhouse has not been run here")
    cuda = W.dockerfile_args()["CUDA_VERSION"].split(".")
    with zipfile.ZipFile(whl[0]) as z:
        libs = {n.rsplit("/", 1)[-1] for n in z.namelist() if n.endswith(".so")}
    assert f"libbitsandbytes_cuda{cuda[0]}{cuda[1]}.so" in libs and "libbitsandbytes_cuda130.so" in libs
