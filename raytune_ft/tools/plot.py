"""``rtf plot``: train loss, eval loss and learning rate against step, from a run's ``metrics.jsonl``.

SOURCE: a job spec, a run dir (local or s3://), a dir inside a run (``final/``, a checkpoint), a
``metrics.jsonl`` file, or a sweep dir (one line per trial, one colour per trial in both panels).
The top panel holds the losses (train: solid line; eval: dashed with markers), the bottom one the
learning rate. A line of metrics.jsonl that is not JSON (e.g. the half-written last line of a running
job) is skipped and counted; a step logged twice (a resumed run re-logs the steps after its checkpoint)
keeps its last value.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft import storage as st
from raytune_ft.errors import UserError

SERIES = (("train_loss", "loss"), ("eval_loss", "eval_loss"), ("learning_rate", "learning_rate"))
FIGSIZE = (10.0, 7.0)
DPI = 100


@dataclass
class Metrics:
    """The series of one run: ``{series: [(step, value), ...]}`` sorted by step."""

    name: str
    where: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    bad_lines: int = 0


def plot(source: str, out: str = "loss.png", *, log_scale: bool = False, endpoint_url: str | None = None) -> dict[str, Any]:
    """Write the plot to ``out`` (PNG). Returns ``{"out", "size": (width, height) in pixels,
    "series": {name: number of points}, "bad_lines", "runs"}``; for a sweep the series names are
    ``trial-<id>/train_loss`` etc."""
    runs = load_metrics(source, endpoint_url=endpoint_url)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    sweep = len(runs) > 1 or (runs and runs[0].name.startswith(rd.TRIAL_PREFIX))
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=FIGSIZE, dpi=DPI, sharex=True, height_ratios=(2, 1))
    counts: dict[str, int] = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)] if sweep else None
        prefix = f"{run.name}/" if sweep else ""
        label = f"{run.name} " if sweep else ""
        for key, _ in SERIES:
            pts = run.series.get(key, [])
            counts[prefix + key] = len(pts)
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            if key == "train_loss":
                ax_loss.plot(xs, ys, "-", color=color or "C0", label=f"{label}train loss", linewidth=1.5)
            elif key == "eval_loss":
                ax_loss.plot(xs, ys, "--o", color=color or "C1", label=f"{label}eval loss", markersize=4, linewidth=1.2)
            else:
                ax_lr.plot(xs, ys, "-", color=color or "C2", label=f"{label}learning rate", linewidth=1.2)
    if not any(counts.values()):
        plt.close(fig)
        raise UserError(f"{source}: {rd.METRICS} has no loss, eval_loss or learning_rate values to plot")

    title = runs[0].name if len(runs) == 1 else f"{_sweep_name(source)} ({len(runs)} trials)"
    ax_loss.set_title(title)
    ax_loss.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
    if log_scale:
        from matplotlib.ticker import LogFormatter

        ax_loss.set_yscale("log")
        ax_loss.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 2, 3, 4 rather than 4x10^0
        ax_loss.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    from matplotlib.ticker import MaxNLocator

    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_loss, ax_lr):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", ncol=2 if sweep and len(runs) > 4 else 1)
    fig.tight_layout()
    out = st.local_path(out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return {
        "out": out,
        "size": (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)),
        "series": counts,
        "bad_lines": sum(r.bad_lines for r in runs),
        "runs": [r.where for r in runs],
    }


def _sweep_name(source: str) -> str:
    return posixpath.basename(str(source).rstrip("/")) or str(source)


# --------------------------------------------------------------------------------------------------
# finding and reading metrics


def load_metrics(source: str, *, endpoint_url: str | None = None) -> list[Metrics]:
    """The metrics of the run (or of every trial of the sweep) that ``source`` names."""
    source = str(source)
    storage: Any = None
    if not st.is_s3(source):
        local = st.local_path(source)
        if os.path.isfile(local) and local.endswith((".yaml", ".yml")) and posixpath.basename(local) != rd.SPEC:
            from raytune_ft.spec.loader import load_spec

            spec = load_spec(local)
            source = st.join(spec.storage.path, spec.name)
            storage = spec.storage
        elif os.path.isfile(local) and posixpath.basename(local) == rd.SPEC:
            source = os.path.dirname(local)
        elif not os.path.exists(local):
            raise UserError(f"{source}: no such file or directory")
    cfg = st.config_for(source, storage=storage, endpoint_url=None if storage is not None else endpoint_url)
    with st.storage_errors(cfg, "read"):
        fs, path = st.open(cfg)
        return _collect(fs, path, source, st.is_s3(cfg.path))


def _collect(fs, path: str, source: str, remote: bool) -> list[Metrics]:
    import pyarrow.fs as pafs

    def shown(p: str) -> str:
        return f"s3://{p}" if remote else p

    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        if posixpath.basename(path) == rd.METRICS or path.endswith(".jsonl"):
            return [_read(fs, path, posixpath.basename(posixpath.dirname(path)), shown(path))]
        raise UserError(f"{source}: not a {rd.METRICS} file or a run dir")
    for d in (path, posixpath.dirname(path.rstrip("/"))):  # the run dir, or final/ / checkpoint-* inside it
        p = st.fs_join(d, rd.METRICS)
        if fs.get_file_info(p).type == pafs.FileType.File:
            return [_read(fs, p, posixpath.basename(d.rstrip("/")), shown(p))]
    trials = [d for d in st.list_dirs(fs, path) if d.startswith(rd.TRIAL_PREFIX)]
    runs = []
    for t in trials:
        p = st.fs_join(path, t, rd.METRICS)
        if fs.get_file_info(p).type == pafs.FileType.File:
            runs.append(_read(fs, p, t, shown(p)))
    if runs:
        return runs
    if trials:
        raise UserError(f"{source}: a sweep whose {len(trials)} trial(s) have no {rd.METRICS} yet")
    raise UserError(f"{source}: no {rd.METRICS} here (not a run dir, nor a sweep dir)")


def _read(fs, path: str, name: str, where: str) -> Metrics:
    data = st.read_bytes(fs, path) or b""
    return parse_metrics(data.decode("utf-8", errors="replace"), name, where)


def parse_metrics(text: str, name: str = "run", where: str = "") -> Metrics:
    """Parse metrics.jsonl text into per-series points (see the module docstring)."""
    m = Metrics(name=name, where=where)
    by_step: dict[str, dict[int, float]] = {key: {} for key, _ in SERIES}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            m.bad_lines += 1
            continue
        if not isinstance(row, dict):
            m.bad_lines += 1
            continue
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            m.bad_lines += 1
            continue
        for key, field_name in SERIES:
            v = row.get(field_name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                by_step[key][int(step)] = float(v)
    m.series = {key: sorted(pts.items()) for key, pts in by_step.items()}
    return m
