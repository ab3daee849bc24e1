"""Big checkpoints to a real object store (issue 13 item 4): upload, the training stall, pull and resume.

A Llama-shaped model is built here from a config (random init, nothing downloaded), of ``--hidden`` x
``--layers`` (default 768 x 12, vocabulary 32000, untied head: 134M parameters), given one AdamW step on a
tiny batch so its optimizer holds both moment tensors, and saved the way HF Trainer saves a full
fine-tuning checkpoint: ``model.safetensors`` (fp32 weights, ``save_pretrained``), ``optimizer.pt``
(``torch.save`` of the optimizer's state dict), ``config.json``, ``trainer_state.json``. The scheduler and
RNG files HF adds are a few KB and left out. With the defaults that is 1.6 GB (about 12 bytes a parameter).

SeaweedFS (tests/seaweed.py's ``SeaweedServer``: the ``weed`` binary, S3 gateway on 127.0.0.1) is the store.
In the same run, ``--reps`` times each, alternated:

- ``baseline``: the path before this change: a sha256 pass over the local dir (``ck.file_digests``), then
  ``pyarrow.fs.copy_files`` (Ray Train's default upload, which the workers used), then the manifest;
- ``streaming``: ``st.upload_dir`` (each file read once, hashed as it streams, ``UPLOAD_FILES_AT_ONCE`` files,
  pyarrow's background multipart parts), then the manifest: what ``on_save`` and ``commit_dir`` do now.

Each rep saves the checkpoint again first (training would), so "stall" = save + upload + manifest: what a
training step waits for with a synchronous upload. Upload MB/s counts the checkpoint's bytes over the upload
alone (digests included for the baseline). The local files are in the page cache (just written), as they are
when a trainer has just saved them. Peak RSS growth during each upload is sampled (/proc/self/statm, 50 ms),
and once more per variant in a fresh process (the allocator keeps what an earlier upload freed).

Then the pull side (``ck.pull``, what ``rtf checkpoints pull`` and resume use): a full pull into a new dir; a
pull broken at half its bytes (a wrapper raises OSError there, as a cut connection would) and continued by a
second pull, whose time and fetched bytes are reported against the full pull; and "resume from S3": a full
pull plus loading the weights (safetensors) and the optimizer state (``torch.load(weights_only=True)``).

``--stall`` measures only the training stall per checkpoint, synchronous against asynchronous upload
(``storage.upload``), alternated ``--reps`` times on the same model, with real training steps of it (AdamW,
a batch of 1 x ``--tokens``): ``sync``: save, then the upload and manifest while training waits (the stall is
upload + manifest); ``async``: save, then the upload and manifest in a background thread (what Ray Train's
upload thread runs for rtf: ``st.upload_dir``, the digests, the manifest) while training steps go on until it
is done; its stall is the hand-off plus how much longer those steps took than the same number of steps
without an upload (median step time measured just before, in the same rep). The save itself is the same in
both and reported apart. The store runs on the same machine, so its CPU use slows those steps too.
``--threads N`` gives the steps N torch threads (leaving the other cores to the upload and the store);
``--idle-steps S`` replaces each CPU step by S seconds that leave the CPU free, as a GPU's step does (the
CPU then only launches kernels): what the upload costs training when it does not compete for the cores.

    python bench/checkpoint_io.py [--reps 2] [--hidden 768] [--layers 12] [--json out.json]
    python bench/checkpoint_io.py --stall [--reps 3] [--tokens 64] [--threads N | --idle-steps S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402  (also puts the repo on sys.path: tests.seaweed)

MB = 1e6


class RssPeak:
    """Peak resident set size of this process while the block runs, sampled every 50 ms."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> RssPeak:
        self.base = self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / MB


