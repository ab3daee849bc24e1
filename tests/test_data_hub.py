"""Hub datasets as data sources (`hf://datasets/ORG/NAME` with config/split/revision), with no network.

The cache is made for real by `datasets` itself: its JSON builder prepares the Arrow cache a download of
`ORG/NAME` leaves behind (`HF_HOME/datasets/ORG___NAME/CONFIG/VERSION/HASH`); only the directory's
namespace, which a builder is given by the Hub when it downloads, is set by renaming it. Then `rtf data
preview`, in its own process with `HF_HUB_OFFLINE=1`, reads the dataset from that cache as a user offline
would. Offline and uncached, the command ends in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from tests.specs import base_doc


def build_cache(hf_home, repo: str, splits: dict[str, list[dict]], config: str = "default") -> None:
    code = textwrap.dedent(f"""
        import json, os, sys
        from datasets import config as dc
        from datasets.packaged_modules.json.json import Json
        splits = json.loads(sys.argv[1])
        files = {{}}
        for name, rows in splits.items():
            p = os.path.join(sys.argv[2], name + ".jsonl")
            open(p, "w").write("".join(json.dumps(r) + "\\n" for r in rows))
            files[name] = p
        org, name = {repo!r}.split("/")
        b = Json(dataset_name=name, data_files=files, config_name={config!r}, config_id={config!r}, hash="0123abcd",
                 cache_dir=dc.HF_DATASETS_CACHE)
        b.download_and_prepare()
        os.rename(os.path.join(dc.HF_DATASETS_CACHE, name), os.path.join(dc.HF_DATASETS_CACHE, org + "___" + name))
    """)
    work = hf_home / "src"
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, json.dumps(splits), str(work)], check=True, env=env_for(hf_home),
                   capture_output=True, timeout=120)


def env_for(hf_home, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=os.getcwd(), **extra)
    return env


def write_spec(tmp_path, train: dict) -> str:
    doc = base_doc(name="hubdata")
    doc["model"] = {"init": {"arch": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                             "intermediate_size": 64, "max_position_embeddings": 128}}
    doc["tokenizer"] = {"train": {"vocab_size": 300}}
    doc["method"] = {"type": "full"}
    doc["data"] = {"train": train, "max_seq_length": 96}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def rtf(args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytune_ft", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf")
    rows = [{"instruction": f"Name the colour number {i}.", "output": f"Colour {i} is teal."} for i in range(12)]
    build_cache(home, "someorg/colours", {"train": rows, "test": rows[:3]})
    return home


def test_a_cached_hub_dataset_is_read_offline_with_its_split(hf_home, tmp_path):
    spec = write_spec(tmp_path, {"path": "hf://datasets/someorg/colours", "format": "alpaca"})
    r = rtf(["data", "preview", spec, "-n", "1"], env_for(hf_home))
    assert r.returncode == 0, r.stderr
    assert "Name the colour number 0." in r.stdout
    assert "examples: 12 " in r.stdout  # every row of the train split, none of test's

    spec = write_spec(tmp_path, {"path": "hf://datasets/someorg/colours", "split": "test", "format": "alpaca"})
    r = rtf(["data", "preview", spec, "-n", "1"], env_for(hf_home))
    assert r.returncode == 0, r.stderr
    assert "examples: 3 " in r.stdout


def test_a_missing_split_and_bad_rows_name_the_hub_source(hf_home, tmp_path):
    spec = write_spec(tmp_path, {"path": "hf://datasets/someorg/colours", "split": "validation"})
    r = rtf(["data", "preview", spec], env_for(hf_home))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "hf://datasets/someorg/colours:validation" in r.stderr and "validation" in r.stderr

    spec = write_spec(tmp_path, {"path": "hf://datasets/someorg/colours", "format": "chat"})
    r = rtf(["data", "preview", spec], env_for(hf_home))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "hf://datasets/someorg/colours:train:1: " in r.stderr  # source:row, as for files
    assert "messages" in r.stderr


def test_an_uncached_hub_dataset_offline_fails_in_one_line(hf_home, tmp_path):
    # With the Hub unreachable instead (HF_ENDPOINT at a closed port), huggingface_hub retries for about 25 s
    # before the same one-line error; too slow to test here, and the same except clause in data/hub.py.
    spec = write_spec(tmp_path, {"path": "hf://datasets/someorg/not-cached"})
    r = rtf(["data", "preview", spec], env_for(hf_home))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    first = r.stderr.strip().splitlines()[0]
    assert first == ("error: hf://datasets/someorg/not-cached:train: not in the local Hugging Face cache, "
                     "and offline mode is on (HF_HUB_OFFLINE)")


@pytest.mark.parametrize("train, message", [
    ({"path": "hf://datasets/bad id/x"}, "hf://datasets/ORG/NAME"),
    ({"path": "hf://datasets/org/name/extra"}, "hf://datasets/ORG/NAME"),
    ({"path": "hf://datasets/org/name", "split": "train;rm"}, "split must be"),
    ({"path": "train.jsonl", "split": "test"}, "split apply only to a hub dataset"),
    ({"path": "train.jsonl", "config": "x", "revision": "v1"}, "config, revision apply only to a hub dataset"),
])
def test_hub_source_fields_are_checked_at_validate(tmp_path, train, message):
    from typer.testing import CliRunner

    from raytune_ft.cli import app

    r = CliRunner().invoke(app, ["validate", write_spec(tmp_path, train)])
    assert r.exit_code == 2
    assert message in r.output
