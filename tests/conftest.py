"""Shared fixtures: one real local Ray for the session, tiny models and data built once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download in tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest_plugins = ["tests.seaweed"]  # SeaweedFS on 127.0.0.1: the `seaweed` and `seaweed_server` fixtures


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray started in this process (the embedded mode `rtf submit` uses), shared by tests."""
    import ray

    if not ray.is_initialized():
        from raytune_ft.launch.local import start_env

        start_env()  # the settings `rtf submit`'s own embedded Ray runs with (a run's end is seen in 0.25 s, not 2 s)
        # address="local", as `rtf submit` starts it: a new Ray of the tests' own, even when Ray's address file
        # names a head (a `ray start` left on this machine, or a dead one's leftover)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 namespace="rtf")
    yield ray
    ray.shutdown()


@pytest.fixture
def in_process(monkeypatch):
    """`rtf submit` of a one-worker run trains in this (the test's) process, as a fresh `rtf submit` does
    (Ray Train's local mode), although the session's Ray runs: no worker group to start, for tests of what a
    run does rather than of its worker group. The torch thread count the run sets is put back after."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("RTF_IN_PROCESS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(train.jsonl, eval.jsonl, model_dir): a tiny pretrained-looking Llama and its BPE tokenizer."""
    from tests.tiny import make_data, make_model

    root = tmp_path_factory.mktemp("tiny")
    train, evals = make_data(root / "data")
    model = make_model(root / "model", train)
    return train, evals, model
