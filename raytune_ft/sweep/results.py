"""A sweep's results: a row per trial (``results.csv``), the table ``rtf sweep results`` shows, and the
winner as a complete spec without ``tune:`` (``best.yaml``). Plain data and files; nothing from Ray Tune
(:mod:`raytune_ft.sweep.tune` collects the rows from Tune's records)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from raytune_ft import storage as st
from raytune_ft.errors import UserError
from raytune_ft.rundir import BEST_YAML, RESULTS_CSV, RunDir
from raytune_ft.spec import to_yaml, validate_document
from raytune_ft.spec.models import JobSpec
from raytune_ft.spec.space import EVAL_METRICS, base_doc, with_values

STATUS_COMPLETED = "completed"
STATUS_STOPPED = "stopped early"
STATUS_ERROR = "error"
STATUS_UNFINISHED = "unfinished"
FIXED_COLUMNS = ("trial", "steps", "status", "stopped_early", "error", "run_dir")


@dataclass
class TrialRow:
    trial: str
    values: dict[str, Any]
    best: float | None
    steps: int | None
    status: str
    run_dir: str
    error: str | None = None
    diverged: bool = False

    @property
    def stopped_early(self) -> bool:
        return self.status == STATUS_STOPPED


@dataclass
class SweepResults:
    name: str
    metric: str
    mode: str
    paths: list[str]
    rows: list[TrialRow]
    scheduler: str = "fifo"
    location: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> TrialRow | None:
        ok = [r for r in self.rows if r.best is not None and not r.diverged and math.isfinite(r.best)]
        if not ok:
            return None
        return (min if self.mode == "min" else max)(ok, key=lambda r: r.best)  # type: ignore[arg-type,return-value]

    @property
    def unfinished(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status == STATUS_UNFINISHED]


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def plain(v: Any) -> Any:
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            return v.item()
        except (TypeError, ValueError):
            return v
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def best_name(name: str) -> str:
    return f"{name[:58]}-best"


def results_csv(res: SweepResults) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", *res.paths, res.metric, "steps", "status", "stopped_early", "error", "run_dir"])
    for r in res.rows:
        value = "nan" if r.diverged and r.best is None else ("" if r.best is None else repr(r.best))
        status = r.status + (", diverged" if r.diverged and r.best is not None else "")
        w.writerow([r.trial, *(json.dumps(r.values.get(p)) for p in res.paths), value,
                    "" if r.steps is None else r.steps, status, str(r.stopped_early).lower(), r.error or "",
                    r.run_dir])
    return buf.getvalue()


def parse_results_csv(text: str, *, name: str = "", location: str = "") -> SweepResults:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not rows[0] or rows[0][0] != "trial":
        raise UserError(f"{location or RESULTS_CSV}: not a sweep results file")
    header = rows[0]
    metrics = [c for c in header if c in (*EVAL_METRICS, "loss")]
    if len(metrics) != 1:
        raise UserError(f"{location or RESULTS_CSV}: no metric column in {header}")
    metric = metrics[0]
    paths = [c for c in header if c not in FIXED_COLUMNS and c != metric]
    out = []
    for raw in rows[1:]:
        rec = dict(zip(header, raw))
        vals = {}
        for p in paths:
            try:
                vals[p] = json.loads(rec.get(p, ""))
            except ValueError:
                vals[p] = rec.get(p)
        best_text = rec.get(metric, "")
        best = float(best_text) if best_text not in ("", "nan") else None
        status = rec.get("status", "")
        diverged = best_text == "nan" or status.endswith(", diverged")
        status = status.removesuffix(", diverged")
        out.append(TrialRow(rec["trial"], vals, best, int(rec["steps"]) if rec.get("steps") else None,
                            status, rec.get("run_dir", ""), rec.get("error") or None, diverged))
    return SweepResults(name, metric, "min", paths, out, location=location)


def render_table(res: SweepResults) -> str:
    head = ["trial", *res.paths, f"best {res.metric}", "steps", "status"]
    body = []
    for r in res.rows:
        best = "diverged" if r.diverged and r.best is None else ("-" if r.best is None else f"{r.best:.4f}")
        status = r.status + (", diverged" if r.diverged else "") + (f": {r.error}" if r.error else "")
        body.append([r.trial, *(fmt(r.values.get(p)) for p in res.paths), best,
                     "-" if r.steps is None else str(r.steps), status])
    right = {len(head) - 3, len(head) - 2} | set(range(1, 1 + len(res.paths)))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join((c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    counts: dict[str, int] = {}
    for r in res.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    title = f"sweep {res.name}: {len(res.rows)} trial(s), " + ", ".join(f"{n} {s}" for s, n in counts.items())
    out = [title, line(head), *(line(b) for b in body)]
    best = res.best
    if best is not None:
        out.append(f"best: {best.trial} ({res.metric} {best.best:.4f}): "
                   + " ".join(f"{p}={fmt(best.values.get(p))}" for p in res.paths))
    return "\n".join(out)


def best_spec(spec: JobSpec, res: SweepResults) -> JobSpec | None:
    """The spec of a full run with the winning values: no tune:, named ``{name}-best``."""
    best = res.best
    if best is None:
        return None
    doc = with_values(base_doc(spec), best.values)
    doc["name"] = best_name(spec.name)
    doc["description"] = (f"the best trial of sweep {spec.name}: {best.trial} ({res.metric} {best.best:.4f}) with "
                          + ", ".join(f"{p}={fmt(best.values.get(p))}" for p in res.paths))
    return validate_document(doc, label="(best of the sweep)")


def write_results(spec: JobSpec, res: SweepResults) -> dict[str, str]:
    """Write results.csv and, when a trial reported the metric, best.yaml into the sweep's dir; their URIs."""
    sweep = RunDir.of(spec)
    st.write_bytes(sweep.fs, sweep.results_file, results_csv(res).encode())
    out = {"results": st.join(res.location, RESULTS_CSV)}
    best = best_spec(spec, res)
    if best is not None:
        text = (f"# the best trial of sweep {spec.name}, as a complete spec: rtf submit this file\n"
                + to_yaml(best))
        st.write_bytes(sweep.fs, sweep.best_file, text.encode())
        out["best"] = st.join(res.location, BEST_YAML)
    return out


