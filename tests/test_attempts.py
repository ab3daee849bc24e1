"""Ray Train's restarts said in words (issue 12 item 25): the driver's Attempts turns the workers' own events
into one line per failed attempt (what failed, attempt k of N, what the run waits for), rendered the same in
the local view and in `rtf logs` (which renders the driver's RTF_EVENT lines). The real outage, on a moto
server stopped mid-run, is tests/test_s3_run.py; here every branch of the wording, without Ray."""

from __future__ import annotations

import io
import json

from raytune_ft.launch.driver import Attempts
from raytune_ft.launch.progress import EVENT_PREFIX, Renderer
from raytune_ft.launch.ray_jobs import render_log
from raytune_ft.spec import spec_from_dict

STORAGE_ERR = ("When uploading part for key 'runs/x/checkpoint-00000008/adapter_model.safetensors' in bucket 'bkt': "
               "AWS Error NETWORK_CONNECTION during UploadPart operation: curlCode: 7, Couldn't connect to server")


def spec(max_failures: int):
    return spec_from_dict({"name": "x", "model": {"name_or_path": "some/model"},
                           "data": {"train": {"path": "t.jsonl"}}, "training": {"max_steps": 10},
                           "storage": {"path": "s3://bkt/runs", "endpoint_url": "http://127.0.0.1:9000"},
                           "fault_tolerance": {"max_failures": max_failures}})


def run_events(max_failures: int, events, driver_retry: bool = True, in_process: bool = False) -> tuple[str, str]:
    """(what local mode prints, what `rtf logs` prints for the driver's log of the same run)."""
    import io

    out, log = io.StringIO(), []
    local = Renderer(out)

    def emit(e):
        local.handle(e)
        log.append(EVENT_PREFIX + json.dumps(e))  # the cluster driver's stdout (RTF_EVENTS=1)

    attempts = Attempts(spec(max_failures), emit, driver_retry=driver_retry, in_process=in_process)
    for e in events:
        attempts.handle(e)
    return out.getvalue(), render_log("\n".join(log))


WORKERS = {"kind": "workers", "message": "workers: rank 0 pid 11 node abcdef12, rank 1 pid 12 node abcdef12"}


def test_storage_failure_then_restart_then_last_attempt():
    events = [WORKERS, {"kind": "info", "message": "setup took 1.0s"},
              {"kind": "worker_failed", "rank": 0, "error": STORAGE_ERR},
              {"kind": "worker_failed", "rank": 1, "error": STORAGE_ERR},  # the same attempt: no second line
              WORKERS, {"kind": "worker_failed", "rank": 1, "error": STORAGE_ERR}]
    local, logs = run_events(1, events)
    assert local == logs
    lines = local.splitlines()
    where = "s3://bkt/runs at http://127.0.0.1:9000"
    assert lines == [
        WORKERS["message"],
        "setup took 1.0s",
        f"storage unreachable at {where} (attempt 1 of 2 failed: {STORAGE_ERR}); Ray Train restarts the workers; "
        "they resume from the last committed checkpoint once storage answers",
        "workers restarted (attempt 2 of 2): rank 0 pid 11 node abcdef12, rank 1 pid 12 node abcdef12",
        f"storage unreachable at {where} (attempt 2 of 2 failed: {STORAGE_ERR}); no restarts left: the driver "
        "waits up to 120s for storage to answer, then starts the run again from the last committed checkpoint",
    ]


def test_a_storage_cause_after_a_peers_consequence_is_said_too():
    gloo = "RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:4242"
    local, _ = run_events(2, [WORKERS, {"kind": "worker_failed", "rank": 0, "error": gloo},
                              {"kind": "worker_failed", "rank": 1, "error": STORAGE_ERR},
                              {"kind": "worker_failed", "rank": 2, "error": STORAGE_ERR}])
    lines = local.splitlines()[1:]
    assert len(lines) == 2 and lines[0].startswith(f"a worker failed (attempt 1 of 3 failed: {gloo})")
    assert lines[1].startswith("storage unreachable at s3://bkt/runs at http://127.0.0.1:9000 (attempt 1 of 3")


def test_other_failures_and_no_driver_retry():
    local, _ = run_events(0, [WORKERS, {"kind": "worker_failed", "rank": 0, "error": "RuntimeError: CUDA error"}])
    assert local.splitlines()[-1] == ("a worker failed (attempt 1 of 1 failed: RuntimeError: CUDA error); "
                                      "no restarts left (fault_tolerance.max_failures)")
    local, _ = run_events(0, [WORKERS, {"kind": "worker_failed", "rank": 0, "error": STORAGE_ERR}], driver_retry=False)
    assert local.splitlines()[-1].endswith("no restarts left (fault_tolerance.max_failures)")
    local, _ = run_events(-1, [WORKERS, {"kind": "worker_failed", "rank": 0, "error": "boom"}, WORKERS])
    assert "a worker failed (attempt 1 of unlimited failed: boom); Ray Train restarts the workers; they resume " \
           "from the last committed checkpoint" in local
    assert "workers restarted (attempt 2 of unlimited)" in local


