"""One end-to-end run of a non-SFT objective on a real local Ray (`rtf submit`, the recipe, 2 Ray Train workers
under DeepSpeed ZeRO-2, committed checkpoints), then `rtf score` on its final/: the regression head trained
under LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from raytune_ft import checkpoints as ck
from raytune_ft.cli import main
from tests.objective_data import COLOURS, scored_rows, write_jsonl
from tests.tiny import spec_doc, write_spec

pytestmark = pytest.mark.ray


def cli(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out = capsys.readouterr()
    return ei.value.code, out.out + out.err


def test_regression_run_end_to_end_then_score(ray_local, tiny, tmp_path, capsys):
    _, _, model_dir = tiny
    train = write_jsonl(tmp_path / "train.jsonl", scored_rows(96, seed=1))
    evals = write_jsonl(tmp_path / "eval.jsonl", scored_rows(24, seed=2))
    doc = spec_doc("reg-e2e", model_dir, train, evals, tmp_path / "runs",
                   method={"type": "lora", "objective": "regression", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                           "head": {"depth": 2, "width": 32, "dropout": 0.0}},
                   compute={"num_workers": 2, "cpus_per_worker": 1}, deepspeed={"stage": 2},
                   training={"max_steps": 16, "per_device_train_batch_size": 16, "learning_rate": 1e-2,
                             "save_steps": 8, "eval_steps": 8})
    doc["data"]["train"]["format"] = doc["data"]["eval"]["format"] = "scored"
    code, out = cli(["submit", str(write_spec(tmp_path / "reg.yaml", doc))], capsys)
    assert code == 0, out
    assert "objective regression" in out and "labels: n 96" in out
    assert ("distributed: 2 worker(s), DeepSpeed ZeRO-2 over gloo; global batch 32 = 16 per worker × 1 accumulation "
            "× 2 workers") in out, out
    assert "checkpoint committed: step 8" in out and "checkpoint committed: step 16" in out
    run = tmp_path / "runs" / "reg-e2e"
    final = run / "final"
    for name in ("adapter_model.safetensors", "head.safetensors", "head.json", "final_results.json"):
        assert (final / name).is_file(), name
    results = json.loads((final / "final_results.json").read_text())
    assert results["objective"] == "regression" and results["eval_r2"] > 0.8, results
    assert results["label_scale"]["std"] > 0.5 and results["labels"]["n"] == 96
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evs = [r for r in recs if "eval_r2" in r]
    assert [r["step"] for r in evs] == [8, 16] and evs[-1]["eval_mse"] < evs[0]["eval_mse"] * 1.5
    assert {"eval_mae", "eval_loss"} <= evs[-1].keys()
    # exp(eval_loss) of an MSE is no perplexity: none is logged, reported or summarised
    assert results["perplexity"] is None and not any("perplexity" in r for r in recs)
    assert "perplexity" not in out
    assert "\n  r2 " in out and f"{results['eval_r2']:.4f}" in out  # the summary shows the objective's metrics
    infos = ck.list_checkpoints(__import__("pyarrow.fs").fs.LocalFileSystem(), str(run))
    assert [(i.step, i.committed) for i in infos] == [(8, True), (16, True)]

    # the saved adapter + head reproduce the in-run model's output on the fingerprint input
    from raytune_ft.tools.scoring import load_scorer

    fp = results["fingerprint"]
    scorer = load_scorer(str(final))
    with torch.no_grad():
        raw = scorer.loaded.model(input_ids=torch.tensor([fp["input_ids"]])).logits[0, :1].tolist()
    assert raw == pytest.approx(fp["last_logits_head"], abs=1e-5)

    texts = tmp_path / "texts.jsonl"
    rows = scored_rows(12, seed=9)
    texts.write_text("".join(json.dumps(r["text"]) + "\n" for r in rows))
    code, out = cli(["score", str(run), "--file", str(texts), "--json"], capsys)
    assert code == 0, out
    scored = json.loads(out)
    assert [s["text"] for s in scored] == [r["text"] for r in rows]
    err = [abs(s["score"] - COLOURS[s["text"].split()[-1]]) for s in scored]
    assert sum(err) / len(err) < 0.5, scored
