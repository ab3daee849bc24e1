"""What makes a run the run it is: resubmitting a spec under the same name resumes its checkpoints, so a
changed model, data or method must not silently continue from weights trained on something else.

Pure: two resolved spec dicts in, the dotted paths that changed out, split into those that would make
the resumed run another run (refused) and those that only extend or observe it (allowed, logged).
"""

from __future__ import annotations

from typing import Any

# Changes a resume allows: how long to train, how often to log/evaluate/save, what to report to, how many
# workers and where (the global batch follows compute, as on a preempted cluster), and everything about
# where and how the run is submitted. Everything else defines the run.
EXTENDS_OR_OBSERVES = (
    "name", "description", "extends",
    "training.max_steps", "training.num_epochs", "training.logging_steps", "training.eval_steps",
    "training.save_steps", "training.eval_strategy", "training.dataloader_num_workers",
    "training.early_stopping", "training.load_best_model_at_end",
    "data.on_bad_row", "monitoring", "compute", "cluster", "storage", "fault_tolerance", "env", "tune",
)


# Values that name the same thing: torch's AdamW fused into one kernel or not (the same update, the same optimizer
# state), so a run started under the old default (adamw_torch) resumes under the new one.
SAME = {"training.optimizer": {"adamw_torch_fused": "adamw_torch"}}


def _same(path: str, value: Any) -> Any:
    return SAME.get(path, {}).get(value, value) if isinstance(value, str) else value


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}


def _allowed(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in EXTENDS_OR_OBSERVES)


def changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(defining, allowed): the dotted paths whose values differ between two dumped specs."""
    a, b = _flatten(old), _flatten(new)
    changed = sorted(p for p in set(a) | set(b) if _same(p, a.get(p)) != _same(p, b.get(p)))
    defining = [p for p in changed if not _allowed(p)]
    return defining, [p for p in changed if _allowed(p)]


def describe(old: dict[str, Any], new: dict[str, Any], paths: list[str], limit: int = 6) -> str:
    a, b = _flatten(old), _flatten(new)
    shown = [f"{p} {a.get(p, '(unset)')!r} -> {b.get(p, '(unset)')!r}" for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return "; ".join(shown) + more