def test_a_run_in_the_drivers_process_counts_no_attempts():
    """One local worker in rtf's own process (Ray Train's local mode): Ray Train restarts nothing there, whatever
    fault_tolerance.max_failures says, so the line says so and how to go on; storage still gets the driver's wait."""
    local, logs = run_events(3, [WORKERS, {"kind": "worker_failed", "rank": 0, "error": "ValueError: bad batch"}],
                             in_process=True)
    assert local == logs
    assert local.splitlines()[-1] == ("training failed (ValueError: bad batch); it ran in this process, which "
                                      "restarts nothing: resubmit to resume from the last committed checkpoint")
    local, _ = run_events(3, [WORKERS, {"kind": "worker_failed", "rank": 0, "error": STORAGE_ERR}], in_process=True)
    assert local.splitlines()[-1] == (
        f"storage unreachable at s3://bkt/runs at http://127.0.0.1:9000 ({STORAGE_ERR}); no restarts left: the "
        "driver waits up to 120s for storage to answer, then starts the run again from the last committed checkpoint")


def test_a_preempted_attempt_is_said_as_such_and_uses_no_failure():
    """Ray Train ends a preempted group at the deadline and restarts it, counting max_preemption_failures: with
    max_failures 0 that is not 'no restarts left'. Said whether a worker reported an error (its collective
    broken as the group was stopped) or none did (the node's processes were killed); a later real failure
    still uses max_failures."""
    notice = {"kind": "preemption", "message": "preemption notice for node abc (rank 1), deadline in 26s: "
                                                "committing a checkpoint at step 67, then training on"}
    broken = {"kind": "worker_failed", "rank": 0, "error": "Default process group has not been initialized"}
    local, logs = run_events(0, [WORKERS, notice, broken, WORKERS, notice, WORKERS,
                                 {"kind": "worker_failed", "rank": 0, "error": "CUDA error"}])
    assert local == logs
    assert local.splitlines()[1:] == [
        notice["message"],
        "node preempted (attempt 1 of 2 ended: Default process group has not been initialized); Ray Train restarts "
        "the workers from the last committed checkpoint once nodes are free (preemption 1 of unlimited, "
        "fault_tolerance.max_preemption_failures; max_failures is not used)",
        "workers restarted (attempt 2 of 2): rank 0 pid 11 node abcdef12, rank 1 pid 12 node abcdef12",
        notice["message"],
        "node preempted (attempt 2 of 3 ended: stopped at the preemption's deadline); Ray Train restarts the "
        "workers from the last committed checkpoint once nodes are free (preemption 2 of unlimited, "
        "fault_tolerance.max_preemption_failures; max_failures is not used)",
        "workers restarted (attempt 3 of 3): rank 0 pid 11 node abcdef12, rank 1 pid 12 node abcdef12",
        "a worker failed (attempt 3 of 3 failed: CUDA error); no restarts left (fault_tolerance.max_failures)",
    ]


def test_the_end_of_a_preempted_group_is_said_at_its_deadline():
    """A group whose workers are killed at the deadline says nothing; the next group may wait long for nodes.
    The driver says the preemption ended the attempt once the notice's deadline (plus the controller's poll)
    has passed, once, and not again when a worker's error or the next group comes; a run that finished before
    the deadline says nothing."""
    from raytune_ft.launch.driver import DEADLINE_SLACK_S

    emitted: list[dict] = []
    attempts = Attempts(spec(0), emitted.append)
    notice = {"kind": "preemption", "message": "preemption notice ...", "deadline": 1000.0}
    for e in (WORKERS, notice):
        attempts.handle(e)
    attempts.tick(1000.0 + DEADLINE_SLACK_S - 0.5)
    assert [e["kind"] for e in emitted] == ["workers", "preemption"]
    attempts.tick(1000.0 + DEADLINE_SLACK_S + 0.5)
    retry = emitted[-1]
    assert retry["kind"] == "retry" and retry["preempted"] == 1 and retry["next"] == "restart", retry
    assert retry["error"] == "stopped at the preemption's deadline" and retry["attempt"] == 1
    attempts.tick(2000.0)
    attempts.handle({"kind": "worker_failed", "rank": 1, "error": "Default process group has not been initialized"})
    attempts.handle(WORKERS)
    assert [e["kind"] for e in emitted] == ["workers", "preemption", "retry", "workers"]
    assert emitted[-1]["attempt"] == 2

    done = Attempts(spec(0), emitted.append)
    emitted.clear()
    for e in (WORKERS, notice, {"kind": "done", "summary": {}}):
        done.handle(e)
    done.tick(5000.0)
    assert [e["kind"] for e in emitted] == ["workers", "preemption", "done"]


