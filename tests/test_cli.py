"""The CLI: thin, fast to import, exit codes and messages for user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytune_ft.cli import main
from tests.specs import base_doc

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "deepspeed", "ray.train", "ray.tune", "bitsandbytes", "datasets")


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


def test_importing_the_cli_imports_nothing_heavy():
    code = (
        "import sys, raytune_ft.cli, raytune_ft.spec, raytune_ft.plan, raytune_ft.render_plan\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"cli imports heavy modules: {out.stdout}"


def test_help_lists_every_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for cmd in ("validate", "plan", "submit", "status", "logs", "stop", "checkpoints", "render", "generate",
                "merge", "eval", "plot", "schema", "data"):
        assert cmd in out


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "raytune_ft", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "validate" in out.stdout


def test_validate_ok_and_bad(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base_doc()))
    code, out, _ = run_cli(["validate", str(good)], capsys)
    assert code == 0 and "ok" in out and "name=unit" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base_doc(training={"max_steps": 0})))
    code, out, err = run_cli(["validate", str(good), str(bad)], capsys)
    assert code == 2
    assert "training.max_steps: must be greater than 0 (got 0)" in err
    assert "Traceback" not in err + out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["validate", "/nonexistent/x.yaml"], "spec file not found"),
        (["plan", "/nonexistent/x.yaml"], "spec file not found"),
        (["validate", "{spec}", "--set", "training.learning_rate=-5"], "training.learning_rate: must be greater than 0"),
        (["plan", "{spec}", "--set", "nope"], "expected dotted.key=value"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, capsys, argv, needle):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(base_doc()))
    code, out, err = run_cli([a.replace("{spec}", str(spec)) for a in argv], capsys)
    assert code == 2
    assert needle in err
    assert "Traceback" not in out + err


def test_plan_json_has_the_resolved_parts(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    doc = base_doc(deepspeed={"stage": 2}, compute={"num_workers": 4, "gpus_per_worker": 1, "accelerator_type": "A100-80G"})
    doc["training"].update(per_device_train_batch_size=2, gradient_accumulation_steps=8, precision="bf16")
    doc["env"] = {"HF_TOKEN": None}
    spec.write_text(yaml.safe_dump(doc))
    code, out, _ = run_cli(["plan", str(spec), "--json"], capsys)
    assert code == 0
    p = json.loads(out)
    assert p["global_batch_size"] == 2 * 8 * 4
    assert p["tokens_per_step"] == 64 * 128
    assert p["deepspeed"]["zero_optimization"]["stage"] == 2
    assert p["deepspeed"]["bf16"]["enabled"] is True
    assert p["resources_per_worker"] == {"CPU": 1.0, "GPU": 1.0}
    assert p["spec"]["env"] == {"HF_TOKEN": None}
    code, out, _ = run_cli(["plan", str(spec)], capsys)
    assert "HF_TOKEN=<forwarded from $HF_TOKEN>" in out
    assert "global batch: 64 sequences" in out


def test_schema_command_writes_json(tmp_path, capsys):
    out_file = tmp_path / "schema.json"
    code, out, _ = run_cli(["schema", "-o", str(out_file)], capsys)
    assert code == 0
    assert json.loads(out_file.read_text())["title"] == "raytune_ft job spec"


def test_data_split_and_preview_commands(tmp_path, capsys, tiny):
    train, _, model_dir = tiny
    code, out, _ = run_cli(["data", "split", str(train), "--eval-fraction", "0.25", "--seed", "3",
                            "--out-dir", str(tmp_path)], capsys)
    assert code == 0
    tr, ev = tmp_path / "train.train.jsonl", tmp_path / "train.eval.jsonl"
    rows = train.read_text().splitlines()
    assert sorted(tr.read_text().splitlines() + ev.read_text().splitlines()) == sorted(rows)
    assert len(ev.read_text().splitlines()) == round(0.25 * len(rows))
    first = ev.read_text()
    run_cli(["data", "split", str(train), "--eval-fraction", "0.25", "--seed", "3", "--out-dir", str(tmp_path)], capsys)
    assert ev.read_text() == first  # deterministic for a seed

    spec = tmp_path / "s.yaml"
    doc = base_doc(model={"name_or_path": str(model_dir)})
    doc["data"]["train"]["path"] = str(train)
    spec.write_text(yaml.safe_dump(doc))
    code, out, _ = run_cli(["data", "preview", str(spec), "-n", "1"], capsys)
    assert code == 0
    assert "[[<s>### Instruction:" in out and "### Response:\n]]" in out  # the prompt is masked
    assert "train examples: 64" in out and "truncated to max_seq_length 128" in out


def test_render_commands_write_manifests(tmp_path, capsys):
    out_file = tmp_path / "job.yaml"
    code, _, err = run_cli(["render", "k8s", str(ROOT / "jobspecs" / "k8s.yaml"), "-o", str(out_file)], capsys)
    assert code == 0 and "kubectl apply" in err
    docs = list(yaml.safe_load_all(out_file.read_text()))
    assert [d["kind"] for d in docs if d] == ["ConfigMap", "RayJob"]
    code, out, _ = run_cli(["render", "runpod", str(ROOT / "jobspecs" / "runpod.yaml"), "-o", str(tmp_path / "rp")],
                           capsys)
    assert code == 0
    assert (tmp_path / "rp" / "entrypoint.sh").stat().st_mode & 0o111
    assert json.loads((tmp_path / "rp" / "pod.json").read_text())
