"""build_datasets end to end: bad rows, truncation, weighted mixtures, eval splits, packing, S3 sources."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytune_ft.data.formats import IGNORE_INDEX
from raytune_ft.data.pipeline import build_datasets, read_source, training_texts
from raytune_ft.data.tokenizer import train_tokenizer
from raytune_ft.errors import DataError, UserError
from raytune_ft.spec.models import DataSpec


@pytest.fixture(scope="module")
def tok():
    corpus = [f"### Instruction:\nRepeat item {i}.\n\n### Response:\nItem {i} repeated.\n" for i in range(40)]
    return train_tokenizer(corpus, vocab_size=400)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def alpaca_rows(prefix: str, n: int) -> list[dict]:
    return [{"instruction": f"Repeat {prefix} item {i}.", "output": f"{prefix} item {i}"} for i in range(n)]


def spec(train, **kw):
    base = dict(
        eval=None,
        eval_split=None,
        max_seq_length=None,
        packing=False,
        train_on_prompt=False,
        on_bad_row="error",
    )
    base.update(kw)
    return SimpleNamespace(train=train, **base)


def source(path, fmt="alpaca", weight=1.0, fields=None):
    return SimpleNamespace(path=path, format=fmt, weight=weight, fields=fields)


def output_of(tok, ex) -> str:
    """The trained text of an example, without the EOS."""
    return tok.decode(
        [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX][:-1]
    )


# --------------------------------------------------------------------------- bad rows

BAD_LINES = [
    (b"this is not json", "not valid JSON"),
    (b'{"instruction": "Do it."}', "field 'output' is missing"),
    (b'{"instruction": "   ", "output": "x"}', "field 'instruction' is empty"),
    (b'{"instruction": "Do it.", "output": 42}', "field 'output' must be a string, got number"),
    (b'{"instruction": "Caf\xe9?", "output": "yes"}', "invalid UTF-8 bytes"),
]


@pytest.mark.parametrize(("bad", "problem"), BAD_LINES)
def test_bad_row_stops_with_file_line_and_problem(tmp_path, tok, bad, problem):
    good = json.dumps({"instruction": "Say hi.", "output": "hi"}).encode()
    path = tmp_path / "train.jsonl"
    path.write_bytes(good + b"\n" + good + b"\n" + bad + b"\n" + good + b"\n")
    with pytest.raises(DataError) as err:
        build_datasets(spec([source(str(path))]), tok, seed=0)
    assert err.value.message.startswith(f"{path}:3: {problem}")
    assert err.value.message.endswith("(format alpaca)")
    assert err.value.exit_code == 2


def test_bad_rows_are_skipped_and_counted_per_file(tmp_path, tok):
    good = alpaca_rows("good", 4)
    lines = [json.dumps(r).encode() for r in good] + [bad for bad, _ in BAD_LINES]
    bad_path = tmp_path / "mixed.jsonl"
    bad_path.write_bytes(b"\n".join(lines) + b"\n")
    clean_path = write_jsonl(tmp_path / "clean.jsonl", alpaca_rows("clean", 3))
    train, _, stats = build_datasets(
        spec([source(str(bad_path)), source(clean_path)], on_bad_row="skip"), tok, seed=0
    )
    assert stats.skipped == {str(bad_path): len(BAD_LINES)}
    assert stats.train_examples == len(train) == 7
    assert sorted(output_of(tok, ex) for ex in train) == sorted(
        [r["output"] for r in good] + [f"clean item {i}" for i in range(3)]
    )
    assert "skipped bad rows: 5" in "\n".join(stats.lines())


def test_a_file_with_only_bad_rows_is_an_error_even_when_skipping(tmp_path, tok):
    path = tmp_path / "all_bad.jsonl"
    path.write_bytes(b"nope\n{}\n")
    with pytest.raises(DataError, match=r"all_bad.jsonl: no usable rows \(2 bad rows skipped\)"):
        build_datasets(spec([source(str(path))], on_bad_row="skip"), tok, seed=0)


def test_field_mapping_and_formats_from_other_file_types(tmp_path, tok):
    rows = [{"prompt": f"Q{i}?", "response": f"A{i}."} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    fields = {"instruction": "prompt", "output": "response"}
    train, _, _ = build_datasets(spec([source(str(tmp_path / "qa.parquet"), fields=fields)]), tok, seed=0)
    assert sorted(output_of(tok, ex) for ex in train) == [f"A{i}." for i in range(5)]
    # the same mapping with a column missing names the file's column and the canonical field
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q?"}]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:1: field 'response' \(the output field\) is missing"):
        build_datasets(spec([source(str(tmp_path / "bad.parquet"), fields=fields)]), tok, seed=0)


# --------------------------------------------------------------------------- truncation


def test_truncation_is_counted_and_examples_without_targets_dropped(tmp_path, tok):
    rows = [
        {"instruction": "Short.", "output": "ok"},
        {"instruction": "Short too.", "output": "a much longer answer " * 10},
        {"instruction": "A very long instruction " * 10, "output": "x"},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    full, _, _ = build_datasets(spec([source(path)]), tok, seed=0)
    lengths = sorted(len(ex["input_ids"]) for ex in full)
    limit = lengths[0] + 5  # only the first example fits
    train, _, stats = build_datasets(spec([source(path)], max_seq_length=limit), tok, seed=0)
    assert stats.truncated == 2 and stats.dropped == 1  # the long prompt leaves nothing to train on
    assert len(train) == stats.train_examples == 2
    assert all(len(ex["input_ids"]) <= limit for ex in train)
    assert sorted(len(ex["input_ids"]) for ex in train) == [lengths[0], limit]
    assert f"truncated to max_seq_length {limit}: 2" in "\n".join(stats.lines())


# --------------------------------------------------------------------------- mixtures


def test_weighted_mixture_is_proportional_and_deterministic(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows("alpha", 10))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows("beta", 20))
    c = write_jsonl(tmp_path / "c.jsonl", alpaca_rows("gamma", 8))
    mix = spec([source(a, weight=2.5), source(b, weight=0.5), source(c)])
    train, _, stats = build_datasets(mix, tok, seed=7)
    outputs = [output_of(tok, ex) for ex in train]
    by_source = Counter(o.split()[0] for o in outputs)
    assert by_source == {"alpha": 25, "beta": 10, "gamma": 8}  # round(weight * size) each
    assert stats.mixture == {a: 25, b: 10, c: 8}
    counts = Counter(outputs)
    alpha = [counts[f"alpha item {i}"] for i in range(10)]
    assert sorted(alpha) == [2] * 5 + [3] * 5  # every row twice, half of them a third time
    assert all(counts[f"beta item {i}"] <= 1 for i in range(20))  # a sample without repeats
    assert all(counts[f"gamma item {i}"] == 1 for i in range(8))

    again, _, _ = build_datasets(mix, tok, seed=7)
    assert again == train
    other, _, _ = build_datasets(mix, tok, seed=8)
    assert other != train and sorted(map(tuple, (e["input_ids"] for e in other))) != sorted(
        map(tuple, (e["input_ids"] for e in train))
    )  # another seed picks other fractional samples, not just another order


def test_default_weights_concatenate(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows("alpha", 3))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows("beta", 5))
    train, _, _ = build_datasets(
        {"train": [{"path": a}, {"path": b}]}, tok, seed=0
    )  # plain mappings work too
    assert sorted(output_of(tok, ex) for ex in train) == sorted(
        [f"alpha item {i}" for i in range(3)] + [f"beta item {i}" for i in range(5)]
    )


# --------------------------------------------------------------------------- eval


def test_eval_split_is_disjoint_complete_and_deterministic(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows("alpha", 30))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca_rows("beta", 10))
    s = spec([source(a, weight=2.0), source(b)], eval_split=0.2)
    train, evals, stats = build_datasets(s, tok, seed=3)
    train_out = {output_of(tok, ex) for ex in train}
    eval_out = [output_of(tok, ex) for ex in evals]
    assert len(eval_out) == len(set(eval_out)) == 6 + 2 == stats.eval_examples  # 20% of each source, once
    assert not train_out & set(eval_out)
    assert train_out | set(eval_out) == {f"alpha item {i}" for i in range(30)} | {
        f"beta item {i}" for i in range(10)
    }
    assert len(train) == 2 * 24 + 8  # weights apply to the train part only
    assert build_datasets(s, tok, seed=3)[1] == evals
    assert build_datasets(s, tok, seed=4)[1] != evals


def test_eval_sources(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows("alpha", 4))
    e = write_jsonl(tmp_path / "e.jsonl", [{"text": "held out text"}])
    train, evals, _ = build_datasets(spec([source(a)], eval=source(e, fmt="text")), tok, seed=0)
    assert len(train) == 4 and len(evals) == 1
    assert evals[0]["labels"] == evals[0]["input_ids"]  # text format: all trained
    with pytest.raises(UserError, match="not both"):
        build_datasets(spec([source(a)], eval=[source(e, fmt="text")], eval_split=0.1), tok, seed=0)


# --------------------------------------------------------------------------- packing


def test_packing_in_the_pipeline(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows("alpha", 30))
    plain, _, plain_stats = build_datasets(spec([source(a)], max_seq_length=64), tok, seed=1, batch_size=4)
    packed, evals, stats = build_datasets(
        spec([source(a)], max_seq_length=64, packing=True, eval_split=0.1), tok, seed=1
    )
    assert plain_stats.packed_rows is None and 0 < plain_stats.padding_efficiency <= 1
    assert stats.packed_rows == len(packed) < stats.train_examples == 27
    assert stats.eval_packed_rows == len(evals) < 3
    assert sum(r["position_ids"].count(0) for r in evals) == 3
    assert all(len(r["input_ids"]) <= 64 and r["position_ids"][0] == 0 for r in packed)
    assert sum(r["position_ids"].count(0) for r in packed) == 27
    assert stats.packing_efficiency == pytest.approx(stats.train_tokens / (64 * len(packed)))
    assert stats.packing_efficiency > 0.7
    with pytest.raises(UserError, match="packing needs data.max_seq_length"):
        build_datasets(spec([source(a)], packing=True), tok, seed=1)


# --------------------------------------------------------------------------- other entry points


def test_training_texts_and_read_source(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows("alpha", 2))
    c = write_jsonl(
        tmp_path / "c.jsonl",
        [{"conv": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    texts = list(training_texts(spec([source(a), source(c, fmt="chat", fields={"messages": "conv"})])))
    assert texts == [
        "### Instruction:\nRepeat alpha item 0.\n\n### Response:\nalpha item 0",
        "### Instruction:\nRepeat alpha item 1.\n\n### Response:\nalpha item 1",
        "<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n",
    ]
    rows, skipped = read_source(source(a))
    assert skipped == 0 and rows[1]["output"] == "alpha item 1"


def test_s3_uri_without_storage_is_a_user_error(tok):
    with pytest.raises(UserError, match="s3://bucket/x.jsonl: reading s3:// data needs"):
        build_datasets(spec([source("s3://bucket/x.jsonl")]), tok, seed=0)


def test_reads_s3_sources_from_a_real_s3_endpoint(tmp_path, tok, monkeypatch):
    """A moto S3 server on 127.0.0.1, reached through pyarrow's S3FileSystem as MinIO/R2 would be."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    from pyarrow import fs as pafs

    for var in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                          region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket="data")
        rows = alpaca_rows("remote", 6)
        s3.put_object(
            Bucket="data", Key="sets/train.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode()
        )
        table_path = tmp_path / "t.parquet"
        pq.write_table(pa.Table.from_pylist(alpaca_rows("parq", 4)), table_path)
        s3.put_object(Bucket="data", Key="sets/more.parquet", Body=table_path.read_bytes())
        s3.put_object(Bucket="data", Key="sets/bad.jsonl", Body=b'{"instruction": "x"}\n')
        fs = pafs.S3FileSystem(access_key="k", secret_key="s", endpoint_override=endpoint, scheme="http",
                               region="us-east-1")  # fmt: skip

        def filesystem_for(uri: str):
            return fs, uri.removeprefix("s3://")

        train, _, _ = build_datasets(
            spec([source("s3://data/sets/train.jsonl"), source("s3://data/sets/more.parquet")]),
            tok, seed=0, filesystem_for=filesystem_for,
        )  # fmt: skip
        assert sorted(output_of(tok, ex) for ex in train) == sorted(
            [f"remote item {i}" for i in range(6)] + [f"parq item {i}" for i in range(4)]
        )
        with pytest.raises(DataError, match=r"^s3://data/sets/bad.jsonl:1: field 'output' is missing"):
            build_datasets(
                spec([source("s3://data/sets/bad.jsonl")]), tok, seed=0, filesystem_for=filesystem_for
            )
    finally:
        server.stop()


def test_works_with_the_real_spec_models(tmp_path, tok):
    """The project's own DataSpec: any exception from it is this test failing, never a skip."""
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_rows("alpha", 10))
    data = DataSpec(train={"path": a, "fields": {"output": "output"}}, eval_split=0.2, max_seq_length=64)
    train, evals, stats = build_datasets(data, tok, seed=0)
    assert (len(train), len(evals)) == (8, 2) and stats.max_seq_length == 64
