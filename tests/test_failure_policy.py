"""The failure policy is a pure function (principle 7): spec and data errors never retry, storage
outages retry within max_failures, anything else was Ray's to retry already."""

from __future__ import annotations

import pytest

from raytune_ft.errors import DataError
from raytune_ft.launch.driver import classify_failure, retries_left


class WorkerGroupError(Exception):
    """Shaped like Ray Train's: the workers' own exceptions in ``worker_failures``."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_user_errors_inside_worker_failures_are_user_errors():
    err = WorkerGroupError({1: RuntimeError("wrapped")})
    err.worker_failures[0] = DataError("train.jsonl:3: field 'output' is missing")
    assert classify_failure(err) == "user"


@pytest.mark.parametrize("text", [
    "When completing multiple part upload for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
    "CompleteMultipartUpload operation: curlCode: 7, Could not connect to server",
    "botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL",
])
def test_storage_outages_are_storage(text):
    try:
        try:
            raise OSError(text)
        except OSError as inner:
            raise RuntimeError("Training failed due to controller error") from inner
    except RuntimeError as e:
        assert classify_failure(e) == "storage"


def test_other_failures_are_training_failures():
    assert classify_failure(WorkerGroupError({0: RuntimeError("CUDA out of memory")})) == "training"


@pytest.mark.parametrize("kind, attempt, max_failures, expected", [
    ("user", 1, 5, False),
    ("training", 1, 5, False),
    ("storage", 1, 0, False),
    ("storage", 1, 1, True),
    ("storage", 2, 1, False),
    ("storage", 50, -1, True),
])
def test_retry_policy(kind, attempt, max_failures, expected):
    assert retries_left(kind, attempt, max_failures) is expected
