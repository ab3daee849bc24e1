"""End to end on a real local Ray: `rtf submit` trains a tiny model with Ray Train workers, commits
checkpoints with manifests, writes metrics, TensorBoard events and loadable final artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from raytune_ft import checkpoints as ck
from raytune_ft.cli import main
from raytune_ft.spec import load_spec
from tests.tiny import spec_doc, write_spec

pytestmark = pytest.mark.ray


def submit(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["submit", *argv])
    out = capsys.readouterr()
    return ei.value.code, out.out + out.err


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_end_to_end(ray_local, tiny, tmp_path, capsys):
    train, evals, model_dir = tiny
    spec_path = write_spec(tmp_path / "lora.yaml", spec_doc("lora-e2e", model_dir, train, evals, tmp_path / "runs"))
    code, out = submit([str(spec_path)], capsys)
    assert code == 0, out
    assert "mode: local, on this machine (no --address" in out
    assert "attention sdpa (auto: no GPU" in out
    assert "checkpoint committed: step 3" in out and "checkpoint committed: step 6" in out
    run = tmp_path / "runs" / "lora-e2e"
    final = run / "final"

    # outputs: the adapter only, loadable with PEFT, computing what training ended with
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.json",
                 "final_results.json", "rtf_spec.yaml"):
        assert (final / name).is_file(), name
    assert not (final / "model.safetensors").exists()
    results = json.loads((final / "final_results.json").read_text())
    assert results["steps"] == 6 and results["eval_loss"] is not None and results["tokens"] > 0
    assert load_spec(final / "rtf_spec.yaml").name == "lora-e2e"
    # final/ is committed like a checkpoint: its manifest (written last) lists every file with its sha256
    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck

    manifest = ck.read_manifest(pafs.LocalFileSystem(), str(final))
    assert manifest is not None and manifest.step == 6
    assert [f["path"] for f in manifest.files] == sorted(
        p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file() and p.name != ck.MANIFEST)
    assert ck.verify(pafs.LocalFileSystem(), str(final), manifest, deep=True) == []
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), final).eval()
    fp = results["fingerprint"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([fp["input_ids"]])).logits.float()
    assert logits[0, -1, :8].tolist() == pytest.approx(fp["last_logits_head"], abs=1e-4)
    assert float(logits.sum()) == pytest.approx(fp["logits_sum"], rel=1e-5, abs=1e-3)

    # metrics: every logging step, evals with perplexity; TensorBoard holds the same steps
    recs = metrics(run)
    train_steps = [r["step"] for r in recs if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["max_steps"] == 6 and "learning_rate" in r and "grad_norm" in r
               and r["peak_memory_mb"] > 0 and r["rss_mb"] > 50 and r["cpu_percent"] >= 0
               for r in recs if "loss" in r)
    evs = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evs] == [3, 6]
    assert evs[-1]["perplexity"] == pytest.approx(2.718281828 ** evs[-1]["eval_loss"], rel=1e-6)
    assert results["eval_loss"] == pytest.approx(evs[-1]["eval_loss"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == train_steps
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["loss"] for r in recs if "loss" in r])
    assert [e.step for e in acc.Scalars("train/rss_mb")] == train_steps  # the hardware monitor, per step
    assert [e.step for e in acc.Scalars("eval_loss")] == [3, 6]

    # checkpoints: committed with manifests, adapter + optimizer state, never the frozen base
    import pyarrow.fs as pafs

    infos = ck.list_checkpoints(pafs.LocalFileSystem(), str(run))
    assert [(i.step, i.committed) for i in infos] == [(3, True), (6, True)]
    files = {f["path"] for f in infos[-1].manifest.files}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)


def test_bad_row_fails_before_training_with_file_and_line(tmp_path, capsys, tiny):
    _, _, model_dir = tiny
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": 5}\n')
    spec_path = write_spec(tmp_path / "s.yaml", spec_doc("bad", model_dir, data, None, tmp_path / "runs"))
    code, out = submit([str(spec_path)], capsys)
    assert code == 2
    assert "bad.jsonl:3:" in out and "(format alpaca)" in out
    assert "Traceback" not in out
    assert not (tmp_path / "runs" / "bad").exists()  # nothing started


def test_deepspeed_zero2_and_zero3_match_ddp(ray_local, tiny, tmp_path, capsys):
    """Two CPU workers over gloo: ZeRO-2 and ZeRO-3 give the same losses as plain DDP (same data, seed)."""
    train, _, model_dir = tiny
    losses = {}
    for stage in (None, 2, 3):
        name = f"ds-{stage or 'ddp'}"
        over = {"method": {"type": "full"}, "compute": {"num_workers": 2, "cpus_per_worker": 1},
                "training": {"max_steps": 3, "save_steps": 3, "learning_rate": 1e-3}}
        if stage:
            over["deepspeed"] = {"stage": stage}
        spec_path = write_spec(tmp_path / f"{name}.yaml", spec_doc(name, model_dir, train, None, tmp_path / "runs", **over))
        code, out = submit([str(spec_path)], capsys)
        assert code == 0, out
        run = tmp_path / "runs" / name
        losses[stage] = [r["loss"] for r in metrics(run) if "loss" in r]
        manifest = json.loads((run / "checkpoint-00000003" / ck.MANIFEST).read_text())
        paths = {f["path"] for f in manifest["files"]}
        if stage is None:  # both ranks' files were merged into one committed checkpoint
            assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= paths
        else:  # each rank's DeepSpeed shards are in it
            assert any("zero_pp_rank_1" in p for p in paths) and any("zero_pp_rank_0" in p for p in paths), paths
    assert len(losses[None]) == 3
    assert losses[2] == pytest.approx(losses[None], abs=1e-3)
    assert losses[3] == pytest.approx(losses[None], abs=1e-3)


def test_resubmitting_a_pruned_run_resumes(ray_local, tiny, tmp_path, capsys):
    """After rtf pruned old checkpoints, Ray Train's own snapshot still names them; a resubmission must
    still start (rtf resumes from its manifests) instead of Ray refusing a 'corrupted run directory'."""
    train, _, model_dir = tiny
    doc = spec_doc("pruned", model_dir, train, None, tmp_path / "runs",
                   training={"max_steps": 4, "save_steps": 1, "logging_steps": 1})
    spec_path = write_spec(tmp_path / "p.yaml", doc)
    code, out = submit([str(spec_path)], capsys)
    assert code == 0, out
    import pyarrow.fs as pafs

    run = tmp_path / "runs" / "pruned"
    assert [i.step for i in ck.list_checkpoints(pafs.LocalFileSystem(), str(run))] == [3, 4]  # 1 and 2 pruned
    code, out = submit([str(spec_path), "--set", "training.max_steps=6"], capsys)
    assert code == 0, out
    assert f"resuming from {run / ck.checkpoint_dir_name(4)} at step 4" in out
    assert json.loads((run / "final" / "final_results.json").read_text())["steps"] == 6
