"""Hostile input: every spec field that reaches a command line, a shell variable, a Kubernetes resource or a
rendered manifest is held to a strict shape. Each generated case goes through `rtf validate`, `rtf plan`,
`rtf render k8s` and `rtf render runpod`: exit 2, one line naming the field, no traceback, nothing written.
Hostile files (an alias bomb, a 50 MB string, 500-deep nesting) are refused by size and shape caps."""

from __future__ import annotations

import itertools
import time

import pytest
import yaml

from raytune_ft.cli import main
from raytune_ft.spec.base import CONTROL_RE, UNSAFE_TEXT_RE
from raytune_ft.spec.loader import shown_override

# Payloads that break out of a shell quote, a YAML scalar, a JSON string or a Kubernetes name, or that change how
# a line reads (control characters, a terminal escape, an invisible line separator, a bidi override).
INJECTIONS = [
    "x'; curl http://127.0.0.1:9/p | sh #",
    'x"; rm -rf / #',
    "$(id)",
    "`id`",
    "ok\n",  # a trailing newline: `$` alone accepts it
    "a\nkind: Secret",
    "a\x00b",
    "x && reboot",
    "{{7*7}}",
    "a|b",
    "x;id",
    "x\r",
    "\x1b[2Jx",
    "a\u2028b",
    "a\u202eb",
]

# dotted path -> how the payload is placed (a scalar field, a list item or a mapping key/value)
FIELDS = {
    "name": "scalar",
    "compute.accelerator_type": "scalar",
    "cluster.image": "scalar",
    "cluster.address": "scalar",
    "cluster.pip": "list",
    "cluster.kubernetes.namespace": "scalar",
    "cluster.kubernetes.service_account": "scalar",
    "cluster.kubernetes.secret_name": "scalar",
    "cluster.kubernetes.head_cpu": "scalar",
    "cluster.kubernetes.head_memory": "scalar",
    "cluster.kubernetes.worker_cpu": "scalar",
    "cluster.kubernetes.worker_memory": "scalar",
    "cluster.kubernetes.ray_version": "scalar",
    "cluster.kubernetes.node_selector": "value",
    "cluster.kubernetes.node_selector ": "key",
    "cluster.runpod.gpu_type": "scalar",
    "storage.endpoint_url": "scalar",
    "storage.access_key_env": "scalar",
    "storage.secret_key_env": "scalar",
    "storage.session_token_env": "scalar",
    "storage.region": "scalar",
    "storage.path": "scalar",
    "model.name_or_path": "scalar",
    "model.revision": "scalar",
    "tokenizer.name_or_path": "scalar",
    "monitoring.experiment": "scalar",
    "env": "key",
    "env ": "value",
}
# free text where only control and invisible characters are refused: an S3 key, a hub id or local path
FREE_TEXT = {"storage.path", "model.name_or_path", "tokenizer.name_or_path"}


def base(tmp_path) -> dict:
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    return {
        "name": "hostile",
        "model": {"name_or_path": "some/model"},
        "data": {"train": {"path": str(tmp_path / "train.jsonl")}, "max_seq_length": 64},
        "training": {"max_steps": 10, "learning_rate": 1e-4},
        "compute": {"num_workers": 1, "gpus_per_worker": 1},
        "cluster": {"image": "ghcr.io/you/rtf:0.1.0", "kubernetes": {}, "runpod": {}},
        "storage": {"path": str(tmp_path / "runs")},
    }


def place(doc: dict, field: str, how: str, payload: str) -> None:
    *parents, last = field.strip().split(".")
    cur = doc
    for p in parents:
        cur = cur.setdefault(p, {})
    if how == "scalar":
        cur[last] = payload if field != "storage.endpoint_url" else f"https://h.example/{payload}"
        if field == "storage.path":
            cur[last] = f"s3://bucket/{payload}"
    elif how == "list":
        cur[last] = ["ok-pkg", payload]
    elif how == "key":
        cur[last] = {payload: "v"} if last != "env" else {payload: None}
    else:
        cur[last] = {"ok": payload} if last != "env" else {"OK_VAR": payload}


def cases():
    for (field, how), payload in itertools.product(FIELDS.items(), INJECTIONS):
        if field.strip() in FREE_TEXT and not UNSAFE_TEXT_RE.search(payload):
            continue  # any other character is a valid S3 key or path; a control or invisible one is not
        if field.strip() == "env" and how == "value" and not CONTROL_RE.search(payload):
            continue  # literal env values are free text, passed as data (never pasted into a script)
        yield field, how, payload


CASES = list(cases())
COMMANDS = {
    "validate": lambda spec, out: ["validate", spec],
    "plan": lambda spec, out: ["plan", spec, "--offline"],
    "render-k8s": lambda spec, out: ["render", "k8s", spec, "-o", out],
    "render-runpod": lambda spec, out: ["render", "runpod", spec, "-o", out],
}


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    cap = capsys.readouterr()
    return ei.value.code, cap.out + cap.err


def test_enough_cases():
    assert len(CASES) + len(FILES) >= 300  # each through every command in COMMANDS