class _BreakingFile:
    def __init__(self, f: Any, owner: Breaking) -> None:
        self.f, self.owner = f, owner

    def read(self, n: int | None = None) -> bytes:
        o = self.owner
        left = o.fail_after - o.read_bytes
        if left <= 0:
            raise OSError("connection reset (bench: pull broken on purpose)")
        data = self.f.read(min(n, left) if n and n > 0 else left)
        o.read_bytes += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _BreakingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


class Breaking:
    """A pyarrow filesystem whose reads fail once ``fail_after`` bytes were read through it."""

    def __init__(self, fs: Any, fail_after: int) -> None:
        self.fs, self.fail_after, self.read_bytes = fs, fail_after, 0

    def open_input_file(self, path: str) -> _BreakingFile:
        return _BreakingFile(self.fs.open_input_file(path), self)

    def open_input_stream(self, path: str) -> _BreakingFile:
        return _BreakingFile(self.fs.open_input_stream(path), self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)


def build(hidden: int, layers: int) -> tuple[Any, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      intermediate_size=int(hidden * 8 / 3) // 64 * 64, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # one real step: AdamW's exp_avg and exp_avg_sq exist
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def save(model: Any, opt: Any, out: Path) -> float:
    import torch

    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)  # model.safetensors + config.json (+ generation_config)
    torch.save(opt.state_dict(), out / "optimizer.pt")
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    return time.perf_counter() - t0


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


IDLE_STEP_S: float | None = None  # --idle-steps: a step that leaves the CPU free, as a GPU's step does


def train_step(model: Any, opt: Any, ids: Any) -> float:
    t0 = time.perf_counter()
    if IDLE_STEP_S is not None:
        time.sleep(IDLE_STEP_S)
        return time.perf_counter() - t0
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def stall(model: Any, opt: Any, fs: Any, root: str, local: Path, reps: int, tokens: int) -> list[dict[str, Any]]:
    """Training stall per checkpoint: synchronous upload against asynchronous (see the module's doc)."""
    import torch

    from raytune_ft import checkpoints as ck
    from raytune_ft import storage as st

    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    train_step(model, opt, ids)  # warm
    rows = []
    for rep in range(reps):
        for mode in (("sync", "async") if rep % 2 == 0 else ("async", "sync")):
            step_s = C.median([train_step(model, opt, ids) for _ in range(5)])  # no upload running
            t_save = save(model, opt, local)
            dest = st.fs_join(root, f"stall-{mode}-{rep}", ck.checkpoint_dir_name(1))

            def commit(dest: str = dest) -> None:
                files = st.upload_dir(str(local), fs, dest, exclude=(ck.MANIFEST,))
                ck.write_manifest(fs, dest, step=1, epoch=1.0, files=files, spec_hash="bench")

            t0 = time.perf_counter()
            if mode == "sync":
                commit()
                upload_s = time.perf_counter() - t0
                r: dict[str, Any] = {"mode": mode, "save_s": t_save, "upload_s": upload_s, "stall_s": upload_s, "steps": 0}
            else:
                worker = threading.Thread(target=commit)
                worker.start()
                handoff = time.perf_counter() - t0
                n, t_steps = 0, time.perf_counter()
                while worker.is_alive():
                    train_step(model, opt, ids)
                    n += 1
                worker.join()
                took = time.perf_counter() - t_steps
                upload_s = time.perf_counter() - t0
                r = {"mode": mode, "save_s": t_save, "upload_s": upload_s, "steps": n, "steps_s": took,
                     "stall_s": handoff + max(0.0, took - n * step_s), "handoff_s": handoff}
            r["step_s"] = step_s
            rows.append(r)
            print(f"rep {rep} {mode:5s}: step {step_s:.2f} s, save {t_save:.1f} s, upload+manifest {upload_s:.1f} s, "
                  + (f"{r['steps']} steps meanwhile in {r['steps_s']:.1f} s, " if mode == "async" else "")
                  + f"stall {r['stall_s']:.2f} s", flush=True)
            st.delete_dir(fs, st.fs_join(root, f"stall-{mode}-{rep}"))
    return rows


