"""Smoke tests of bench/: the parts that need neither a GPU nor minutes of training."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common as C  # noqa: E402
import gpu  # noqa: E402


def test_gpu_dry_run_plans_the_grid_without_a_gpu():
    p = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--dry-run", "--attn", "sdpa"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for name in ("gpu-lora-sdpa-pack-gcoff", "gpu-full-sdpa-pad-gcon"):
        assert name in p.stdout
    assert "1,235,814,400 parameters" in p.stdout
    assert "8 run(s)" in p.stdout and "nothing was started" in p.stdout


def test_gpu_run_without_a_gpu_says_so_and_fails():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--methods", "lora"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == gpu.NO_GPU_EXIT
    assert "needs an NVIDIA GPU" in p.stderr and "Traceback" not in p.stderr


def test_gpu_flop_model_matches_the_built_model():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**gpu.LLAMA_32_1B))
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    assert total == gpu.arch().params == 1_235_814_400
    s = 300.0
    full = gpu.flops_per_token({"method": "full"}, s)
    assert full["N_nonembedding"] == total - embed
    assert full["N"] == total  # tied: the LM head is the embedding matrix, counted once, as a matmul
    attn = 12 * 16 * 2048 * s
    assert full["flops_per_token"] == pytest.approx(6 * total + attn)
    run = {"name": "x", "method": "lora", "attn": "sdpa", "packing": True, "gc": False, "batch": 4}
    lora = gpu.flops_per_token(run, s)
    # r=16 on q,k,v,o,gate,up,down of 16 layers
    per_layer = 16 * ((2048 + 2048) * 2 + (2048 + 512) * 2 + (2048 + 8192) * 3)
    assert lora["N_trainable"] == 16 * per_layer
    assert lora["flops_per_token"] == pytest.approx(4 * total + 6 * 16 * per_layer + attn)
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3", None)[0] == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe", None)[0] == 756e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB", None)[0] == 312e12
    assert gpu.peak_flops("Some GPU", None)[0] is None


def test_gpu_memory_plan_uses_rtfs_estimate():
    a = gpu.parser().parse_args([])
    run = {"name": "gpu-full-sdpa-pack-gcoff", "method": "full", "attn": "sdpa", "packing": True, "gc": False,
           "batch": 4}
    m = gpu.memory_plan(run, a)
    assert m["total"] > m["total_without_overhead"] > 0
    gc = gpu.memory_plan({**run, "gc": True}, a)
    assert gc["activations"] < m["activations"]


def test_steady_rate_uses_the_first_and_last_logged_step():
    recs = [{"step": 1, "time": 100.0, "num_input_tokens_seen": 50, "loss": 9.0},
            {"step": 2, "time": 101.0, "num_input_tokens_seen": 150, "loss": 8.0},
            {"step": 3, "time": 103.0, "num_input_tokens_seen": 350, "loss": 7.0},
            {"step": 3, "time": 104.0, "train_runtime": 5.0}]  # HF's end-of-training log: ignored
    r = C.steady_rate(recs)
    assert r["tokens"] == 300 and r["seconds"] == 3.0 and r["steps"] == 2
    assert r["tokens_per_s"] == 100.0


def test_startup_breakdown_phases_add_up():
    ev = [{"kind": "workers", "time": 20.0}, {"kind": "info", "message": "data: x", "time": 21.0},
          {"kind": "info", "message": "parameters: y", "time": 23.0},
          {"kind": "info", "message": "setup took 1s", "time": 23.5},
          {"kind": "log", "step": 1, "time": 26.0}, {"kind": "log", "step": 2, "time": 27.0},
          {"kind": "done", "time": 28.0}]
    rec = {"t0": 0.0, "t_cli_imported": 0.5, "runs": [{"events": ev, "ray_init": [[4.0, 12.0]], "t_end": 31.0}]}
    b = C.startup_breakdown(rec)
    assert (b["cli_start"], b["driver_prep"], b["ray_start"], b["worker_group"]) == (0.5, 3.5, 8.0, 8.0)
    assert (b["data_prep"], b["model_load"], b["trainer_setup"], b["first_step"]) == (1.0, 2.0, 0.5, 2.5)
    parts = sum(b[k] for k in ("cli_start", "driver_prep", "ray_start", "worker_group", "data_prep", "model_load",
                               "trainer_setup", "first_step"))
    assert parts == b["submit_to_first_step"] == 26.0
    assert b["last_log_to_done"] == 1.0 and b["done_to_exit"] == 3.0 and b["total"] == 31.0


def test_tree_sampler_sees_a_child_process_cpu():
    sampler = C.TreeSampler(interval=0.1)
    t0 = time.time()
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    C.run([sys.executable, "-c", code], sampler=sampler)
    used = sampler.cpu_between(t0, time.time() + 1)
    assert used[sampler.root][1] >= 0.4


def test_sampler_batches_cover_every_example_once():
    import throughput

    batches = throughput.sampler_batches(20, 8)
    assert [len(b) for b in batches] == [8, 8, 4]
    assert sorted(i for b in batches for i in b) == list(range(20))
    assert batches == throughput.sampler_batches(20, 8)  # seeded: what a and c both draw
