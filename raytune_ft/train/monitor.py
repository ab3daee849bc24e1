"""The hardware beside the loss: per logging step, what the worker's GPU or CPU is doing.

On a GPU (NVML through nvidia-ml-py, when importable): utilisation %, memory used/total, temperature and
power. On CPU (psutil, which Ray already installs): this process's CPU % and resident memory, and the
machine's CPU %. A GPU that sits under 50 % utilisation for a minute is reported once, with the usual
causes: such a run is waiting on its data or its CPU, not training. Gap filled: HF Trainer and Ray Train
log no hardware figures, and their profilers are too heavy to leave on.
"""

from __future__ import annotations

import os
import time
from typing import Any

LOW_UTIL_PERCENT = 50.0
LOW_UTIL_SECONDS = 60.0


class HardwareMonitor:
    def __init__(self, cuda_index: int | None = None, *, low_util: float = LOW_UTIL_PERCENT,
                 low_util_s: float = LOW_UTIL_SECONDS) -> None:
        import psutil

        self.proc = psutil.Process()
        self.proc.cpu_percent(None)  # the first call starts the interval
        psutil.cpu_percent(None)
        self.low_util, self.low_util_s = low_util, low_util_s
        self.low_since: float | None = None
        self.warned = False
        self.nvml, self.handle = None, None
        if cuda_index is not None:
            self._open_nvml(cuda_index)

    def _open_nvml(self, cuda_index: int) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            # CUDA numbers the visible devices; NVML numbers the physical ones
            visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            ref = visible[cuda_index] if cuda_index < len(visible) else str(cuda_index)
            self.handle = (pynvml.nvmlDeviceGetHandleByIndex(int(ref)) if ref.isdigit()
                           else pynvml.nvmlDeviceGetHandleByUUID(ref))
            self.nvml = pynvml
        except Exception:  # no NVML (nvidia-ml-py missing, a MIG slice, a sandbox): CPU figures only
            self.nvml, self.handle = None, None

    def sample(self) -> dict[str, float]:
        import psutil

        out: dict[str, float] = {
            "cpu_percent": self.proc.cpu_percent(None),
            "system_cpu_percent": psutil.cpu_percent(None),
            "rss_mb": self.proc.memory_info().rss / 2**20,
        }
        if self.nvml is not None:
            n, h = self.nvml, self.handle
            try:
                mem = n.nvmlDeviceGetMemoryInfo(h)
                out.update(gpu_util_percent=float(n.nvmlDeviceGetUtilizationRates(h).gpu),
                           gpu_memory_used_mb=mem.used / 2**20, gpu_memory_total_mb=mem.total / 2**20,
                           gpu_temperature_c=float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                           gpu_power_w=n.nvmlDeviceGetPowerUsage(h) / 1000.0)
            except Exception:
                pass
        return out

    def check(self, sample: dict[str, Any], now: float | None = None) -> str | None:
        """A warning, once, when the GPU has stayed under ``low_util`` % for ``low_util_s`` seconds."""
        util = sample.get("gpu_util_percent")
        if util is None or self.warned:
            return None
        now = time.time() if now is None else now
        if util >= self.low_util:
            self.low_since = None
            return None
        self.low_since = self.low_since if self.low_since is not None else now
        if now - self.low_since < self.low_util_s:
            return None
        self.warned = True
        return (f"GPU utilisation has stayed under {self.low_util:.0f}% for {now - self.low_since:.0f}s "
                f"(now {util:.0f}%): the GPU waits on data or on the CPU. Likely causes: tokenization or "
                "collation in the loop (raise training.dataloader_num_workers and compute.cpus_per_worker), "
                "small batches of short examples (data.packing: true, a larger micro-batch), or a slow "
                "storage read; the process's CPU % in the run's metrics tells which")
