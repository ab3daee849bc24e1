"""The baseline: a plain Hugging Face ``Trainer`` fine-tuning script, written the way the popular guides
write it (Stanford Alpaca's ``train.py``, the HF course): ``datasets.load_dataset("json")``, the Alpaca
prompt, tokenize ``prompt + output + eos`` with truncation, mask the prompt's labels with -100, pad each
batch to its longest example with ``DataCollatorForSeq2Seq``, ``Trainer.train()``. Every TrainingArguments
value not listed here is HF's default (so the optimizer is HF's default, ``adamw_torch_fused``).

Two additions that only *measure* and are the same in spirit as what rtf's worker records:
- a callback appends ``{step, time, **logs}`` to ``metrics.jsonl`` at every logging step (rtf's callback
  writes the same record to its run's ``metrics.jsonl``), so throughput is computed identically;
- the collator is wrapped to count real and padded token positions (the padding fraction).

    python bench/hf_baseline.py --model DIR --train FILE --out DIR [--epochs 1] [--batch 8] ...
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: the epochs)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--logging-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args(argv)
    t_process = time.time()

    import torch

    torch.set_num_threads(a.threads)
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    prompt_tpl = "### Instruction:\n{instruction}\n\n### Response:\n"

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa")

    def tokenize(example):
        source = prompt_tpl.format(instruction=example["instruction"])
        full = source + example["output"] + tokenizer.eos_token
        input_ids = tokenizer(full, truncation=True, max_length=a.max_len)["input_ids"]
        n_source = len(tokenizer(source, truncation=True, max_length=a.max_len)["input_ids"])
        labels = [-100] * n_source + input_ids[n_source:]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    dataset = load_dataset("json", data_files={"train": a.train})["train"]
    dataset = dataset.map(tokenize, remove_columns=dataset.column_names)

    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    counts = {"real": 0, "padded": 0, "batches": 0}

    def counting_collator(features):
        batch = collator(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["padded"] += int(batch["input_ids"].numel())
        counts["batches"] += 1
        return batch

    os.makedirs(a.out, exist_ok=True)
    metrics_path = os.path.join(a.out, "metrics.jsonl")

    class LogToFile(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            rec = {"step": state.global_step, "time": time.time(), **(logs or {})}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    args = TrainingArguments(
        output_dir=os.path.join(a.out, "hf"),
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch,
        learning_rate=a.lr,
        lr_scheduler_type="linear",
        logging_steps=a.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        seed=a.seed,
        use_cpu=True,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting_collator,
                      processing_class=tokenizer, callbacks=[LogToFile()])
    t_setup = time.time()
    result = trainer.train()
    t_train = time.time()
    final = os.path.join(a.out, "final")
    trainer.save_model(final)
    tokenizer.save_pretrained(final)
    summary = {
        "train_runtime": result.metrics.get("train_runtime"),
        "train_loss_avg": result.training_loss,
        "steps": trainer.state.global_step,
        "tokens": trainer.state.num_input_tokens_seen,
        "examples": len(dataset),
        "padded_tokens": counts["padded"],
        "real_tokens": counts["real"],
        "optimizer": args.optim,
        "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
        "setup_s": t_setup - t_process,
        "train_s": t_train - t_setup,
        "final": final,
    }
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
