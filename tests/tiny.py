"""Tiny real parts for tests: a Llama-architecture model and a BPE tokenizer built here (nothing is
downloaded), and instruction data made from this machine's Python standard library."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def make_data(dirpath: Path, n: int = 64, n_eval: int = 8) -> tuple[Path, Path]:
    from raytune_ft.data.quickstart import stdlib_functions

    rows = []
    for row in stdlib_functions():
        if len(row["instruction"]) + len(row["output"]) < 400:
            rows.append(row)
        if len(rows) == n + n_eval:
            break
    dirpath.mkdir(parents=True, exist_ok=True)
    train, evals = dirpath / "train.jsonl", dirpath / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows[n:]))
    return train, evals


def make_model(dirpath: Path, train_file: Path, *, vocab: int = 512, hidden: int = 64, layers: int = 2,
               seed: int = 0) -> Path:
    """A pretrained-looking model dir (config, safetensors, tokenizer) loadable by from_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytune_ft.data.pipeline import training_texts
    from raytune_ft.data.tokenizer import train_tokenizer

    tok = train_tokenizer(training_texts({"train": [{"path": str(train_file), "format": "alpaca"}]}), vocab)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(dirpath)
    tok.save_pretrained(dirpath)
    return dirpath


def spec_doc(name: str, model_dir: Path, train: Path, evals: Path | None, storage: Path, **over) -> dict:
    doc = {
        "name": name,
        "model": {"name_or_path": str(model_dir)},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "data": {"train": {"path": str(train), "format": "alpaca"}, "max_seq_length": 128},
        "training": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                     "precision": "fp32", "logging_steps": 1, "save_steps": 3, "warmup_steps": 0,
                     "lr_scheduler_type": "constant", "seed": 7},
        "compute": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"path": str(storage), "keep_checkpoints": 2},
        "fault_tolerance": {"max_failures": 0},
    }
    if evals is not None:
        doc["data"]["eval"] = {"path": str(evals), "format": "alpaca"}
        doc["training"].update(eval_strategy="steps", eval_steps=3)
    for k, v in over.items():
        if k in ("training", "compute", "storage", "data") and isinstance(v, dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    return doc


def write_spec(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path
