"""What rtf costs around the training steps, on the embedded (local) Ray.

1. Submit → first optimizer step, by phase (``common.startup_breakdown``): process + CLI import, driver
   preparation, Ray start, worker group start, data preparation, model load, trainer setup, first step;
   then final save and teardown. Cold runs: ``rtf submit`` in a fresh process (bench/_probe.py: the CLI
   path in-process, with ``ray.init`` timed and rtf's own progress events kept; every event carries the
   worker-side time it was pushed). Warm runs (several specs in one process, Ray started once, which
   ``run_local`` reuses) show what is left when Ray is already up.
2. Per-step reporting. (i) In isolation: 500 calls of rtf's ``RtfCallback.on_log`` (peak memory, a
   metrics.jsonl line, a progress event pushed to the Ray progress actor) and of ``Publisher.push``
   alone, on the running Ray; median per call (robust to a busy machine). (ii) End to end
   (``--e2e-reporting``, on by default here, off in run_all for time): a tiny model (a step costs
   milliseconds) for 201 steps with ``logging_steps: 1`` against ``logging_steps: 200``; both windows
   are steps 1 → 200, so ms/step differ only by the 199 extra logging steps (HF's log, its printer
   callback, rtf's callback). Interleaved, twice each; on a shared machine this difference is often
   smaller than the noise.
3. Checkpoints, LoRA (r 16, all linear layers) vs full, to local disk and to an S3-compatible server on
   127.0.0.1 (moto, tests/s3server.py): the quickstart-shaped model, a save every 2 steps (steps 2 and 4).
   Time per checkpoint = worker time from the save step's log event to rtf's "checkpoint committed" event:
   HF's save to the worker's disk (weights, optimizer, scheduler, RNG), digests, Ray Train's persist
   (upload) to storage, the manifest, pruning and the metrics sync. Size = the committed checkpoint's
   files in storage. Then the raw transfer of the same checkpoint directory (pyarrow copy_files, as rtf
   uploads) to each backend, from this process, twice.

    python bench/overhead.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

REPORT_STEPS = 200


def tiny_model(fx: dict[str, Any], root: Path) -> str:
    """A tiny Llama (hidden 32, 2 layers) with the fixture's tokenizer: a step costs milliseconds."""
    out = root / "tiny-model"
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(fx["model"])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def warm_runs(specs: list[Path], out_json: Path, env: dict[str, str], callback_n: int = 0
              ) -> tuple[float, dict[str, Any]]:
    env = dict(env)
    env["RTF_BENCH_T0"] = repr(time.time())
    wall, _ = C.run([C.PY, str(C.BENCH / "_probe.py"), "--out", str(out_json), "--warm",
                     "--callback-bench", str(callback_n), *map(str, specs)], env=env, timeout=1200)
    return wall, json.loads(out_json.read_text())


def report_cost(run_rec: dict[str, Any], storage: Path, name: str) -> dict[str, float]:
    recs = [r for r in C.read_jsonl(storage / name / "metrics.jsonl") if r.get("step", 0) <= REPORT_STEPS]
    w = C.steady_rate(recs)
    assert w["first_step"] == 1 and w["last_step"] == REPORT_STEPS, w
    return {"ms_per_step": 1000 * w["seconds"] / w["steps"], "steps": w["steps"], "logs": len(recs)}


def checkpoint_times(run_rec: dict[str, Any]) -> list[dict[str, float]]:
    ev = run_rec["events"]
    logs = {e["step"]: float(e["time"]) for e in ev if e.get("kind") == "log"}
    out = []
    for e in ev:
        if e.get("kind") == "checkpoint":
            out.append({"step": e["step"], "seconds": float(e["time"]) - logs[e["step"]], "path": e["path"]})
    return out


def dir_size(fs: Any, path: str) -> tuple[int, int]:
    from raytune_ft import storage as st

    files = st.list_files(fs, path)
    return sum(f.size for f in files.values()), len(files)