# --------------------------------------------------------------------------- `rtf sweep results`


def locate(target: str, *, storage: str = "./rtf_runs", endpoint_url: str | None = None) -> RunDir:
    """The sweep dir a sweep NAME (under ``storage``), a dir, an s3:// URI or a spec file names."""
    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        from raytune_ft.spec import load_spec

        return RunDir.of(load_spec(target))
    if st.is_s3(target):
        return RunDir.at(target.rstrip("/"), endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    if os.path.isdir(target) or os.sep in target or target.startswith("."):
        return RunDir.at(target)
    if st.is_s3(storage):
        return locate(st.join(storage, target), endpoint_url=endpoint_url)
    return RunDir.at(os.path.join(st.local_path(storage), target))


def load_results(target: str, *, storage: str = "./rtf_runs", endpoint_url: str | None = None) -> tuple[SweepResults, str | None]:
    """The results of a sweep (its results file), and the URI of its best spec when there is one."""
    sweep = locate(target, storage=storage, endpoint_url=endpoint_url)
    with st.storage_errors(st.StorageConfig.from_uri(sweep.uri, endpoint_url=endpoint_url), "read"):
        data = st.read_bytes(sweep.fs, sweep.results_file)
        has_best = st.exists(sweep.fs, sweep.best_file)
    if data is None:
        hint = ("the sweep may still be running its first trials, or this is not a sweep dir"
                if sweep.exists() else "pass a sweep name (with --storage), its dir, an s3:// URI or its spec")
        raise UserError(f"no {RESULTS_CSV} in {sweep.uri}", hint=hint)
    res = parse_results_csv(data.decode(), name=sweep.name, location=sweep.uri)
    return res, (sweep.uri_of(BEST_YAML) if has_best else None)


def read_best(target: str, *, storage: str = "./rtf_runs", endpoint_url: str | None = None) -> str:
    """The text of a sweep's best spec."""
    sweep = locate(target, storage=storage, endpoint_url=endpoint_url)
    data = st.read_bytes(sweep.fs, sweep.best_file)
    if data is None:
        raise UserError(f"no {BEST_YAML} in {sweep.uri} (no trial reported the sweep's metric yet)")
    return data.decode()
