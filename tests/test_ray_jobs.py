"""The Ray Jobs target and sealed secrets, without a cluster: addresses, token lookup, the seal, the job
payload (names, never values), log parsing and rendering. The real cluster tests are in test_multinode.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random

import pytest

from raytune_ft.errors import SealError, UserError
from raytune_ft.launch import ray_jobs as rj
from raytune_ft.launch import secrets as sec
from raytune_ft.launch.progress import EVENT_PREFIX
from raytune_ft.spec import spec_from_dict
from raytune_ft.train import env as worker_env
from tests.tiny import spec_doc

SECRET = "s3cr3t-Value-/+=-0123456789"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for n in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RTF_ALLOW_NO_AUTH", "RTF_WORKER_LOGS"):
        monkeypatch.delenv(n, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token
    return monkeypatch


def _spec(tmp_path, **over):
    return spec_from_dict(spec_doc("rj", tmp_path / "model", tmp_path / "t.jsonl", None, tmp_path / "runs", **over))


def test_dashboard_url_forms():
    assert rj.dashboard_url("http://10.0.0.1:8265/") == "http://10.0.0.1:8265"
    assert rj.dashboard_url("https://ray.example.com") == "https://ray.example.com"
    assert rj.dashboard_url("ray://head:10001") == "http://head:8265"
    assert rj.dashboard_url("10.0.0.1:8265") == "http://10.0.0.1:8265"
    assert rj.dashboard_url("head") == "http://head:8265"
    for bad in ("auto", "", "grpc://x:1"):
        with pytest.raises(UserError):
            rj.dashboard_url(bad)


def test_token_lookup_order_is_rays(clean_env, tmp_path):
    assert rj.find_token().value is None
    default = tmp_path / "home" / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("from-default\n")
    assert rj.find_token() == rj.Token("from-default", str(default))
    f = tmp_path / "tok"
    f.write_text("  from-path \n")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(f))
    assert rj.find_token().value == "from-path" and "RAY_AUTH_TOKEN_PATH" in rj.find_token().source
    clean_env.setenv("RAY_AUTH_TOKEN", "from-env")
    assert rj.find_token() == rj.Token("from-env", "$RAY_AUTH_TOKEN")
    assert "from-env" not in repr(rj.find_token())  # never shown
    clean_env.delenv("RAY_AUTH_TOKEN")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH names .*missing"):
        rj.find_token()


def test_no_token_is_one_line_exit_2_before_contacting(clean_env, capsys):
    from raytune_ft.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["jobs", "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert ei.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: no Ray auth token for http://127.0.0.1:9")
    assert "Traceback" not in err


def test_unreachable_cluster_is_one_line_exit_2(clean_env, capsys):
    from raytune_ft.cli import main

    clean_env.setenv("RAY_AUTH_TOKEN", "tok-unreachable")
    with pytest.raises(SystemExit) as ei:
        main(["status", "x", "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and err.count("\n") == 1, err
    assert "cannot reach the Ray dashboard at http://127.0.0.1:9" in err and "tok-unreachable" not in err


def test_commands_need_an_address(clean_env):
    with pytest.raises(UserError, match="which cluster"):
        rj.cluster_address(None)
    clean_env.setenv("RAY_ADDRESS", "http://h:8265")
    assert rj.cluster_address(None) == "http://h:8265"


# --------------------------------------------------------------------------- the seal


def _refused(blob: bytes, token: str | None = "cluster-token") -> str:
    """The SealError ``unseal`` gives for ``blob``: a one-line UserError (exit 2) without the value."""
    with pytest.raises(SealError) as ei:
        worker_env.unseal(blob, token)
    msg = str(ei.value)
    assert isinstance(ei.value, UserError) and ei.value.exit_code == 2
    assert "\n" not in msg and SECRET not in msg and "xxxx" not in msg, msg
    return msg


def test_seal_round_trip_and_refusals():
    values = {"HF_TOKEN": SECRET, "OTHER": "x" * 1000}
    blob = worker_env.seal(values, "cluster-token")
    assert SECRET.encode() not in blob and b"xxxx" not in blob
    assert worker_env.sealed_names(blob) == ["HF_TOKEN", "OTHER"]
    assert worker_env.unseal(blob, "cluster-token") == values
    assert worker_env.seal(values, "cluster-token") != blob  # fresh salt and nonce each time
    assert worker_env.unseal(worker_env.seal({"U": "é ✓ \x00"}, "tök"), "tök") == {"U": "é ✓ \x00"}
    assert "another Ray auth token" in _refused(blob, "other-token")
    assert "no Ray auth token" in _refused(blob, None)
    # the names are bound to the ciphertext: another name list, with the value untouched, is refused
    doc = json.loads(blob)
    doc["names"] = ["HF_TOKEN", "OTHER2"]
    assert "altered" in _refused(json.dumps(doc).encode())


def test_every_damaged_or_foreign_blob_is_one_clear_error():
    blob = worker_env.seal({"HF_TOKEN": SECRET, "OTHER": "x" * 40}, "cluster-token")
    # every single-bit flip anywhere in the file (JSON, base64, names, ciphertext, tag, final newline)
    for i in range(len(blob)):
        for bit in (0, 5):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            _refused(bytes(bad))
    for n in range(len(blob) - 1):  # every truncation (the final newline alone may go)
        _refused(blob[:n])
    rng = random.Random(12)
    for size in (0, 1, 16, 64, 300, 4096):
        _refused(bytes(rng.getrandbits(8) for _ in range(size)))
    for text in (b"{not json", b"null", b"[]", b'"x"', b"123", b"\xff\xfe{}", b"[" * 100000,
                 b'{"format": "rtf-sealed-env/2"}', b'{"format": "rtf-sealed-env/1", "names": ["A"]}',
                 b'{"format": "rtf-sealed-env/2", "names": "AB", "salt": 1, "nonce": null, "ciphertext": []}'):
        _refused(text)
    doc = json.loads(blob)
    assert "format rtf-sealed-env/1" in _refused(json.dumps({**doc, "format": "rtf-sealed-env/1"}).encode())
    shown = _refused(json.dumps({**doc, "format": SECRET}).encode())  # foreign text is never quoted
    assert "format unknown" in shown
    shown = _refused(json.dumps({**doc, "names": ["HF_TOKEN", f"A\nerror: {SECRET}"]}).encode())
    assert "names" in shown
    assert worker_env.sealed_names(b"[]") == [] and worker_env.sealed_names(b"\xff") == []


def test_a_damaged_seal_ends_the_driver_in_one_line(tmp_path, monkeypatch, capsys):
    """Where the job's driver opens the seal (first thing, before the spec or Ray): exit 2, one line."""
    from raytune_ft.launch import driver

    (tmp_path / worker_env.SEALED_FILE).write_bytes(worker_env.seal({"RTF_UNIT_SECRET": SECRET}, "tok")[:-40])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(worker_env, "_found", None)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    assert driver.main(["rtf_spec.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {worker_env.SEALED_FILE} is damaged") and err.count("\n") == 1, err
    assert "Traceback" not in err and SECRET not in err


def test_install_sealed_from_the_working_dir(tmp_path, monkeypatch):
    (tmp_path / worker_env.SEALED_FILE).write_bytes(worker_env.seal({"RTF_UNIT_SECRET": SECRET}, "tok"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    monkeypatch.delenv("RTF_UNIT_SECRET", raising=False)
    monkeypatch.chdir(tmp_path)
    sec.setup_hook()
    assert os.environ["RTF_UNIT_SECRET"] == SECRET
    monkeypatch.delenv("RTF_UNIT_SECRET")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    sec.setup_hook()  # never raises in a worker's setup...
    assert "RTF_UNIT_SECRET" not in os.environ
    spec = _spec(tmp_path, env={"RTF_UNIT_SECRET": None, "RTF_LITERAL": "lit"})
    with pytest.raises(UserError, match="another Ray auth token"):  # ...train_loop says what is wrong
        worker_env.apply_env(spec)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok")
    monkeypatch.setenv(worker_env.DIGESTS_ENV, "RTF_UNIT_SECRET")
    assert worker_env.apply_env(spec) == ["RTF_UNIT_SECRET"] and os.environ["RTF_LITERAL"] == "lit"
    report = worker_env.env_report(spec)
    assert report == {"forwarded_env": ["RTF_UNIT_SECRET"],
                      "env_digests": {"RTF_UNIT_SECRET": hashlib.sha256(SECRET.encode()).hexdigest()}}


def test_apply_env_without_a_sealed_file_is_local_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(worker_env, "_found", None)
    monkeypatch.delenv("RTF_NOT_SET", raising=False)
    assert worker_env.apply_env(_spec(tmp_path, env={"RTF_NOT_SET": None})) == []


def test_collect_and_reserved_names(tmp_path):
    spec = _spec(tmp_path, env={"A_TOKEN": None, "B_SECRET": None, "MODE": "x"})
    assert sec.collect(spec, {"A_TOKEN": "a", "B_SECRET": "b"}) == {"A_TOKEN": "a", "B_SECRET": "b"}
    with pytest.raises(UserError, match=r"\$B_SECRET is forwarded .* not set in this environment"):
        sec.collect(spec, {"A_TOKEN": "a"})
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN is set by rtf and Ray"):
        sec.check_names(_spec(tmp_path, env={"RAY_AUTH_TOKEN": None}))


# --------------------------------------------------------------------------- the payload


def test_payload_carries_names_never_values(tmp_path, monkeypatch):
    spec = _spec(tmp_path, env={"HF_TOKEN": None, "WANDB_MODE": "offline"})
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    rj.write_bundle(spec, str(bundle), {"HF_TOKEN": SECRET}, "tok")
    p = rj.job_payload(spec, str(bundle), fresh=True, forwarded=["HF_TOKEN"])
    assert p["entrypoint"] == rj.PICK_PYTHON + 'exec "$PY" -u -m raytune_ft.launch.driver rtf_spec.yaml --fresh'
    env = p["runtime_env"]
    assert env["working_dir"] == str(bundle)
    assert env["py_modules"] == [rj.package_dir()] and rj.package_dir().endswith("raytune_ft")
    assert env["env_vars"] == {"WANDB_MODE": "offline", "RTF_EVENTS": "1", "PYTHONUNBUFFERED": "1"}
    assert env["worker_process_setup_hook"] == "raytune_ft.launch.secrets.setup_hook"
    assert p["metadata"]["rtf_name"] == "rj" and p["metadata"]["rtf_forwarded_env"] == "HF_TOKEN"
    assert p["metadata"]["rtf_run"] == str(tmp_path / "runs" / "rj")
    assert p["submission_id"].startswith("rtf-rj-")
    assert SECRET not in json.dumps(p)
    # the bundle: the spec with the name only, and the value sealed
    assert "HF_TOKEN: null" in (bundle / "rtf_spec.yaml").read_text()
    files = {f.name: f.read_bytes() for f in bundle.iterdir()}
    assert set(files) == {"rtf_spec.yaml", worker_env.SEALED_FILE}
    assert all(SECRET.encode() not in b for b in files.values())
    # an image with rtf installed: nothing but the bundle; cluster.pip becomes runtime_env.pip
    spec2 = _spec(tmp_path, cluster={"image": "me/rtf:1", "pip": ["einops==0.8.0"]})
    env2 = rj.job_payload(spec2, str(bundle))["runtime_env"]
    assert "py_modules" not in env2 and env2["pip"] == ["einops==0.8.0"] and "worker_process_setup_hook" not in env2


# --------------------------------------------------------------------------- logs and progress


def _ev(**e) -> str:
    return EVENT_PREFIX + json.dumps(e)


LOG = "\n".join([
    "2026-01-01 INFO job_manager.py -- Runtime env is setting up.",
    _ev(kind="info", message="storage preflight: ok"),
    _ev(kind="info", message=f"model: /models/{SECRET}/m"),  # an event that carries a forwarded value
    "(RayTrainWorker pid=1) noise",
    _ev(kind="log", step=1, max_steps=4, loss=2.5),
    _ev(kind="checkpoint", step=2, path="/r/checkpoint-00000002"),
    _ev(kind="log", step=3, max_steps=4, loss=2.0),
    "error: something the driver says",
    f"leaked {SECRET} by a user's print",
    _ev(kind="done", summary={"steps": 4, "max_steps": 4, "train_loss": 1.9}, final="/r/final"),
]) + "\n"


def test_progress_and_render():
    assert rj.last_progress(LOG) == {"kind": "done", "step": 4, "max_steps": 4}
    assert rj.last_progress(LOG.rsplit(EVENT_PREFIX, 1)[0]) == {"kind": "log", "step": 3, "max_steps": 4}
    assert rj.last_progress("nothing here") is None
    text = rj.render_log(LOG, {"X": SECRET})
    assert "storage preflight: ok" in text and "[" in text and "3/4  loss 2.0000" in text
    assert "checkpoint committed: step 2 → /r/checkpoint-00000002" in text
    assert "done: 4 steps" in text and EVENT_PREFIX not in text
    assert SECRET not in text and "leaked *** by" in text and "model: /models/***/m" in text


def test_follower_handles_split_chunks_and_reconnects():
    out = io.StringIO()
    f = rj._Follower(sec.Masked(out, {"X": SECRET}), verbose=False)
    for i in range(0, len(LOG), 7):  # arbitrary chunk boundaries
        f.feed(LOG[i:i + 7])
    text = out.getvalue()
    assert "1/4" in text and "3/4" in text and "checkpoint committed: step 2" in text
    assert "error: something the driver says" in text and "noise" not in text and SECRET not in text
    assert "model: /models/***/m" in text  # event lines too (they were shown unmasked)
    assert f.summary == {"steps": 4, "max_steps": 4, "train_loss": 1.9} and f.shown_error
    f.reconnect()  # the stream starts over: nothing is shown twice
    before = out.getvalue()
    f.feed(LOG)
    assert out.getvalue() == before


def test_unset_secret_fails_before_anything_is_sent(clean_env, tmp_path, capsys):
    from raytune_ft.cli import main
    from tests.tiny import write_spec

    clean_env.setenv("RAY_AUTH_TOKEN", "tok")
    clean_env.delenv("RTF_UNSET_TOKEN", raising=False)
    spec = write_spec(tmp_path / "s.yaml", spec_doc("rj", tmp_path / "m", tmp_path / "t.jsonl", None, tmp_path / "runs",
                                                    env={"RTF_UNSET_TOKEN": None}))
    with pytest.raises(SystemExit) as ei:
        main(["submit", str(spec), "--address", "http://127.0.0.1:9"])  # nothing listens there
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "error: env: $RTF_UNSET_TOKEN is forwarded by the spec" in err, err
    assert "cannot reach" not in err


def test_an_open_cluster_is_detected(tmp_path):
    import http.server
    import threading

    class Open(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self):
            self.send_response(type(self).status)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Open)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert rj.checks_tokens(url) is False  # answers without a token: auth is off
        Open.status = 401
        assert rj.checks_tokens(url) is True
        Open.status = 500
        assert rj.checks_tokens(url) is None
    finally:
        srv.shutdown()
    assert rj.checks_tokens("http://127.0.0.1:9", timeout=2) is None


def test_status_and_jobs_records_mask_forwarded_values(monkeypatch):
    from ray.job_submission import JobDetails, JobStatus, JobType

    monkeypatch.setenv("RTF_UNIT_SECRET", SECRET)
    job = JobDetails(type=JobType.SUBMISSION, submission_id="rtf-x-1", status=JobStatus.FAILED,
                     entrypoint="python -u -m raytune_ft.launch.driver rtf_spec.yaml",
                     message=f"Job failed: cannot log in with {SECRET}\nmore", driver_exit_code=2,
                     metadata={"rtf_name": "x", "rtf_forwarded_env": "RTF_UNIT_SECRET"})
    rec = rj.job_record(None, job, progress=False)
    assert rec["message"] == "Job failed: cannot log in with ***\nmore"
    assert "message:  Job failed: cannot log in with ***" in rj.render_status(rec) and SECRET not in json.dumps(rec)
    assert sec.local_values("RTF_UNIT_SECRET,RTF_NOT_SET_HERE,") == {"RTF_UNIT_SECRET": SECRET}


# --------------------------------------------------------------------------- plain http


def test_plain_http_to_another_machine_warns_and_needs_the_flag_for_secrets():
    for url in ("https://ray.example.com", "http://127.0.0.1:8265", "http://127.8.9.10:8265", "http://[::1]:8265",
                "http://localhost:8265", "http://LOCALHOST.:8265", "http://[::ffff:127.0.0.1]:8265"):
        assert not sec.sends_in_clear(url), url
        assert sec.check_transport(url, ["HF_TOKEN"]) is None  # silent, secrets or not
    for url in ("http://10.0.0.5:8265", "http://head:8265", "http://ray.example.com", "http://0.0.0.0:8265",
                "http://[2001:db8::1]:8265", "http://localhost.example.com:8265", rj.dashboard_url("ray://head:10001")):
        assert sec.sends_in_clear(url), url
    url = "http://10.0.0.5:8265"
    assert sec.check_transport(url, []) == (f"warning: {url} is plain HTTP to another machine: the Ray auth token "
                                            "crosses the network unencrypted; prefer https or an SSH tunnel to the head")
    with pytest.raises(UserError) as ei:
        sec.check_transport(url, ["HF_TOKEN", "A_KEY"])
    assert ei.value.exit_code == 2 and "\n" not in str(ei.value)
    assert str(ei.value).startswith(f"env forwards A_KEY, HF_TOKEN, but {url} is plain HTTP to another machine")
    assert str(ei.value).endswith("or pass --allow-secrets-over-plain-http to send them anyway")
    warning = sec.check_transport(url, ["HF_TOKEN"], allow_plain_http=True)  # opted in: proceeds, still warned
    assert warning.startswith(f"warning: {url} is plain HTTP") and "(and with it HF_TOKEN)" in warning


def test_submit_over_plain_http_refuses_secrets_before_contacting(clean_env, tmp_path, capsys):
    from raytune_ft.cli import main
    from tests.tiny import write_spec

    clean_env.setenv("RAY_AUTH_TOKEN", "tok-plain")
    clean_env.setenv("RTF_UNIT_SECRET", SECRET)
    spec = write_spec(tmp_path / "s.yaml", spec_doc("rj", tmp_path / "m", tmp_path / "t.jsonl", None, tmp_path / "runs",
                                                    env={"RTF_UNIT_SECRET": None}))
    with pytest.raises(SystemExit) as ei:  # a documentation address (TEST-NET-3): refused before any connection
        main(["submit", str(spec), "--address", "http://203.0.113.7:8265"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: env forwards RTF_UNIT_SECRET, but http://203.0.113.7:8265 is plain HTTP to another "
                          "machine") and "--allow-secrets-over-plain-http" in err
    assert SECRET not in err and "tok-plain" not in err
    # with the flag it goes on: warned, then it tries the address (0.0.0.0 is this machine, nothing listens on 9)
    with pytest.raises(SystemExit) as ei:
        main(["submit", str(spec), "--address", "http://0.0.0.0:9", "--allow-secrets-over-plain-http"])
    err = capsys.readouterr().err
    assert ei.value.code == 2, err
    assert err.splitlines()[0] == ("warning: http://0.0.0.0:9 is plain HTTP to another machine: the Ray auth token "
                                   "(and with it RTF_UNIT_SECRET) crosses the network unencrypted; prefer https or "
                                   "an SSH tunnel to the head")
    assert err.splitlines()[1].startswith("error: cannot reach the Ray dashboard at http://0.0.0.0:9"), err
    with pytest.raises(SystemExit):  # loopback: no warning
        main(["submit", str(spec), "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert "warning" not in err and err.startswith("error: cannot reach the Ray dashboard at http://127.0.0.1:9"), err
