"""Every preset in jobspecs/ validates, and its memory estimate fits its GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from raytune_ft.plan import GIB, make_plan
from raytune_ft.spec import load_spec

PRESETS = sorted((Path(__file__).resolve().parents[1] / "jobspecs").glob("*.yaml"))
EXPECTED = {"a100", "h100", "rtx4090", "a40", "quickstart", "sweep", "k8s", "runpod", "prm-regression", "dpo"}


def test_all_presets_exist():
    assert EXPECTED <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_and_fits(path):
    spec = load_spec(path)
    plan = make_plan(spec)
    assert plan.memory.known, f"{path.name}: memory estimate unknown"
    if spec.compute.accelerator_type:
        assert plan.accelerator_memory_gib, f"{path.name}: unknown accelerator"
        assert plan.memory.total / GIB < plan.accelerator_memory_gib, plan.memory.gib()
        assert not [w for w in plan.warnings if "exceeds" in w]
    else:
        assert not spec.compute.use_gpu


def test_quickstart_is_cpu_tiny_offline():
    spec = load_spec(PRESETS[[p.stem for p in PRESETS].index("quickstart")])
    assert spec.model.init is not None and spec.tokenizer.train is not None
    assert spec.compute.gpus_per_worker == 0 and spec.training.precision == "fp32"
    assert make_plan(spec).memory.total_params >= 5_000_000
