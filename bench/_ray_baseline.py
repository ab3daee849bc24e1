"""bench/hf_baseline.py's training, run as a Ray Train worker: the same script, the same arguments, inside
``TorchTrainer`` (one worker, gloo, a local Ray started here), so Ray Train's worker environment (an actor
process at Ray's worker niceness, the training function in a thread, torch.distributed initialised and
hence HF's DDP wrapping) can be told apart from rtf's own recipe. Throughput variant "e".

    python bench/_ray_baseline.py <hf_baseline.py arguments>
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    argv = sys.argv[1:]
    out = os.path.abspath(argv[argv.index("--out") + 1])
    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 1
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(num_cpus=max(os.cpu_count() or 1, threads), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    bench = os.path.dirname(os.path.abspath(__file__))

    def loop(cfg):
        sys.path.insert(0, cfg["bench"])
        import hf_baseline

        hf_baseline.main(cfg["argv"])

    try:
        TorchTrainer(loop, train_loop_config={"bench": bench, "argv": argv},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                     torch_config=TorchConfig(backend="gloo"),
                     run_config=RunConfig(name="bench-ray-baseline", storage_path=os.path.join(out, "ray"))).fit()
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
