"""How often worker groups ask Ray about preemption (``fault_tolerance.preemption_check_steps: null``): after
the calibration steps, at most 1% of the step time goes to asking (a collective that took about 8 ms on this
machine), and a notice is never more than 5 s of steps away. Rank 0's arithmetic, on given timings (the real
calibration runs inside every worker-group run, and the two-node preemption test in test_multinode.py
relies on it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from raytune_ft.train.callbacks import ASK_EVERY_S, CALIBRATION_STEPS, RtfCallback


def interval(step_s: float, ask_s: float) -> int:
    cb = RtfCallback(run=SimpleNamespace(rank=0), spec_hash="x", publisher=None, work_dir="/nonexistent")
    assert cb.preemption_every is None  # the default: calibrate
    cb.step_s = [30.0] + [step_s] * (CALIBRATION_STEPS - 1)  # the first step carries the start-up: left out
    cb.ask_s = [1.0] + [ask_s] * (CALIBRATION_STEPS - 1)
    return cb.choose_preemption_interval()


@pytest.mark.parametrize(("step_s", "ask_s", "every"), [
    (0.25, 0.008, 4),    # an H200 LoRA step: asking every 4th step is 0.8% and every second
    (0.1, 0.008, 8),     # a tiny CPU step
    (0.01, 0.008, 80),   # very short steps: 0.8 s apart
    (0.002, 0.008, 400),  # 0.8 s apart
    (3.0, 0.008, 1),     # a long step: every step (1 is the least)
    (0.001, 0.1, 5000),  # slow asking, fast steps: the 1% rule says 10,000 steps (10 s), capped at 5 s
])
def test_the_interval_keeps_asking_cheap_and_frequent(step_s, ask_s, every):
    got = interval(step_s, ask_s)
    assert got == every
    assert got == 1 or got * step_s <= ASK_EVERY_S + 1e-9
    assert got == int(ASK_EVERY_S / step_s) or ask_s / (got * step_s) <= 0.01 + 1e-9


def test_in_process_runs_never_ask_and_a_fixed_interval_is_kept():
    run = SimpleNamespace(rank=0)
    assert RtfCallback(run=run, spec_hash="x", publisher=None, work_dir="/x", in_process=True).preemption_every == 0
    assert RtfCallback(run=run, spec_hash="x", publisher=None, work_dir="/x", preemption_check_steps=3
                       ).preemption_every == 3