def bench(work: Path | None = None, cold_reps: int = 2, cold_from: list[dict[str, float]] | None = None,
          e2e_reporting: bool = True, callback_calls: int = 500, log=print) -> dict[str, Any]:
    from tests.s3server import _UNSET, S3Server

    own = work is None
    work = Path(work or tempfile.mkdtemp(prefix="rtf-bench-ov-"))
    t0 = time.time()
    server = S3Server().start()
    try:
        fx = dict(C.build_fixture(work / "fixture"))
        result: dict[str, Any] = {"config": {"model_params": fx["params"], "report_steps": REPORT_STEPS}}
        env = C.bench_env(**server.env())
        for k in _UNSET:
            env.pop(k, None)
        bucket = server.create_bucket("rtf-bench")

        # ---- 1. cold submits
        cold: list[dict[str, float]] = list(cold_from or [])
        if not cold:
            for rep in range(cold_reps):
                d = C.rtf_spec("ov-cold", fx, str(work / f"cold{rep}"), packing=True, max_steps=2,
                               logging_steps=1, eval_data=False)
                spec = C.write_yaml(work / f"cold{rep}.yaml", d)
                _, rec = C.probe_submit(spec, work / f"cold{rep}.json", env=env)
                cold.append(C.startup_breakdown(rec))
                log(f"  overhead cold submit {rep + 1}/{cold_reps}: first step after "
                    f"{cold[-1]['submit_to_first_step']:.1f}s")
            result["cold_source"] = "overhead.py cold runs (packing, quickstart-shaped model dir)"
        else:
            result["cold_source"] = "the rtf runs of throughput.py (each a cold rtf submit)"
        result["cold"] = {"runs": cold, "median": {k: C.median([c[k] for c in cold if k in c]) for k in cold[0]}}

        # ---- 2 + 3. one warm Ray: reporting pairs, then checkpoints
        tiny = tiny_model(fx, work / "fixture")
        specs: list[Path] = []
        plan: list[tuple[str, dict[str, Any]]] = []
        for rep in range(2 if e2e_reporting else 0):
            for mode, every in (("log1", 1), ("log200", REPORT_STEPS)):
                name = f"ov-report-{mode}-{rep}"
                d = C.rtf_spec(name, {**fx, "model": tiny}, str(work / "report"), packing=False,
                               max_steps=REPORT_STEPS + 1, logging_steps=every, eval_data=False, batch=4)
                d["data"]["max_seq_length"] = 64
                d["compute"]["cpus_per_worker"] = 1
                plan.append((name, {"kind": "report", "mode": mode, "storage": work / "report"}))
                specs.append(C.write_yaml(work / f"{name}.yaml", d))
        for backend in ("local", "s3"):
            for method in ("full", "lora"):
                name = f"ov-ckpt-{method}-{backend}"
                if backend == "local":
                    storage, extra = str(work / "ckpt"), {}
                else:
                    storage, extra = f"s3://{bucket}/runs", {"endpoint_url": server.endpoint_url}
                d = C.rtf_spec(name, fx, storage, packing=True, max_steps=4, save_steps=2, logging_steps=1,
                               eval_data=False, method=method, **extra)
                d["compute"]["cpus_per_worker"] = 1
                plan.append((name, {"kind": "ckpt", "backend": backend, "method": method}))
                specs.append(C.write_yaml(work / f"{name}.yaml", d))
        wall, rec = warm_runs(specs, work / "warm.json", env, callback_calls)
        log(f"  overhead warm runs: {len(specs)} runs in one Ray, {wall:.0f}s")
        warm = [C.startup_breakdown(rec, i) for i in range(len(specs))]
        result["warm"] = {"ray_start": rec["ray_init"][0][1] - rec["ray_init"][0][0],
                          "median": {k: C.median([w[k] for w in warm if k in w]) for k in warm[0]}}

        reporting: dict[str, list[float]] = {"log1": [], "log200": []}
        ckpts: dict[str, Any] = {}
        for i, (name, meta) in enumerate(plan):
            run_rec = rec["runs"][i]
            if meta["kind"] == "report":
                reporting[meta["mode"]].append(report_cost(run_rec, meta["storage"], name)["ms_per_step"])
            else:
                times = checkpoint_times(run_rec)
                ckpts[f"{meta['method']}-{meta['backend']}"] = {"times": times, **meta}
        cb = rec["callback_bench"]
        result["reporting"] = {
            "callback_calls": cb["n"], "events_delivered": cb["events_delivered"],
            "on_log_median_ms": 1000 * C.median(cb["on_log_s"]), "on_log_p90_ms": 1000 * C.pct(cb["on_log_s"], 90),
            "push_median_ms": 1000 * C.median(cb["push_s"]), "push_p90_ms": 1000 * C.pct(cb["push_s"], 90),
        }
        if e2e_reporting:
            r1, rn = C.median(reporting["log1"]), C.median(reporting["log200"])
            result["reporting"].update(
                ms_per_step_log1=reporting["log1"], ms_per_step_log200=reporting["log200"],
                e2e_median_log1=r1, e2e_median_log200=rn, e2e_cost_ms_per_log=r1 - rn,
                e2e_pair_cost_ms=[x - y for x, y in zip(reporting["log1"], reporting["log200"])],
                steps_per_s_log1=1000 / r1, steps_per_s_log200=1000 / rn)

        # sizes of the last committed checkpoint, and the raw transfer of the same directory
        import pyarrow.fs as pafs

        from raytune_ft import storage as st

        s3fs, _ = st.pyarrow_filesystem(st.StorageConfig.from_uri(f"s3://{bucket}/x", endpoint_url=server.endpoint_url))
        os.environ.update(server.env())
        local = pafs.LocalFileSystem()
        for c in ckpts.values():
            path = c["times"][-1]["path"]
            fs, p = (s3fs, path[len("s3://"):]) if path.startswith("s3://") else (local, path)
            c["bytes"], c["files"] = dir_size(fs, p)
            c["median_s"] = C.median([t["seconds"] for t in c["times"]])
            c["mb_per_s"] = c["bytes"] / 2**20 / c["median_s"]
        raw: dict[str, Any] = {}
        for method in ("full", "lora"):
            src = ckpts[f"{method}-local"]["times"][-1]["path"]
            for backend in ("local", "s3"):
                secs = []
                for rep in range(2):
                    if backend == "local":
                        dest = str(work / "raw" / f"{method}-{rep}")
                        t = time.perf_counter()
                        st.upload_dir(src, local, dest)
                    else:
                        t = time.perf_counter()
                        st.upload_dir(src, s3fs, f"{bucket}/raw/{method}-{rep}")
                    secs.append(time.perf_counter() - t)
                raw[f"{method}-{backend}"] = {"seconds": secs, "median_s": C.median(secs)}
        for key, c in ckpts.items():
            c["raw_transfer_s"] = raw[key]["median_s"]
        result["checkpoints"] = ckpts
        result["seconds"] = time.time() - t0
        return result
    finally:
        server.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)


