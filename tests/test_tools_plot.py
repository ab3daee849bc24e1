"""plot(): a PNG of the expected size, with as many points per series as metrics.jsonl holds."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from raytune_ft.errors import UserError
from raytune_ft.tools.plot import parse_metrics, plot
from tests import test_tools_support as support
from tests.test_tools_support import N_EVAL_POINTS, N_TRAIN_POINTS

workspace = support.workspace  # fixtures shared by the tool tests
_tools_cache = support._tools_cache


def _count(path, key):
    n = 0
    for line in path.read_text().splitlines():
        try:
            n += key in json.loads(line)
        except json.JSONDecodeError:
            pass
    return n


def test_single_run(workspace, tmp_path):
    out = tmp_path / "loss.png"
    result = plot(str(workspace.lora_run), str(out))
    metrics = workspace.lora_run / "metrics.jsonl"
    expected = {"train_loss": _count(metrics, "loss"), "eval_loss": _count(metrics, "eval_loss"),
                "learning_rate": _count(metrics, "learning_rate")}
    assert expected == {"train_loss": N_TRAIN_POINTS, "eval_loss": N_EVAL_POINTS, "learning_rate": N_TRAIN_POINTS}
    assert result["series"] == expected
    assert result["bad_lines"] == 1  # the half-written last line
    img = mpimg.imread(str(out))
    assert img.shape[:2] == (700, 1000) and result["size"] == (1000, 700)
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_spec_source_and_log_scale(workspace, tmp_path):
    out = tmp_path / "sub" / "log.png"
    result = plot(str(workspace.lora_spec_path), str(out), log_scale=True)
    assert result["series"]["train_loss"] == N_TRAIN_POINTS and out.is_file()
    assert result["runs"] == [str(workspace.lora_run / "metrics.jsonl")]
    # a dir inside the run (final/) finds the run's metrics too
    assert plot(str(workspace.lora_run / "final"), str(tmp_path / "f.png"))["series"] == result["series"]


def test_sweep_one_line_per_trial(workspace, tmp_path):
    out = tmp_path / "sweep.png"
    result = plot(str(workspace.sweep), str(out))
    assert result["series"] == {
        "trial-0/train_loss": 6, "trial-0/eval_loss": 2, "trial-0/learning_rate": 6,
        "trial-1/train_loss": 8, "trial-1/eval_loss": 2, "trial-1/learning_rate": 8,
    }
    assert mpimg.imread(str(out)).shape[:2] == (700, 1000)


def test_parse_metrics_keeps_the_last_value_of_a_relogged_step():
    m = parse_metrics('{"step": 1, "loss": 3}\n{"step": 2, "loss": 2}\n{"step": 2, "loss": 1.5}\nnot json\n[1]\n{"loss": 1}\n')
    assert m.series["train_loss"] == [(1, 3.0), (2, 1.5)] and m.bad_lines == 3


def test_nothing_to_plot(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl here"):
        plot(str(tmp_path / "run"), str(tmp_path / "x.png"))
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "grad_norm": 1.0}\n')
    with pytest.raises(UserError, match="no loss, eval_loss or learning_rate"):
        plot(str(tmp_path / "run"), str(tmp_path / "x.png"))
