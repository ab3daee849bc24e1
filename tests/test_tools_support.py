"""Shared builders for the after-training tool tests: a tiny tokenizer, a tiny Llama base model, and run
dirs laid out as the training recipe writes them (rtf_spec.yaml, final/, checkpoint-*/ with manifests,
metrics.jsonl). Built once per test session (cached here), read-only for the tests that use them: a test
that changes a run dir copies it first (:func:`copy_run`).

No tests live here; other test_tools_* modules import :func:`workspace`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TRAIN_ROWS = [
    {"instruction": "Add two numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say hello.", "output": "Hello there, friend."},
    {"instruction": "Name a colour.", "output": "Blue is a colour."},
    {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
    {"instruction": "Count to three.", "output": "one two three"},
    {"instruction": "What is the capital of France?", "output": "Paris is the capital of France."},
]
EVAL_ROWS = [
    {"instruction": "Add two numbers.", "input": "4 and 1", "output": "The sum is 5."},
    {"instruction": "Say goodbye.", "output": "Goodbye, friend."},
    {"instruction": "Name an animal.", "output": "A cat is an animal."},
]
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello there friend, the sum is five and the capital of France is Paris",
    "### Instruction:\nSay hello.\n\n### Response:\nHello there, friend.",
    "one two three four five six seven eight nine ten",
]

N_TRAIN_POINTS = 10  # metrics.jsonl of the lora run: loss + learning_rate at steps 1..10
N_EVAL_POINTS = 2  # eval_loss at steps 5 and 10


def build_tokenizer():
    """A byte-level BPE tokenizer (with a chat template): the data pipeline's own trainer."""
    from raytune_ft.data.tokenizer import train_tokenizer

    return train_tokenizer(TEXTS * 3, vocab_size=300, min_frequency=1)


