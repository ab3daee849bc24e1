"""The job spec: loading, presets, overrides, line-numbered errors, cross-field rules."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from raytune_ft.errors import SpecError, UserError
from raytune_ft.spec import dump_spec, json_schema, load_spec, spec_from_dict, spec_hash
from tests.specs import base_doc


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems(path, overrides=()) -> list[str]:
    with pytest.raises(SpecError) as ei:
        load_spec(path, list(overrides))
    return ei.value.problems


def test_valid_spec_round_trips(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(base_doc()))
    spec = load_spec(p)
    assert spec.training.learning_rate == 1e-4
    assert spec.data.train[0].path == "train.jsonl"  # a single source is stored as a list
    again = spec_from_dict(dump_spec(spec))
    assert again == spec
    assert spec_hash(again) == spec_hash(spec)


def test_error_names_file_line_and_path(tmp_path):
    p = write(tmp_path, """\
        name: x
        model: {name_or_path: m}
        data:
          train: {path: t.jsonl}
        training:
          max_steps: 5
          learning_rate: -1
        """)
    [msg] = problems(p)
    assert msg == f"{p}:7 training.learning_rate: must be greater than 0 (got -1)" or msg.endswith(
        "spec.yaml:7 training.learning_rate: must be greater than 0 (got -1)"
    )


def test_unknown_key_suggests_nearest(tmp_path):
    p = write(tmp_path, """\
        name: x
        model: {name_or_path: m}
        data: {train: {path: t.jsonl}}
        training:
          max_steps: 5
          lerning_rate: 0.1
        """)
    [msg] = problems(p)
    assert ":6 training.lerning_rate: unknown key; did you mean `learning_rate`?" in msg


def test_duplicate_key_is_an_error(tmp_path):
    p = write(tmp_path, """\
        name: x
        name: y
        """)
    [msg] = problems(p)
    assert ":2 name: duplicate key (first given on line 1)" in msg


@pytest.mark.parametrize(
    "mutate, path, needle",
    [
        (lambda d: d["method"].update(type="qlora"), "method", "qlora needs method.quantization"),
        (lambda d: d["method"].update(type="full"), "method", "takes no method.lora"),
        (lambda d: d["training"].pop("max_steps"), "training", "max_steps or training.num_epochs"),
        (lambda d: d["training"].update(warmup_ratio=1.0), "training.warmup_ratio", "less than 1"),
        (lambda d: d["data"].update(packing=True, max_seq_length=None), "data", "packing needs data.max_seq_length"),
        (lambda d: d["data"].update(eval_split=0.1, eval={"path": "e.jsonl"}), "data", "not both"),
        (lambda d: d["training"].update(eval_strategy="steps"), "training.eval_strategy", "needs evaluation data"),
        (lambda d: d.update(deepspeed={"stage": 2, "offload_params": True}), "deepspeed", "needs ZeRO stage 3"),
        (lambda d: d.update(deepspeed={"stage": 0, "offload_optimizer": True}), "deepspeed", "stage 1, 2 or 3"),
        (
            lambda d: (d["method"].update(type="qlora", quantization={"bits": 8}), d.update(deepspeed={"stage": 3})),
            "deepspeed.stage",
            "cannot partition 8-bit",
        ),
        (
            lambda d: (d["method"].update(type="qlora", quantization={"compute_dtype": "bfloat16"}),
                       d["training"].update(precision="fp16")),
            "training.precision",
            "mixes two half types",
        ),
        (lambda d: d["training"].update(load_best_model_at_end=True), "training", "needs training.eval_strategy"),
        (lambda d: d["training"].update(early_stopping={"patience": 2}), "training", "load_best_model_at_end"),
        (lambda d: d.update(model={"init": {"hidden_size": 64}}), "model.init", "has no tokenizer"),
        (lambda d: d.update(model={"init": {"hidden_size": 65, "num_heads": 4}}), "model.init", "divisible"),
        (lambda d: d.update(model={"name_or_path": "m", "init": {}}), "model", "exactly one"),
        (lambda d: d.update(env={"HF_TOKEN": "hf_abc"}), "env", "looks like a secret"),
        (lambda d: d.update(storage={"path": "gs://bucket/x"}), "storage.path", "s3://"),
        (lambda d: d.update(storage={"keep_checkpoints": 1}), "storage.keep_checkpoints", "greater than or equal to 2"),
        (lambda d: d["method"]["lora"].update(target_modules=[]), "method.lora.target_modules", "non-empty list"),
    ],
)
def test_cross_field_rules(tmp_path, mutate, path, needle):
    doc = base_doc()
    mutate(doc)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    msgs = problems(p)
    assert any(f" {path}: " in m and needle in m for m in msgs), msgs


def test_extends_deep_merges_and_tracks_lines(tmp_path):
    write(tmp_path, yaml.safe_dump(base_doc()), "base.yaml")
    child = write(tmp_path, """\
        extends: base
        name: child
        training:
          learning_rate: 0.5
          max_grad_norm: -3
        """, "child.yaml")
    msgs = problems(child)
    assert any("child.yaml:5 training.max_grad_norm" in m for m in msgs), msgs
    ok = write(tmp_path, "extends: base.yaml\nname: child\ntraining: {learning_rate: 0.5}\n", "ok.yaml")
    spec = load_spec(ok)
    assert spec.name == "child"
    assert spec.training.learning_rate == 0.5
    assert spec.training.max_steps == 10  # inherited through the deep merge
    assert spec.method.lora.r == 8


def test_extends_cycle_and_missing_preset(tmp_path):
    write(tmp_path, "extends: b\nname: a\n", "a.yaml")
    write(tmp_path, "extends: a\nname: b\n", "b.yaml")
    with pytest.raises(UserError, match="cycle"):
        load_spec(tmp_path / "a.yaml")
    write(tmp_path, "extends: a10O\nname: c\n", "c.yaml")
    with pytest.raises(UserError, match="did you mean `a100`"):
        load_spec(tmp_path / "c.yaml")


def test_overrides_are_typed_and_reach_nested_keys_and_lists(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(base_doc()))
    spec = load_spec(p, [
        "training.learning_rate=3e-5",
        "method.lora.r=32",
        "method.lora.target_modules=[q_proj, v_proj]",
        "data.train.0.weight=2",
        "data.train.1.path=more.jsonl",
        "env.TOKENIZERS_PARALLELISM=false",
    ])
    assert spec.training.learning_rate == pytest.approx(3e-5)
    assert spec.method.lora.r == 32
    assert spec.method.lora.target_modules == ["q_proj", "v_proj"]
    assert [s.path for s in spec.data.train] == ["train.jsonl", "more.jsonl"]
    assert spec.data.train[0].weight == 2.0
    assert spec.env["TOKENIZERS_PARALLELISM"] == "false"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("training.learning_rate=abc", "--set training.learning_rate=abc training.learning_rate: must be a number (got"),
        ("training.learning_rate", "expected dotted.key=value"),
        ("name.x=1", "`name` is a str, not a section"),
        ("data.train.5.path=x", "index 5 is out of range"),
        ("training..lr=1", "not a dotted path"),
        ("training.lr=1", "--set training.lr=1 training.lr: unknown key"),
    ],
)
def test_bad_overrides(tmp_path, override, needle):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(base_doc()))
    with pytest.raises(UserError) as ei:
        load_spec(p, [override])
    assert needle in str(ei.value)


def test_missing_and_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = write(tmp_path, "name: [unclosed\n", "bad.yaml")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        load_spec(bad)
    empty = write(tmp_path, "", "empty.yaml")
    with pytest.raises(SpecError, match="empty"):
        load_spec(empty)
    lst = write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(lst)


def test_spec_is_frozen():
    spec = spec_from_dict(base_doc())
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        spec.training.learning_rate = 1.0  # type: ignore[misc]


def test_json_schema_describes_the_spec():
    s = json_schema()
    assert s["title"] == "raytune_ft job spec"
    assert {"name", "model", "data", "training"} <= set(s["required"])
    assert "learning_rate" in s["$defs"]["TrainingSpec"]["properties"]
    assert s["$defs"]["TrainingSpec"]["additionalProperties"] is False


def test_secret_values_never_enter_the_dump(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret_value")
    spec = spec_from_dict(base_doc(env={"HF_TOKEN": None, "TOKENIZERS_PARALLELISM": "false"}))
    text = yaml.safe_dump(dump_spec(spec))
    assert "hf_supersecret_value" not in text
    assert "HF_TOKEN: null" in text
    assert spec.forwarded_env == ["HF_TOKEN"]