@pytest.mark.parametrize("field,how,payload", CASES, ids=[f"{f.strip()}-{h}-{i}" for i, (f, h, _) in enumerate(CASES)])
def test_injection_is_refused_everywhere(tmp_path, capsys, field, how, payload):
    doc = base(tmp_path)
    place(doc, field, how, payload)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    before = sorted(p.name for p in tmp_path.iterdir())
    dotted = field.strip()
    for cmd, argv in COMMANDS.items():
        out_path = tmp_path / f"out-{cmd}"
        t0 = time.perf_counter()
        code, out = run_cli(argv(str(spec), str(out_path)), capsys)
        took = time.perf_counter() - t0
        assert code == 2, (cmd, out)
        assert "Traceback" not in out, (cmd, out)
        # one error line; a note may follow it naming the rules that could not run on the refused value
        lines = [x for x in out.splitlines() if x.strip() and not x.startswith("  note: ")]
        assert len(lines) == 1 and lines[0].startswith("error: invalid job spec: "), (cmd, out)
        assert all(x.endswith("skipped: fix the field errors above first") for x in out.splitlines()
                   if x.startswith("  note: ")), (cmd, out)
        assert f" {dotted}" in lines[0], (cmd, dotted, out)
        assert not out_path.exists(), (cmd, "wrote output for a refused spec")
        assert took < 30, (cmd, took)  # a hang guard, not a timing: each takes milliseconds
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run dir, no marker, no manifest


def _bomb(fan: int, levels: int) -> str:
    """YAML aliases repeating aliases: ``fan ** levels`` values from a few hundred bytes."""
    return "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan) if i else ', '.join(['1'] * fan)}]\n"
                   for i in range(levels)) + "name: x\n"


def _spec_text(tmp_path, *, replace: tuple[str, str] | None = None, extra: str = "") -> str:
    """A valid spec's YAML with one hostile piece: a line replaced, or text appended."""
    text = yaml.safe_dump(base(tmp_path), sort_keys=False)
    if replace:
        assert replace[0] in text
        text = text.replace(replace[0], replace[1], 1)
    return text + extra


# Hostile files (size, aliases, depth, control characters and tags in the YAML itself): (id, builder, expect).
FILES = [
    *[(f"alias-{f}x{n}", lambda t, f=f, n=n: _bomb(f, n), "expands to more than 100,000 values")
      for f, n in ((9, 10), (2, 40), (100, 4), (1000, 2))],
    ("alias-in-spec", lambda t: _spec_text(t, extra="x: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
        f"x{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 10)}]\n" for i in range(6))),
     "expands to more than 100,000 values"),
    *[(f"list-{d}", lambda t, d=d: "model: " + "[" * d + "]" * d + "\n", "nested more than 64 levels deep")
      for d in (65, 500, 5000)],
    *[(f"map-{d}", lambda t, d=d: "model: " + "{a: " * d + "1" + "}" * d + "\n", "nested more than 64 levels deep")
      for d in (65, 500, 5000)],
    ("block-70", lambda t: "".join("  " * i + f"k{i}:\n" for i in range(70)) + "  " * 70 + "v\n",
     "nested more than 64 levels deep"),
    ("size-1MiB+1", lambda t: "name: " + "x" * (1 << 20) + "\n", "a job spec is at most 1,048,576"),
    ("size-50MB", lambda t: "name: " + "x" * (50 << 20) + "\n", "a job spec is at most 1,048,576"),
    ("many-keys", lambda t: "".join(f"k{i}: v\n" for i in range(200_000)), "a job spec is at most 1,048,576"),
    ("bad-utf8", lambda t: b"name: \xff\xfe\n", "not UTF-8 text"),
    *[(f"char-{c:02x}", lambda t, c=c: _spec_text(t, replace=("name: hostile", f"name: a{chr(c)}b")),
       f"not valid YAML: unacceptable character #x{c:04x}") for c in (0x00, 0x07, 0x1b, 0x7f)],
    ("python-apply", lambda t: _spec_text(t, replace=("name: hostile", "name: !!python/object/apply:os.system ['id']")),
     "name: must be text (got a list)"),  # the tag is never honoured: a plain list, refused by the field
    ("python-name", lambda t: _spec_text(t, replace=("name: hostile", "name: !!python/name:os.system")),
     "not valid YAML: could not determine a constructor for the tag"),
    ("two-docs", lambda t: _spec_text(t, extra="---\nname: other\n"), "not valid YAML: expected a single document"),
    ("not-mapping", lambda t: "- a\n- b\n", "a job spec must be a YAML mapping"),
]


