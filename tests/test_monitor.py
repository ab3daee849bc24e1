"""The hardware monitor: CPU figures measured here for real; the low-GPU-utilisation rule on given samples
(no GPU on this machine, and NVML cannot be made to report a chosen utilisation)."""

from __future__ import annotations

import time

from raytune_ft.train.monitor import HardwareMonitor


def test_cpu_figures_are_this_process():
    import psutil

    m = HardwareMonitor(None)
    end = time.time() + 0.3
    x = 0
    while time.time() < end:  # burn CPU so the process's share is visibly above zero
        x += 1
    s = m.sample()
    assert s["cpu_percent"] > 10 and 0 <= s["system_cpu_percent"] <= 100
    rss = psutil.Process().memory_info().rss / 2**20
    assert abs(s["rss_mb"] - rss) < 0.1 * rss
    assert "gpu_util_percent" not in s  # no GPU asked for


def test_low_gpu_utilisation_warns_once_after_a_minute():
    m = HardwareMonitor(None)
    t0 = 1000.0
    assert m.check({"gpu_util_percent": 30.0}, t0) is None
    assert m.check({"gpu_util_percent": 95.0}, t0 + 30) is None  # recovered: the clock restarts
    assert m.check({"gpu_util_percent": 20.0}, t0 + 40) is None
    assert m.check({"gpu_util_percent": 25.0}, t0 + 99) is None  # 59 s low
    w = m.check({"gpu_util_percent": 22.0}, t0 + 101)
    assert w is not None and "under 50% for 61s (now 22%)" in w and "dataloader_num_workers" in w
    assert m.check({"gpu_util_percent": 10.0}, t0 + 500) is None  # once
    assert HardwareMonitor(None).check({"cpu_percent": 5.0}, t0) is None  # CPU runs have no such rule
