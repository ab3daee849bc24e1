"""The console shows what the user needs. bitsandbytes is imported only for QLoRA (peft imports it whenever
it is installed, and on a CPU with AVX512-BF16 it logs "Failed to load CPU gemm_4bit_forward … No module
named 'kernels'" at import); the driver does not import transformers at all; Ray's token-auth notice and
its color codes stay off a console that is not a terminal."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_py(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=300).stdout


def test_a_lora_worker_never_imports_bitsandbytes_and_a_qlora_worker_does_quietly():
    probe = (
        "import sys, logging\n"
        "from raytune_ft.train.entry import prepare_imports, BNB_CPU_LOGGER\n"
        "prepare_imports({'method': {'type': %r}})\n"
        "import raytune_ft.train.recipe, peft, transformers\n"
        "from peft import LoraConfig, get_peft_model\n"  # what apply_method uses
        "from transformers.utils import is_bitsandbytes_available\n"
        "print(sys.modules.get('bitsandbytes') is not None, is_bitsandbytes_available(),\n"
        "      logging.getLogger(BNB_CPU_LOGGER).level)\n"
    )
    assert run_py(probe % "lora").split() == ["False", "False", "0"]
    assert run_py(probe % "qlora").split() == ["True", "True", str(logging.ERROR)]


def test_the_driver_side_imports_no_transformers():
    """What `rtf submit` imports to start a run or a sweep (the worker's entry point is named, not loaded)."""
    out = run_py(
        "import sys\n"
        "import raytune_ft.cli, raytune_ft.launch, raytune_ft.launch.driver, raytune_ft.sweep\n"
        "from raytune_ft.train.entry import train_loop\n"
        "from ray.train.torch import TorchTrainer\n"
        "print([m for m in ('transformers', 'peft', 'bitsandbytes') if m in sys.modules])\n")
    assert out.strip() == "[]"


def test_ray_notices_kept_off_a_console_that_is_not_a_terminal(monkeypatch):
    from raytune_ft.launch.driver import quiet_ray_console

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    quiet_ray_console(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "0"
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    log.addHandler(h)
    try:
        log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        log.warning("Token authentication is disabled for this Ray cluster. Anyone with network access …")
    finally:
        log.removeHandler(h)
    assert seen == ["Token authentication is disabled for this Ray cluster. Anyone with network access …"]
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")  # the user's choice stands
    quiet_ray_console(io.StringIO())
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


def test_storage_data_checks_and_planning_import_no_training_stack(tmp_path):
    """Issue 17 item 2: everything `rtf submit` does before training starts (the spec, the plan with its memory
    estimate, the storage preflight, the data check of every row) imports neither torch nor transformers, peft,
    deepspeed or bitsandbytes. A real spec on real files: a tokenizer-less model dir and alpaca rows."""
    import json

    import yaml

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(20)))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512}))
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "light", "model": {"name_or_path": str(model)}, "data": {"train": {"path": str(data)}},
        "training": {"max_steps": 4}, "storage": {"path": str(tmp_path / "runs")}}))
    out = run_py(
        "import sys\n"
        "from raytune_ft import storage as st\n"
        "from raytune_ft.data.pipeline import check_data\n"
        "from raytune_ft.plan import make_plan\n"
        "from raytune_ft.render_plan import render_plan\n"
        "from raytune_ft.spec import load_spec\n"
        f"spec = load_spec({str(spec)!r})\n"
        "text = render_plan(make_plan(spec))\n"
        "st.preflight(spec.storage)\n"
        "check_data(spec)\n"
        "assert 'memory' in text, text\n"
        "print([m for m in ('torch', 'transformers', 'peft', 'deepspeed', 'bitsandbytes') if m in sys.modules])\n")
    assert out.strip().splitlines()[-1] == "[]"