PHASES = ["cli_start", "driver_prep", "ray_start", "worker_group", "data_prep", "model_load", "trainer_setup",
          "first_step", "submit_to_first_step", "last_log_to_done", "done_to_exit", "total"]


def tables(result: dict[str, Any]) -> str:
    cm, wm = result["cold"]["median"], result["warm"]["median"]
    rows = [[p, cm.get(p), wm.get(p) if p not in ("cli_start", "driver_prep", "ray_start", "worker_group")
             else (wm.get("driver_prep+worker_group") if p == "worker_group" else None)] for p in PHASES]
    out = ["submit → first optimizer step (seconds, median; warm = Ray already running, its worker_group "
           "row includes driver prep)",
           C.fmt_table(["phase", "cold rtf submit", "warm (Ray up)"], rows)]
    r = result["reporting"]
    out += ["", f"per-step reporting, in isolation ({r['callback_calls']} calls, {r['events_delivered']} events "
            f"delivered to the actor): RtfCallback.on_log median {r['on_log_median_ms']:.3f} ms (p90 "
            f"{r['on_log_p90_ms']:.3f}), of which Publisher.push median {r['push_median_ms']:.3f} ms "
            f"(p90 {r['push_p90_ms']:.3f})"]
    if "e2e_median_log1" in r:
        out += [f"per-step reporting, end to end (tiny model, {result['config']['report_steps']} steps, 2 pairs): "
                f"logging_steps=1 {r['e2e_median_log1']:.1f} ms/step ({r['steps_per_s_log1']:.1f} steps/s), "
                f"logging_steps=200 {r['e2e_median_log200']:.1f} ms/step ({r['steps_per_s_log200']:.1f} steps/s) "
                f"→ {r['e2e_cost_ms_per_log']:.2f} ms per logged step (per pair: "
                + ", ".join(f"{x:.2f}" for x in r["e2e_pair_cost_ms"]) + ")"]
    rows = []
    for key in ("full-local", "lora-local", "full-s3", "lora-s3"):
        c = result["checkpoints"][key]
        rows.append([key, c["bytes"] / 2**20, c["files"], c["median_s"],
                     ", ".join(f"{t['seconds']:.2f}" for t in c["times"]), c["raw_transfer_s"], c["mb_per_s"]])
    out += ["", C.fmt_table(["checkpoint", "MiB", "files", "save+upload s (median)", "each", "raw copy s",
                             "MiB/s"], rows)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--cold-reps", type=int, default=2)
    ap.add_argument("--no-e2e-reporting", action="store_true", help="skip the 4 end-to-end reporting runs")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    result = bench(a.work, a.cold_reps, e2e_reporting=not a.no_e2e_reporting)
    print(tables(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