@pytest.mark.parametrize("build,expect", [(b, e) for _, b, e in FILES], ids=[i for i, _, _ in FILES])
@pytest.mark.timeout(120)
def test_hostile_files_are_refused_by_caps(tmp_path, capsys, build, expect):
    content = build(tmp_path)
    spec = tmp_path / "bomb.yaml"
    spec.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    before = sorted(p.name for p in tmp_path.iterdir())
    for cmd, argv in COMMANDS.items():
        out_path = tmp_path / f"out-{cmd}"
        t0 = time.perf_counter()
        code, out = run_cli(argv(str(spec), str(out_path)), capsys)
        took = time.perf_counter() - t0
        assert code == 2 and "Traceback" not in out, (cmd, out[:2000])
        lines = [x for x in out.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], (cmd, out[:2000])
        assert not out_path.exists(), (cmd, "wrote output for a refused spec")
        assert took < 30, (cmd, took)  # a hang guard: each is a refusal in milliseconds
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_credentials_and_tokens_are_refused_and_never_echoed(tmp_path, capsys):
    doc = base(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    cases = {
        "storage.endpoint_url=https://AKIAABCDEFGHIJKLMNOP:sEcReTvAlUe@h.example": "must not carry credentials",
        "cluster.address=http://user:sEcReTvAlUe@head:8265": "must not carry credentials",
        "env.SOME_VAR=hf_aBcDeFgHiJkLmNoPqRsT": "looks like a credential",
        "env.NOTE=Bearer sk-aBcDeFgHiJkLmNoP": "looks like a credential",
        "env.GITHUBTOKEN=sEcReTvAlUe": "looks like a secret",
        "env.DB_PASS=sEcReTvAlUe": "looks like a secret",
        "env.GH_PAT=sEcReTvAlUe": "looks like a secret",
        "env.OPENAI_KEY=sEcReTvAlUe": "looks like a secret",
    }
    for override, expect in cases.items():
        code, out = run_cli(["validate", str(spec), "--set", override], capsys)
        assert code == 2 and expect in out, (override, out)
        for secret in ("sEcReTvAlUe", "aBcDeFgHiJkLmNoP", "AKIAABCDEFGHIJKLMNOP"):
            assert secret not in out, (override, out)
    # what stays allowed: names that merely contain the letters, and forwarding by name
    for override in ("env.TOKENIZERS_PARALLELISM=false", "env.PYTHONPATH=/opt/x", "env.HF_TOKEN=null"):
        code, out = run_cli(["validate", str(spec), "--set", override], capsys)
        assert code == 0, (override, out)


def test_shown_override_masks():
    assert shown_override("storage.endpoint_url=https://K:S@h") == "storage.endpoint_url=https://***@h"
    assert shown_override("env.MY_SECRET=plain") == "env.MY_SECRET=***"
    assert shown_override("env.X=hf_abcdefghijk") == "env.X=***"
    assert shown_override("training.learning_rate=abc") == "training.learning_rate=abc"


def test_metric_for_best_model_is_the_trainers_name(tmp_path, capsys):
    """`loss` means eval_loss to HF's Trainer; rtf keeps checkpoints by the same name."""
    from raytune_ft.spec import spec_from_dict

    doc = base(tmp_path)
    doc["training"]["metric_for_best_model"] = "loss"
    assert spec_from_dict(doc).training.metric_for_best_model == "eval_loss"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    code, out = run_cli(["validate", str(spec), "--set", "training.metric_for_best_model=train_loss"], capsys)
    assert code == 2 and "training.metric_for_best_model: 'train_loss' is not a metric evaluation reports" in out


def test_a_tracker_that_is_not_installed_is_refused(tmp_path, capsys, monkeypatch):
    from raytune_ft.spec import base as spec_base

    # The dev install has wandb (tests/test_trackers.py needs it), so its absence is simulated: the one mock
    # here, standing for a machine without the package.
    real = spec_base.importable
    monkeypatch.setattr(spec_base, "importable", lambda m: False if m == "wandb" else real(m))
    doc = base(tmp_path)
    doc["monitoring"] = {"report_to": ["tensorboard", "wandb"]}
    doc.pop("cluster")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    code, out = run_cli(["validate", str(spec)], capsys)
    assert code == 2 and "monitoring.report_to names wandb, which is not installed here" in out
    assert "pip install 'raytune_ft[wandb]'" in out
    for pip in ("wandb", "wandb>=0.17", "raytune_ft[wandb]"):
        code, out = run_cli(["validate", str(spec), "--set", f"cluster.pip=['{pip}']"], capsys)
        assert code == 0, out  # installed on the cluster by the job's runtime_env


def test_wont_fit_warning_suggests_only_what_is_off():
    from raytune_ft.plan import make_plan
    from raytune_ft.spec import spec_from_dict

    doc = {"name": "big", "model": {"name_or_path": "meta-llama/Llama-3.1-8B"},
           "data": {"train": {"path": "t.jsonl"}, "max_seq_length": 8192},
           "training": {"max_steps": 10, "per_device_train_batch_size": 8, "gradient_checkpointing": True},
           "compute": {"gpus_per_worker": 1, "accelerator_type": "L4"}}
    w = [x for x in make_plan(spec_from_dict(doc)).warnings if "exceeds" in x][0]
    assert "gradient_checkpointing" not in w and "liger_kernel" in w and "qlora" in w
    doc["method"] = {"type": "qlora", "quantization": {"bits": 4}}
    doc["training"]["liger_kernel"] = True
    w = [x for x in make_plan(spec_from_dict(doc)).warnings if "exceeds" in x][0]
    assert "qlora" not in w and "liger" not in w and "lower per_device_train_batch_size" in w
