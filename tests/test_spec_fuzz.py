"""Property-based: hundreds of generated bad specs and overrides all end as exit code 2, one message
that names the offending dotted path, and no traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytune_ft.cli import main
from raytune_ft.spec.models import JobSpec
from tests.specs import base_doc


def _not_number(s: str) -> bool:
    try:
        float(s)
        return False
    except ValueError:
        return True


finite = dict(allow_nan=False, allow_infinity=False)
# dotted path -> values that must be rejected there
BAD_VALUES = {
    "training.learning_rate": st.one_of(st.floats(max_value=0, **finite), st.floats(min_value=1, **finite),
                                        st.text(min_size=1).filter(_not_number)),
    "training.max_steps": st.one_of(st.integers(max_value=0), st.floats(min_value=0.01, max_value=1e6).filter(lambda x: x != int(x))),
    "training.per_device_train_batch_size": st.integers(max_value=0),
    "training.warmup_ratio": st.one_of(st.floats(min_value=1, **finite), st.floats(max_value=-1e-9, **finite)),
    "training.precision": st.text().filter(lambda s: s not in ("bf16", "fp16", "fp32")),
    "training.optimizer": st.text(min_size=1).filter(lambda s: "adam" not in s and s not in ("sgd", "adafactor")),
    "method.type": st.text().filter(lambda s: s not in ("full", "lora", "qlora")),
    "method.lora.r": st.one_of(st.integers(max_value=0), st.integers(min_value=4097)),
    "method.lora.dropout": st.one_of(st.floats(min_value=1, **finite), st.floats(max_value=-1e-9, **finite)),
    "data.max_seq_length": st.integers(max_value=0),
    "data.on_bad_row": st.text().filter(lambda s: s not in ("error", "skip")),
    "compute.num_workers": st.integers(max_value=0),
    "storage.keep_checkpoints": st.integers(max_value=1),
    "deepspeed.stage": st.integers().filter(lambda i: i not in (0, 1, 2, 3)),
    "name": st.text(min_size=1).filter(lambda s: not s[:1].isascii() or not s[:1].isalnum() or len(s) > 63
                                       or any(c in s for c in " /:@")),
}
SECTIONS = ["", "training", "method", "method.lora", "data", "compute", "storage", "model"]


def _valid_keys(section: str) -> set[str]:
    from raytune_ft.spec.document import model_at as _model_at

    model = _model_at(tuple(section.split("."))) if section else JobSpec
    return set(model.model_fields)


value_mutation = st.sampled_from(sorted(BAD_VALUES)).flatmap(
    lambda p: st.tuples(st.just("value"), st.just(p), BAD_VALUES[p]))
unknown_mutation = st.tuples(st.just("unknown"), st.sampled_from(SECTIONS),
                             st.from_regex(r"[a-z][a-z0-9_]{0,24}", fullmatch=True))


def _set(doc: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    cur = doc
    for p in parents:
        cur = cur.setdefault(p, {})
    cur[last] = value


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.filter_too_much])
@given(mut=st.one_of(value_mutation, unknown_mutation), via_override=st.booleans())
def test_generated_bad_specs_exit_2_and_name_the_path(capsys, mut, via_override):
    kind, where, value = mut
    doc = base_doc()
    argv: list[str] = []
    if kind == "value":
        dotted = where
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if via_override and numeric:
            argv = ["--set", f"{dotted}={value!r}"]
        else:
            _set(doc, dotted, value)
    else:
        if value in _valid_keys(where):
            value = value + "_zz"
        dotted = f"{where}.{value}" if where else value
        if via_override:
            argv = ["--set", f"{dotted}=1"]
        else:
            _set(doc, dotted, 1)
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        with pytest.raises(SystemExit) as ei:
            main(["validate", str(path), *argv])
    out = capsys.readouterr()
    assert ei.value.code == 2, out
    assert f" {dotted}: " in out.err, (dotted, out.err)
    assert "Traceback" not in out.err + out.out