def test_an_elastic_group_smaller_than_its_most_says_so():
    """Ray Train restarted an elastic run with the workers the cluster had room for: the restart line says how
    many of the most (a full group says nothing more)."""
    d = spec(1)
    elastic = spec_from_dict({**d.model_dump(mode="json", exclude_none=True),
                              "compute": {"num_workers": {"min": 1, "max": 2}}})
    out = io.StringIO()
    r = Renderer(out)
    attempts = Attempts(elastic, r.handle)
    two = {"kind": "workers", "workers": [{"rank": 0}, {"rank": 1}], "message": "workers: rank 0 pid 1 node a, "
           "rank 1 pid 2 node b"}
    one = {"kind": "workers", "workers": [{"rank": 0}], "message": "workers: rank 0 pid 3 node a"}
    for e in (two, {"kind": "worker_failed", "error": "Connection closed by peer"}, one):
        attempts.handle(e)
    assert out.getvalue().splitlines()[0] == "workers: rank 0 pid 1 node a, rank 1 pid 2 node b"
    assert out.getvalue().splitlines()[-1] == ("workers restarted (attempt 2 of 2): rank 0 pid 3 node a "
                                               "(1 of 2 workers, elastic)")


def test_after_elastic_workers_grew_the_next_fit_has_what_is_left_of_max_failures():
    """Elastic workers that grow stop at a checkpoint and the driver starts a new fit(); Ray Train would count
    its max_failures afresh, so the new fit gets what the earlier ones left (a cluster that keeps losing and
    regaining a node still ends after max_failures failures)."""
    from raytune_ft.launch.trainer import failures_left

    assert (failures_left(2, 0), failures_left(2, 1), failures_left(2, 5), failures_left(-1, 7)) == (2, 1, 0, -1)
    out = io.StringIO()
    attempts = Attempts(spec(2), Renderer(out).handle, spent=1)  # one failure before the grow: one restart left
    for e in (WORKERS, {"kind": "worker_failed", "error": "boom"}, WORKERS, {"kind": "worker_failed", "error": "bang"}):
        attempts.handle(e)
    lines = out.getvalue().splitlines()
    assert lines[1] == ("a worker failed (attempt 1 of 2 failed: boom); Ray Train restarts the workers; they resume "
                        "from the last committed checkpoint")
    assert lines[-1] == "a worker failed (attempt 2 of 2 failed: bang); no restarts left (fault_tolerance.max_failures)"
    assert attempts.failures == 2 and attempts.grow is None


def test_the_workers_stopping_to_grow_is_said_and_kept_for_the_driver():
    out = io.StringIO()
    attempts = Attempts(spec(1), Renderer(out).handle)
    grow = {"kind": "grow", "step": 24, "workers": 1, "to": 2, "message": "elastic: Ray has room for 2 workers "
            "(1 now): the workers stop at the checkpoint of step 24, and the run starts again from it with more"}
    for e in (WORKERS, grow):
        attempts.handle(e)
    assert out.getvalue().splitlines()[-1] == grow["message"]
    assert attempts.grow == grow and attempts.failures == 0


def test_a_fit_that_ended_without_its_last_word_is_started_again_only_if_final_is_behind(tmp_path):
    """The workers' `done` or `grow` event can be lost (the progress board not answering after the fit): the
    driver then reads storage. final/ missing or older than the latest committed checkpoint: the workers stopped
    to grow, start again from that step; final/ at or past it: the run is done."""
    import pyarrow.fs

    from raytune_ft import checkpoints as ck
    from raytune_ft.launch.driver import final_behind
    from raytune_ft.rundir import RunDir

    fs = pyarrow.fs.LocalFileSystem()
    run = RunDir.at(str(tmp_path / "run"))
    assert final_behind(run) is None  # nothing committed: nothing to start again from

    def commit(name: str, step: int, results: dict | None = None) -> None:
        src = tmp_path / f"src-{name}"
        src.mkdir()
        (src / "weights.bin").write_bytes(b"w" * step)
        if results is not None:
            (src / "final_results.json").write_text(json.dumps(results))
        ck.commit_dir(str(src), fs, run.join(name), step=step, epoch=None, spec_hash="h")

    commit("checkpoint-00000008", 8)
    assert final_behind(run) == 8  # stopped at step 8 with no final/
    commit("final", 8, {"steps": 8})
    assert final_behind(run) is None  # final/ is this run's
    commit("checkpoint-00000016", 16)  # a finished run extended, then stopped to grow at 16
    assert final_behind(run) == 16
