"""README.md's quickstart figures are bench/RESULTS.md's (issue 18 item 12): both are rendered by
bench/quickstart.py from one set of figures, which `make bench BENCH_ARGS=--update-docs` measures, so
they cannot drift apart again."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import quickstart as Q  # noqa: E402


def region(text: str) -> str:
    m = re.search(re.escape(Q.BEGIN) + r".*?" + re.escape(Q.END), text, re.S)
    assert m, "no quickstart markers"
    return m.group(0)


def test_readme_quotes_the_figures_in_bench_results():
    figures = Q.parse((REPO / "bench" / "RESULTS.md").read_text())
    assert region((REPO / "README.md").read_text()) == Q.sentence(figures)
    assert figures["source"], "the figures say where they were measured"


def test_results_block_is_what_make_bench_writes_and_its_figures_agree_with_each_other():
    text = (REPO / "bench" / "RESULTS.md").read_text()
    figures = Q.parse(text)
    assert region(text) == Q.block(figures)  # the format run_all --update-docs writes, read back whole
    assert abs(figures["tokens"] / figures["train_s"] - figures["tokens_per_s"]) <= 0.005 * figures["tokens_per_s"]
    assert round(math.exp(figures["eval_loss"])) in range(int(figures["perplexity"]) - 1, int(figures["perplexity"]) + 2)
    spec = yaml.safe_load((REPO / "jobspecs" / "quickstart.yaml").read_text())
    assert figures["steps"] == spec["training"]["max_steps"]


def test_update_docs_rewrites_both_from_one_set_of_figures(tmp_path, monkeypatch):
    results, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    results.write_text((REPO / "bench" / "RESULTS.md").read_text())
    readme.write_text((REPO / "README.md").read_text())
    monkeypatch.setattr(Q, "RESULTS", results)
    monkeypatch.setattr(Q, "README", readme)
    new = {**Q.parse(results.read_text()), "train_s": 98.2, "tokens_per_s": 3937.4, "source": "`make bench`, test"}
    Q.update_docs(new)
    assert Q.parse(results.read_text()) == {**new, "tokens_per_s": 3937.0}
    assert "386,653 tokens in 98.2 s of training (3,937 tokens/s; measured: `make bench`, test)." in readme.read_text()
    assert region(readme.read_text()) == Q.sentence(Q.parse(results.read_text()))