def upload(variant: str, local: Path, fs: Any, dest: str) -> tuple[float, float, float]:
    """(upload seconds, manifest seconds, peak RSS growth MB) of one variant."""
    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck
    from raytune_ft import storage as st

    with RssPeak() as rss:
        t0 = time.perf_counter()
        if variant == "baseline":
            files = ck.file_digests(str(local))
            pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            files = st.upload_dir(str(local), fs, dest, exclude=(ck.MANIFEST,))
        t1 = time.perf_counter()
    ck.write_manifest(fs, dest, step=1, epoch=1.0, files=files, spec_hash="bench")  # checks every size first
    return t1 - t0, time.perf_counter() - t1, rss.growth_mb


_MEMORY_PROBE = r"""
import json, os, sys, time
sys.path[:0] = [sys.argv[5]]
variant, local, uri, endpoint = sys.argv[1:5]
import pyarrow.fs as pafs
from raytune_ft import checkpoints as ck
from raytune_ft import storage as st
fs, dest = st.pyarrow_filesystem(st.StorageConfig(uri, endpoint_url=endpoint))
st.list_files(fs, dest)  # the S3 client is up before the base is taken
with open("/proc/self/statm") as f:
    base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
t0 = time.perf_counter()
if variant == "baseline":
    ck.file_digests(local)
    pafs.copy_files(local, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
else:
    st.upload_dir(local, fs, dest)
t = time.perf_counter() - t0
with open("/proc/self/status") as f:  # VmHWM: this image's peak (ru_maxrss would carry the forking parent's)
    peak = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) * 1024
print(json.dumps({"base_mb": base / 1e6, "peak_mb": peak / 1e6, "growth_mb": (peak - base) / 1e6, "upload_s": t}))
"""