def tiny_llama(tok, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def add_lora(base_dir: str, seed: int = 1, std: float = 0.3):
    """A peft LoRA model on the saved base, with random (non-zero) lora_B so the adapter changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_spec(path: Path, doc: dict):
    import yaml

    from raytune_ft.spec import dump_spec, spec_from_dict

    spec = spec_from_dict(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dump_spec(spec), sort_keys=False))
    return spec


def lora_doc(name: str, base_dir: str, storage: str, train: str, eval_: str, *, method: str = "lora", fmt: str = "alpaca") -> dict:
    method_doc = {"type": method, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    if method == "qlora":
        method_doc["quantization"] = {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}
    return {
        "name": name,
        "model": {"name_or_path": base_dir},
        "method": method_doc,
        "data": {"train": {"path": train, "format": fmt}, "eval": {"path": eval_, "format": fmt}, "max_seq_length": 64},
        "training": {"max_steps": 10, "precision": "fp32", "logging_steps": 1, "learning_rate": 1e-3},
        "storage": {"path": storage},
    }


def metrics_lines(n_train: int = N_TRAIN_POINTS, eval_every: int = 5, scale: float = 1.0) -> str:
    lines = []
    t0 = 1_700_000_000
    for step in range(1, n_train + 1):
        lines.append({"step": step, "loss": scale * (6.0 - 0.4 * step), "learning_rate": 1e-3 * (1 - step / (n_train + 1)),
                      "grad_norm": 1.0, "epoch": step / n_train, "time": t0 + step})
        if step % eval_every == 0:
            lines.append({"step": step, "eval_loss": scale * (5.5 - 0.3 * step), "perplexity": 100.0, "time": t0 + step})
    return "".join(json.dumps(x) + "\n" for x in lines)


def save_checkpoint(run_dir: Path, step: int, model, tok, *, commit: bool = True, spec_hash: str | None = None) -> Path:
    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck

    d = run_dir / ck.checkpoint_dir_name(step)
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    (d / "optimizer.pt").write_bytes(b"\0" * 16)
    if commit:
        ck.write_manifest(pafs.LocalFileSystem(), str(d), step=step, epoch=1.0, files=ck.file_digests(str(d)),
                          spec_hash=spec_hash, metrics={"loss": 1.5})
    return d


def commit_final(final: Path, step: int, spec_hash: str | None) -> None:
    """final/'s manifest, as the recipe writes it (ck.commit_dir's manifest, here on a local dir)."""
    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck

    ck.write_manifest(pafs.LocalFileSystem(), str(final), step=step, epoch=1.0, files=ck.file_digests(str(final)),
                      spec_hash=spec_hash, metrics={"train_loss": 2.25})


@dataclass
class Workspace:
    root: Path
    base_dir: Path  # tiny Llama base + tokenizer
    storage: Path  # {storage.path}
    lora_run: Path  # LoRA run: final/ adapter (with its manifest), checkpoint-00000005 (committed), checkpoint-00000010 (no manifest)
    lora_spec_path: Path  # a user's spec whose storage.path/name is lora_run
    full_run: Path  # from-scratch full fine-tune (model.init): final/ holds the whole model
    sweep: Path  # trial-0 (finished) and trial-1 (running)
    train_path: Path
    eval_path: Path


_CACHE: dict[str, Workspace] = {}


def build_workspace(root: Path) -> Workspace:
    tok = build_tokenizer()
    base_dir = root / "models" / "base"
    base = tiny_llama(tok, seed=0)
    base.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))

    data = root / "data"
    train_path = write_jsonl(data / "train.jsonl", TRAIN_ROWS)
    eval_path = write_jsonl(data / "eval.jsonl", EVAL_ROWS)
    storage = root / "runs"

    # --- LoRA run
    doc = lora_doc("lora-run", str(base_dir), str(storage), str(train_path), str(eval_path))
    lora_run = storage / "lora-run"
    spec = write_spec(lora_run / "rtf_spec.yaml", doc)
    lora_spec_path = root / "specs" / "lora.yaml"
    write_spec(lora_spec_path, doc)
    model = add_lora(str(base_dir))
    final = lora_run / "final"
    model.save_pretrained(str(final))
    tok.save_pretrained(str(final))
    shutil.copy(lora_run / "rtf_spec.yaml", final / "rtf_spec.yaml")
    (final / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (final / "final_results.json").write_text(json.dumps(
        {"train_loss": 2.25, "eval_loss": 2.5, "steps": 10, "tokens": 1234, "runtime_s": 3.0, "tokens_per_s": 411.3}))
    from raytune_ft.spec import spec_hash

    commit_final(final, 10, spec_hash(spec))
    save_checkpoint(lora_run, 5, model, tok, spec_hash=spec_hash(spec))
    save_checkpoint(lora_run, 10, model, tok, commit=False)
    (lora_run / "metrics.jsonl").write_text(metrics_lines() + '{"step": 11, "loss": 1.0')  # half-written last line

    # --- full fine-tune from scratch (model.init): final/ holds the whole model
    full_run = storage / "full-run"
    write_spec(full_run / "rtf_spec.yaml", {
        "name": "full-run",
        "model": {"init": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}},
        "tokenizer": {"train": {"vocab_size": 300}},
        "method": {"type": "full"},
        "data": {"train": {"path": str(train_path), "format": "text", "fields": {"text": "output"}}, "eval_split": 0.5},
        "training": {"max_steps": 4, "precision": "fp32"},
        "storage": {"path": str(storage)},
    })
    full = tiny_llama(tok, seed=7)
    full.save_pretrained(str(full_run / "final"))
    tok.save_pretrained(str(full_run / "final"))
    (full_run / "final" / "final_results.json").write_text(json.dumps({"train_loss": 3.0, "eval_loss": 3.5, "steps": 4}))
    commit_final(full_run / "final", 4, None)
    (full_run / "metrics.jsonl").write_text(metrics_lines(4, 2))

    # --- a sweep: trial-0 finished, trial-1 with only a committed checkpoint
    sweep = storage / "sweep1"
    for i, scale in ((0, 1.0), (1, 0.8)):
        t = sweep / f"trial-{i}"
        write_spec(t / "rtf_spec.yaml", {**doc, "name": "sweep1"})
        (t / "metrics.jsonl").write_text(metrics_lines(6 + 2 * i, 3, scale))
    (sweep / "trial-0" / "final").mkdir()
    (sweep / "trial-0" / "final" / "final_results.json").write_text(json.dumps({"train_loss": 3.1, "eval_loss": 3.3, "steps": 6}))
    save_checkpoint(sweep / "trial-1", 4, model, tok)
    return Workspace(root, base_dir, storage, lora_run, lora_spec_path, full_run, sweep, train_path, eval_path)


def get_workspace(factory: pytest.TempPathFactory) -> Workspace:
    if "ws" not in _CACHE:
        _CACHE["ws"] = build_workspace(factory.mktemp("tools_ws"))
    return _CACHE["ws"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    return get_workspace(tmp_path_factory)


@pytest.fixture(autouse=True)
def _tools_cache(tmp_path, monkeypatch):
    """s3 sources are copied into a per-test cache, never into ~/.cache; torch on one thread (tiny
    models on shared cores run several times faster without thread contention), restored after."""
    import torch

    monkeypatch.setenv("RTF_CACHE_DIR", str(tmp_path / "rtf_cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def recommit_final(run: Path) -> None:
    """A test changed files in a copied run's final/: commit them again (else the manifest check refuses it)."""
    (run / "final" / "rtf_checkpoint.json").unlink()
    commit_final(run / "final", 10, None)
