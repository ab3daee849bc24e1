"""Every call to a Ray cluster ends in time, and a wrong address is one line naming it: against real servers
on 127.0.0.1 that are not a Ray dashboard (a web server answering 404, one answering an HTML page), a socket
that accepts and never answers (the time limit, kept short with $RTF_RAY_TIMEOUT), and a closed port. No Ray
cluster is needed: each command fails at its first request."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from raytune_ft.errors import UserError
from raytune_ft.launch import jobs_api
from tests.tiny import spec_doc, write_spec

TOKEN = "tok-jobs-api-Zq9"


@pytest.fixture
def env(monkeypatch, tmp_path):
    for n in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RTF_ALLOW_NO_AUTH", "RTF_RAY_TIMEOUT"):
        monkeypatch.delenv(n, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    return monkeypatch


def _serve(status: int, body: bytes, ctype: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture
def not_found():
    """python's http.server answering 404 to everything, as any web server on a wrong port would."""
    srv, url = _serve(404, b"<html><body>404 Not Found</body></html>", "text/html")
    yield url
    srv.shutdown()


@pytest.fixture
def silent():
    """A socket that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


def _commands(url: str, spec: str) -> list[list[str]]:
    """Every command that talks to the cluster: submit (with and without --follow), status, logs, logs
    --follow, stop, jobs."""
    return [["submit", spec, "--address", url], ["submit", spec, "--address", url, "--follow"],
            ["status", "j1", "--address", url], ["logs", "j1", "--address", url],
            ["logs", "j1", "--follow", "--address", url], ["stop", "j1", "--address", url],
            ["jobs", "--address", url]]


def _run(argv, capsys) -> tuple[int, str, float]:
    from raytune_ft.cli import main

    t0 = time.time()
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out = capsys.readouterr()
    return ei.value.code, out.out + out.err, time.time() - t0


@pytest.fixture
def spec(tmp_path):
    return str(write_spec(tmp_path / "s.yaml", spec_doc("api", tmp_path / "m", tmp_path / "t.jsonl", None,
                                                        tmp_path / "runs")))


def _one_line_exit_2(code: int, out: str, url: str, expected: str) -> None:
    assert code == 2, out
    assert out.count("\n") == 1 and out.startswith("error: "), out
    assert url in out and expected in out, out
    assert "Traceback" not in out and "RuntimeError" not in out and TOKEN not in out


def test_a_web_server_that_is_not_a_ray_dashboard(env, not_found, spec, capsys):
    for argv in _commands(not_found, spec):
        code, out, _ = _run(argv, capsys)
        _one_line_exit_2(code, out, not_found, "is not a Ray dashboard: it answered HTTP 404 to GET /api/version")
    # a page that answers 200 but is not the Jobs API (a login page, another app) is not one either
    srv, url = _serve(200, b"<html>welcome</html>", "text/html")
    try:
        code, out, _ = _run(["jobs", "--address", url], capsys)
        _one_line_exit_2(code, out, url, "is not a Ray dashboard: it answered HTTP 200 to GET /api/version")
    finally:
        srv.shutdown()


def test_a_server_that_never_answers_times_out(env, silent, spec, capsys):
    env.setenv("RTF_RAY_TIMEOUT", "1")
    for argv in _commands(silent, spec):
        code, out, seconds = _run(argv, capsys)
        _one_line_exit_2(code, out, silent, "did not answer within 1s")
        assert "$RTF_RAY_TIMEOUT sets the limit" in out
        assert seconds < 30, (argv, seconds)  # a bound that only catches a hang (two requests of 1 s each)


def test_a_closed_port_is_not_reachable(env, closed_port, spec, capsys):
    for argv in _commands(closed_port, spec):
        code, out, _ = _run(argv, capsys)
        _one_line_exit_2(code, out, closed_port, f"cannot reach the Ray dashboard at {closed_port} "
                                                 "(connection refused)")


def test_the_time_limit_setting(env):
    assert jobs_api.timeout_s() == jobs_api.DEFAULT_TIMEOUT_S
    env.setenv("RTF_RAY_TIMEOUT", "2.5")
    assert jobs_api.timeout_s() == 2.5
    for bad in ("0", "-1", "soon", "1e9"):
        env.setenv("RTF_RAY_TIMEOUT", bad)
        with pytest.raises(UserError, match=r"\$RTF_RAY_TIMEOUT=.*give the seconds one request"):
            jobs_api.timeout_s()


def test_auto_and_local_are_not_dashboard_urls():
    with pytest.raises(UserError, match=r"--address http://127\.0\.0\.1:8265 for a head on this machine"):
        jobs_api.dashboard_url("auto")
    with pytest.raises(UserError, match="does not say where the cluster is"):
        jobs_api.dashboard_url("local")


# The message of a real job (Ray 2.60) whose head was started as `.venv/bin/ray start --head` without the venv on
# PATH, submitted with the former entrypoint `python -u -m raytune_ft.launch.driver rtf_spec.yaml`: the
# system python ran it (paths shortened). test_multinode.py runs the real case, which now succeeds.
NO_RAY_JOB = (
    "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
    "Traceback (most recent call last):\n  File \"<frozen runpy>\", line 198, in _run_module_as_main\n"
    "  File \"/tmp/rtfx/session_x/runtime_resources/py_modules_files/_ray_pkg_b1/raytune_ft/launch/driver.py\", "
    "line 368, in main\n    import ray\nModuleNotFoundError: No module named 'ray'\n")
NO_PYTHON_JOB = ("Job entrypoint command failed with exit code 127, last available logs (truncated to 20,000 "
                 "chars):\n/bin/sh: 1: python: not found\n")


def test_a_driver_without_ray_is_explained_in_one_line():
    from raytune_ft.launch import ray_jobs as rj

    for message in (NO_RAY_JOB, NO_PYTHON_JOB):
        hint = rj.driver_python_hint(message)
        assert hint and "\n" not in hint and "source .venv/bin/activate && ray start" in hint
        rec = {"job": "j", "run": "r", "status": "FAILED", "driver_exit_code": 1, "start_time": None,
               "end_time": None, "step": None, "max_steps": None, "storage": None, "message": message}
        assert f"hint:     {hint}" in rj.render_status(rec).splitlines()
    assert rj.driver_python_hint("ModuleNotFoundError: No module named 'ray.train.v2'") is None
    assert rj.driver_python_hint("error: data/x.jsonl:2: missing field") is None


def _stand_in(mode: str, state: dict):
    """A log stream that goes quiet for ever (mode "quiet") or sends a chunk every 50 ms ("chatty"); the
    second stream opened ends, and the job has then SUCCEEDED."""
    import asyncio
    import types

    class Client:
        async def tail_job_logs(self, job_id):
            state["opened"] += 1
            yield "line one\n"
            if state["opened"] >= 2:
                state["status"] = "SUCCEEDED"
                return
            while True:
                await asyncio.sleep(0.05 if mode == "chatty" else 3600)
                if mode == "chatty":
                    yield "x\n"

        def get_job_info(self, job_id):
            return types.SimpleNamespace(status=state["status"], metadata={}, driver_exit_code=0, message="")

        def get_job_logs(self, job_id):
            return "line one\n"

    return Client()


@pytest.mark.parametrize("mode", ["quiet", "chatty"])
def test_a_quiet_log_stream_is_reopened_and_ctrl_c_still_detaches(mode):
    """`--follow` on a stream that goes quiet: after 4 time limits the job's state is asked and the stream
    opened again; Ctrl-C while chunks arrive still detaches (exit 130). A stand-in client: a Ray dashboard's
    stream that stalls mid-job is a network fault this machine cannot cause for real."""
    import io
    import os
    import signal

    from raytune_ft.launch import ray_jobs as rj

    state = {"opened": 0, "status": "RUNNING"}
    cluster = jobs_api.Cluster(_stand_in(mode, state), "http://127.0.0.1:1", jobs_api.Token(None, "none"),
                               timeout=0.25)
    if mode == "chatty":
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    out = io.StringIO()
    code = rj.follow_job(cluster, "j1", out=out)
    if mode == "quiet":
        assert code == 0 and state["opened"] == 2 and "job j1 SUCCEEDED" in out.getvalue()
    else:
        assert code == 130 and state["opened"] == 1 and "detached: job j1 keeps running" in out.getvalue()


def test_lines_the_stream_missed_before_the_job_ended_are_shown_once():
    """The log stream ends early, and the job has ended by then (seen on the two-node cluster when a node
    went away mid-run: everything after that point, the summary too, was missing): the whole log is read
    once more and what the stream did not show is shown, once. A stand-in client: a stream cut at a chosen
    line is a fault this machine cannot cause for real."""
    import io
    import json
    import types

    from raytune_ft.launch import ray_jobs as rj
    from raytune_ft.launch.progress import EVENT_PREFIX

    def event(**e):
        return EVENT_PREFIX + json.dumps(e) + "\n"

    log = [event(kind="log", step=1, max_steps=3, loss=2.0), event(kind="log", step=2, max_steps=3, loss=1.5),
           event(kind="info", message="workers restarted"), event(kind="log", step=3, max_steps=3, loss=1.25),
           event(kind="done", summary={"steps": 3})]

    class Client:
        async def tail_job_logs(self, job_id):
            yield "".join(log[:2]) + log[2][:10]  # cut inside the third line

        def get_job_info(self, job_id):
            return types.SimpleNamespace(status="SUCCEEDED", metadata={}, driver_exit_code=0, message="")

        def get_job_logs(self, job_id):
            return "".join(log)

    cluster = jobs_api.Cluster(Client(), "http://127.0.0.1:1", jobs_api.Token(None, "none"), timeout=5)
    out = io.StringIO()
    assert rj.follow_job(cluster, "j1", out=out, run_uri="/runs/x") == 0
    text = out.getvalue()
    for needle in ("1/3  loss 2.0000", "2/3  loss 1.5000", "workers restarted", "3/3  loss 1.2500", "job j1 SUCCEEDED"):
        assert text.count(needle) == 1, (needle, text)
    assert text.index("3/3  loss") < text.index("job j1 SUCCEEDED") and "steps" in text