def memory_probe(variant: str, local: Path, uri: str, endpoint: str) -> dict[str, float]:
    """One upload in a fresh process: its peak RSS over its RSS before the upload (an allocator keeps what a
    previous upload in the same process freed, so in-process figures after the first one say little)."""
    import subprocess

    p = subprocess.run([C.PY, "-c", _MEMORY_PROBE, variant, str(local), uri, endpoint, str(C.REPO)],
                       capture_output=True, text=True, timeout=900, env=C.bench_env())
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--stall", action="store_true", help="only the training stall, sync against async upload")
    ap.add_argument("--tokens", type=int, default=64, help="--stall: tokens in a training step's batch")
    ap.add_argument("--threads", type=int, default=0, help="--stall: torch threads for the steps (0: torch's)")
    ap.add_argument("--idle-steps", type=float, default=None, metavar="S",
                    help="--stall: steps of S seconds that leave the CPU free (a GPU step), not CPU steps")
    args = ap.parse_args()
    global IDLE_STEP_S
    IDLE_STEP_S = args.idle_steps
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck
    from raytune_ft import storage as st
    from tests.seaweed import SeaweedServer

    info = C.machine_info()
    print(f"machine: {info.get('cpu')}, {info.get('cores_usable')} cores, {info.get('memory_gib')} GiB; "
          f"load {tuple(round(x, 2) for x in info.get('loadavg', ()))}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="rtf-bench-ckio-"))
    out: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    server = SeaweedServer(root=str(work / "seaweed"))
    try:
        t0 = time.perf_counter()
        model, opt = build(args.hidden, args.layers)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e6:.1f}M parameters, built and stepped in {time.perf_counter() - t0:.1f} s",
              flush=True)
        server.start()
        os.environ.update(server.env())
        bucket = server.create_bucket()
        fs, root = st.pyarrow_filesystem(st.StorageConfig(f"s3://{bucket}/bench", endpoint_url=server.endpoint_url))
        local = work / "local" / "checkpoint-1"
        save(model, opt, local)  # untimed: the first save also pays for imports and first allocations
        if args.stall:
            size = dir_bytes(local)
            rows = stall(model, opt, fs, root, local, args.reps, args.tokens)
            out["stall"] = {"bytes": size, "params": n_params, "rows": rows}
            sync = [r for r in rows if r["mode"] == "sync"]
            asyn = [r for r in rows if r["mode"] == "async"]
            up = C.median([r["upload_s"] for r in sync])
            a_stall = C.median([r["stall_s"] for r in asyn])
            print(f"\ncheckpoint {size / MB:.0f} MB; medians of {args.reps}")
            print(C.fmt_table(["mode", "save s", "upload+manifest s", "stall s", "stall / sync upload"], [
                ["sync", C.median([r["save_s"] for r in sync]), up, C.median([r["stall_s"] for r in sync]), 1.0],
                ["async", C.median([r["save_s"] for r in asyn]), C.median([r["upload_s"] for r in asyn]), a_stall,
                 a_stall / up]]))
            out["summary"] = {"async_stall_over_sync_upload": a_stall / up}
            if args.json:
                args.json.write_text(json.dumps(out, indent=2))
            return 0

        # ---------------------------------------------------------------- upload and stall
        rows: dict[str, list[dict[str, float]]] = {"baseline": [], "streaming": []}
        size = 0
        for rep in range(args.reps):
            for variant in (("baseline", "streaming") if rep % 2 == 0 else ("streaming", "baseline")):
                t_save = save(model, opt, local)
                size = dir_bytes(local)
                dest = st.fs_join(root, f"{variant}-{rep}", ck.checkpoint_dir_name(1))
                t_up, t_man, rss = upload(variant, local, fs, dest)
                r = {"save_s": t_save, "upload_s": t_up, "manifest_s": t_man, "stall_s": t_save + t_up + t_man,
                     "upload_mb_s": size / MB / t_up, "rss_growth_mb": rss}
                rows[variant].append(r)
                print(f"rep {rep} {variant:9s}: save {t_save:5.1f} s, upload {t_up:5.1f} s "
                      f"({r['upload_mb_s']:.0f} MB/s), manifest {t_man:.2f} s, stall {r['stall_s']:.1f} s, "
                      f"peak RSS +{rss:.0f} MB", flush=True)
                if rep < args.reps - 1 or variant == "baseline":
                    st.delete_dir(fs, dest)  # keep the store's disk use down; the last streaming one is pulled
        memory = {}
        for variant in ("baseline", "streaming"):
            uri = f"s3://{bucket}/bench/memory-{variant}/{ck.checkpoint_dir_name(1)}"
            memory[variant] = memory_probe(variant, local, uri, server.endpoint_url)
            st.delete_dir(fs, st.fs_join(root, f"memory-{variant}"))
            print(f"memory, fresh process, {variant}: peak RSS {memory[variant]['peak_mb']:.0f} MB, "
                  f"+{memory[variant]['growth_mb']:.0f} MB over its {memory[variant]['base_mb']:.0f} MB before "
                  f"the upload ({memory[variant]['upload_s']:.1f} s)", flush=True)
        out["memory"] = memory
        files = ck.file_digests(str(local))
        out["checkpoint"] = {"bytes": size, "files": {f["path"]: f["size"] for f in files}, "params": n_params}
        out["upload"] = rows
        del model, opt

        # ---------------------------------------------------------------- pull, broken pull, resume
        src = st.fs_join(root, f"streaming-{args.reps - 1}", ck.checkpoint_dir_name(1))
        info_ck = ck.inspect_checkpoint(fs, src, deep=False)
        assert info_ck.committed, info_ck.reason
        pulls = work / "pulls"
        full = []
        for i in range(args.reps):
            t0 = time.perf_counter()
            got = ck.pull(fs, src, str(pulls / f"full-{i}"))
            full.append(time.perf_counter() - t0)
            assert got.fetched_bytes == size and got.reused_bytes == 0
            shutil.rmtree(pulls / f"full-{i}")
            print(f"full pull {i}: {full[-1]:.1f} s ({size / MB / full[-1]:.0f} MB/s)", flush=True)
        broken_s, resumed_s, resumed_fetched, resumed_reused = [], [], [], []
        for i in range(args.reps):
            dest = pulls / f"resumed-{i}"
            t0 = time.perf_counter()
            try:
                ck.pull(Breaking(fs, fail_after=size // 2), src, str(dest))
                raise AssertionError("the pull was meant to break")
            except OSError:
                broken_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = ck.pull(fs, src, str(dest))
            resumed_s.append(time.perf_counter() - t0)
            resumed_fetched.append(got.fetched_bytes)
            resumed_reused.append(got.reused_bytes)
            lfs = pafs.LocalFileSystem()
            assert ck.verify(lfs, str(dest), ck.read_manifest(lfs, str(dest))) == []
            shutil.rmtree(dest)
            print(f"broken pull {i}: stopped after {broken_s[-1]:.1f} s; continued in {resumed_s[-1]:.1f} s, "
                  f"{got.fetched_bytes / MB:.0f} MB fetched, {got.reused_bytes / MB:.0f} MB reused "
                  f"({got.reused_files} whole files)", flush=True)
        # resume from S3: pull + load what a resumed trainer loads
        import torch
        from safetensors.torch import load_file

        resume = []
        for i in range(args.reps):
            dest = pulls / f"resume-{i}"
            t0 = time.perf_counter()
            ck.pull(fs, src, str(dest))
            t_pull = time.perf_counter() - t0
            weights = load_file(str(dest / "model.safetensors"))
            state = torch.load(dest / "optimizer.pt", weights_only=True)
            t_all = time.perf_counter() - t0
            del weights, state
            shutil.rmtree(dest)
            resume.append({"pull_s": t_pull, "load_s": t_all - t_pull, "total_s": t_all})
            print(f"resume {i}: pull {t_pull:.1f} s + load {t_all - t_pull:.1f} s = {t_all:.1f} s", flush=True)
        out["pull"] = {"full_s": full, "broken_s": broken_s, "resumed_s": resumed_s,
                       "resumed_fetched_bytes": resumed_fetched, "resumed_reused_bytes": resumed_reused,
                       "resume": resume}
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)

    # ---------------------------------------------------------------- summary
    def med(variant: str, key: str) -> float:
        return C.median([r[key] for r in out["upload"][variant]])

    print(f"\ncheckpoint: {size / MB:.0f} MB ({size / 2**30:.2f} GiB), {len(out['checkpoint']['files'])} files, "
          f"{out['checkpoint']['params'] / 1e6:.1f}M parameters; medians of {args.reps}")
    rows_t = []
    for v in ("baseline", "streaming"):
        rows_t.append([v, med(v, "save_s"), med(v, "upload_s"), med(v, "upload_mb_s"), med(v, "manifest_s"),
                       med(v, "stall_s"), med(v, "rss_growth_mb")])
    print(C.fmt_table(["variant", "save s", "upload s", "upload MB/s", "manifest s", "stall s", "peak RSS +MB"],
                      rows_t))
    b, s = rows_t
    print(f"streaming / baseline: upload time {s[2] / b[2]:.2f}x, stall {s[5] / b[5]:.2f}x")
    p = out["pull"]
    f_med = C.median(p["full_s"])
    r_med = C.median(p["resumed_s"])
    print(f"full pull {f_med:.1f} s ({size / MB / f_med:.0f} MB/s); pull broken at half, continued: "
          f"{r_med:.1f} s ({r_med / f_med:.2f}x the full pull), {C.median(p['resumed_fetched_bytes']) / MB:.0f} MB "
          f"fetched; resume from S3 (pull + load): {C.median([r['total_s'] for r in p['resume']]):.1f} s")
    out["summary"] = {"upload_ratio": s[2] / b[2], "stall_ratio": s[5] / b[5], "resumed_over_full": r_med / f_med}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
