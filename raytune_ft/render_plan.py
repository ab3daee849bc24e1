"""Plain-text rendering of a Plan for `rtf plan` (readable in a terminal, a log or a CI output)."""

from __future__ import annotations

import json

import yaml

from raytune_ft.plan import Plan, human_count


def _env_line(spec: dict) -> list[str]:
    env = spec.get("env") or {}
    if not env:
        return []
    parts = [f"{k}=<forwarded from ${k}>" if v is None else f"{k}={v}" for k, v in env.items()]
    return ["env:          " + ", ".join(parts)]


def _accumulation(p: Plan) -> str:
    t = p.spec.get("training") or {}
    if not t.get("tokens_per_step"):
        return ""
    return (f"; training.tokens_per_step: gradient accumulation "
            f"{p.global_batch_size // (t['per_device_train_batch_size'] * p.num_workers)}")


def _workers(p: Plan) -> str:
    if not p.min_workers:
        return f"{p.num_workers} worker(s)"
    t = p.spec.get("training") or {}
    per = t.get("per_device_train_batch_size") or 1
    accs = ", ".join(f"{w}: {p.global_batch_size // (per * w)}" for w in range(p.min_workers, p.num_workers + 1))
    return (f"{p.min_workers}-{p.num_workers} workers (elastic; gradient accumulation by worker count {accs}, "
            "so the global batch stays the same)")


def render_plan(p: Plan, extra: list[str] | None = None) -> str:
    m = p.memory
    lines = [
        f"run:          {p.name}   (spec hash {p.spec_hash})",
        f"output:       {p.run_uri}",
        f"method:       {p.method}",
        f"scaling:      {_workers(p)} × {json.dumps(p.resources_per_worker)}"
        f"{'  GPU' if p.use_gpu else '  CPU only'}, placement {p.placement_strategy}"
        + (f", accelerator {p.accelerator_type}" if p.accelerator_type else ""),
        f"global batch: {p.global_batch_size} sequences per optimizer step"
        + (f", {p.tokens_per_step:,} tokens (at max_seq_length)" if p.tokens_per_step else "")
        + _accumulation(p),
        *_env_line(p.spec),
    ]
    if m.known:
        g = m.gib()
        lines += [
            f"parameters:   {human_count(m.total_params)} total, {human_count(m.trainable_params)} trainable "
            f"({100 * m.trainable_params / max(1, m.total_params):.2f}%)",
            "memory/GPU:   " + ", ".join(f"{k} {g[k]:.2f}" for k in ("weights", "gradients", "optimizer", "activations", "overhead"))
            + f"  → total {g['total']:.2f} GiB"
            + (f" of {p.accelerator_memory_gib:g} GiB" if p.accelerator_memory_gib else ""),
        ]
        lines += [f"              note: {n}" for n in m.notes]
    else:
        lines.append("memory/GPU:   unknown (" + "; ".join(m.notes) + ")")
    lines += extra or []
    if p.deepspeed:
        lines.append("deepspeed:")
        lines += ["  " + ln for ln in json.dumps(p.deepspeed, indent=2).splitlines()]
    else:
        lines.append("deepspeed:    off (plain DDP)")
    for w in p.warnings:
        lines.append(f"warning:      {w}")
    lines.append("resolved spec (secrets are env var names, never values):")
    lines += ["  " + ln for ln in yaml.safe_dump(p.spec, sort_keys=False).splitlines()]
    return "\n".join(lines)
