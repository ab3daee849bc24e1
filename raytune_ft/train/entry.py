"""The function each Ray Train worker runs, importable without torch, transformers or peft.

The driver (and a sweep's trial) hands ``TorchTrainer`` this function, which is pickled by reference: so
the driver process never imports transformers just to name the worker's entry point. That matters for
what the console shows: transformers' ``trainer_utils`` imports peft, peft's ``helpers`` imports
bitsandbytes whenever it is installed, and bitsandbytes logs at import, on a CPU with AVX512-BF16,
"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'" (it falls back
to its own kernels). In the worker, :func:`prepare_imports` runs before the recipe is imported: only a
QLoRA run imports bitsandbytes, and that one notice is kept out of its log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

# the module whose import logs the notice above (bitsandbytes/backends/cpu/ops.py)
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def prepare_imports(spec: dict[str, Any]) -> None:
    """Before anything imports peft in this process: outside QLoRA, bitsandbytes is marked absent
    (``sys.modules[name] = None``: an import raises ImportError and ``find_spec`` answers None, so peft,
    transformers and accelerate all treat it as not installed, which is true for what the run needs).
    Only for worker processes, which Ray starts for one run: a process that already imported it, or a
    QLoRA run, keeps it, with its CPU-kernel notice quieted (the fallback is not the user's to fix)."""
    method = (spec.get("method") or {}).get("type", "lora")
    if method == "qlora" or "bitsandbytes" in sys.modules:
        logging.getLogger(BNB_CPU_LOGGER).setLevel(logging.ERROR)
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


def train_loop(config: Any) -> None:
    """Entry point of every Ray Train worker (``config`` is the driver's
    :class:`~raytune_ft.train.config.WorkerConfig`): see :func:`raytune_ft.train.recipe.train_loop`."""
    prepare_imports(config.plan.spec)
    from raytune_ft.train.recipe import train_loop as run

    run(config)
